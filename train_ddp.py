"""Train ESM-2 with DistributedDataParallel (gradients all-reduced, model replicated).

    torchrun --nproc_per_node N train_ddp.py --config-name L0_sanity key=value ...
    python train_ddp.py --config-name L0_sanity        # one process

What differs between strategies lives in recipe/parallel.py; the loop is recipe/train.py.
"""

from recipe.train import entrypoint

main = entrypoint("ddp")

if __name__ == "__main__":
    main()
