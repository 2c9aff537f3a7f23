"""Worker (run under torchrun): the Shard primitives on 2 gloo processes; rank 0 writes what it saw."""

import json
import sys

import torch
import torch.distributed as dist

from reslens._distributed import merge_top_k, shard_of

dist.init_process_group("gloo")
shard = shard_of()
mine = [i for i, _ in shard.take(range(7))]
total = shard.sum(torch.tensor([float(shard.rank + 1)], dtype=torch.float64))
cat = shard.cat(torch.arange(shard.rank + 1).float()[:, None].expand(-1, 2), dim=0)
objects = shard.gather_objects({"rank": shard.rank})
values = torch.tensor([[1.0, 3.0, 3.0, 2.0]]) if shard.rank == 0 else torch.tensor([[3.0, 0.5, -1.0, 2.0]])
ids = torch.tensor([[4, 2, 6, 0]]) if shard.rank == 0 else torch.tensor([[1, 3, 5, -1]])
all_values, all_ids = shard.cat(values, dim=1), shard.cat(ids, dim=1)
top_v, top_i = merge_top_k(all_values, all_ids, 3)
try:
    shard.same(shard.rank, "the rank")
    refused = False
except ValueError:
    refused = True
out = {"rank": shard.rank, "world": shard.world, "mine": mine, "sum": total.item(), "cat": cat.tolist(),
       "objects": objects, "top_v": top_v.tolist(), "top_i": top_i.tolist(), "refused": refused}
with open(f"{sys.argv[1]}.{shard.rank}.json", "w") as f:
    json.dump(out, f)
dist.barrier()  # leave together: a rank closing while the other still talks can abort it (SIGABRT)
dist.destroy_process_group()
