"""Train ESM-2 with FSDP2 (fully_shard per layer and root, bf16 compute, fp32 reduction).

    torchrun --nproc_per_node N train_fsdp2.py --config-name L0_sanity key=value ...
    python train_fsdp2.py --config-name L0_sanity        # one process

What differs between strategies lives in recipe/parallel.py; the loop is recipe/train.py.
"""

from recipe.train import entrypoint

main = entrypoint("fsdp2")

if __name__ == "__main__":
    main()
