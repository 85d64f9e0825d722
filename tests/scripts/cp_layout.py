"""The (dp, cp) grid and FSDP2's sharding group, on gloo CPU processes (torchrun --nproc_per_node=4, cp_size 2).
Prints one JSON list (rank 0): each rank's CP group, dp rank, and the mesh its FSDP2 parameters are sharded over."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from recipe.model import EsmConfig, build_model  # noqa: E402
from recipe.parallel import FSDP2Strategy, init_distributed, setup_mesh  # noqa: E402

info = setup_mesh(init_distributed("cpu"), int(sys.argv[1]))
model = FSDP2Strategy(info, torch.float32).wrap(build_model(EsmConfig.from_size("tiny", backend="torch"), device="meta"))
param = model.layers[0].attention.layernorm_qkv.weight
mine = {
    "rank": info.rank,
    "cp_rank": info.cp.rank,
    "cp_ranks": list(info.cp.ranks),
    "dp_rank": info.dp_rank,
    "dp_size": info.dp_size,
    "shard_mesh_size": param.device_mesh.size(),
    "placements": str(param.placements),
}
everyone = [None] * dist.get_world_size()
dist.all_gather_object(everyone, mine)
if info.rank == 0:
    print(json.dumps(everyone))
dist.barrier()  # every rank past its last collective before any tears down its gloo connections
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # what the test reads is printed: skip the interpreter's teardown of gloo's threads, which aborted once under load
