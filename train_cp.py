"""Train ESM-2 with context parallelism: every sequence split over cp_size GPUs, combined with FSDP2 data parallelism.

    torchrun --nproc_per_node N train_cp.py --config-name L0_sanity_cp cp_size=2 key=value ...

The ranks form a (dp, cp) grid, cp innermost; parameters are sharded over all N ranks (recipe/parallel.py). Every
entrypoint takes cp_size (train_ddp.py cp_size=2 replicates instead of sharding); this one defaults to the
context-parallel sanity config. Needs the te backend on CUDA GPUs.
"""

from recipe.train import entrypoint

main = entrypoint("fsdp2", config_name="L0_sanity_cp")

if __name__ == "__main__":
    main()
