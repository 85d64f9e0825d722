"""FP8 recipe state across data-parallel ranks (torchrun --nproc_per_node=2): train L0_sanity with FP8 delayed
scaling under DDP or FSDP2 through the trainer, then compare every TE module's scales and amax histories rank
against rank. They must be identical: the amax reduction group is the whole world.

No validation runs: TE records amaxes in a no-grad (evaluation) forward but reduces them only at the next training
step's autocast exit, so right after a validation pass the newest history slot is still per-rank (the next training
step makes it common again, and a checkpoint restores one copy on every rank).

    torchrun --standalone --nproc_per_node=2 tests/multi_gpu/fp8_sync.py ddp|fsdp2 OUTPUT_DIR [overrides...]
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformer_engine.pytorch  # noqa: F401  (before any CUDA work)
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from recipe.config import CONFIG_DIR  # noqa: E402
from recipe.parallel import STRATEGIES, init_distributed  # noqa: E402
from recipe.train import fit  # noqa: E402


def recipe_state(model) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, module in model.named_modules():
        meta = getattr(module, "fp8_meta", None) or {}
        for key in ("scaling_fwd", "scaling_bwd"):
            state = meta.get(key)
            for attr in ("scale", "amax_history"):
                if hasattr(state, attr):
                    out.append((f"{name}.{key}.{attr}", getattr(state, attr)))
    return out


def main(strategy: str, output_dir: str, overrides: list[str]) -> None:
    info = init_distributed("cuda")
    args = [
        "model.backend=te",
        "model.activation=gelu_tanh",
        "fp8_config.enabled=true",
        "num_train_steps=30",
        "dataset.val_path=null",
        "checkpoint.save_every_n_steps=0",
        "checkpoint.save_final_checkpoint=false",
        "checkpoint.save_final_model=false",
        f"output_dir={output_dir}",
        *overrides,
    ]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("L0_sanity", overrides=args)
    model = fit(cfg, STRATEGIES[strategy](info, torch.bfloat16, cfg.fsdp.fp32_master_weights, cfg.fsdp.reshard_after_forward))
    state = recipe_state(model)
    flat = torch.cat([t.detach().float().flatten() for _, t in state]).cuda()
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    diff = max((g - gathered[0]).abs().max().item() for g in gathered)
    nonzero = int((flat != 0).sum())
    if info.rank == 0:
        print(
            f"FP8 recipe state, {strategy} x {dist.get_world_size()}: {len(state)} tensors "
            f"({flat.numel()} values, {nonzero} non-zero), "
            f"largest difference between ranks {diff}",
            flush=True,
        )
    dist.destroy_process_group()
    sys.exit(0 if state and nonzero and diff == 0 else 1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
