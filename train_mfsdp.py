"""Train ESM-2 with NVIDIA's Megatron-FSDP (pip install -e '.[mfsdp]'; CUDA GPUs only): every layer an FSDP unit,
parameters, gradients and optimizer state sharded (ZeRO-3), FP32 parameters with BF16 compute.

    torchrun --nproc_per_node N train_mfsdp.py --config-name L0_sanity key=value ...
    python train_mfsdp.py --config-name L0_sanity        # one process

What differs between strategies lives in recipe/parallel.py; the loop is recipe/train.py.
"""

from recipe.train import entrypoint

main = entrypoint("mfsdp")

if __name__ == "__main__":
    main()
