"""Worker (run under torchrun): no init_process_group here; reslens starts the default group itself."""

import json
import sys

import torch.distributed as dist

from reslens._distributed import shard_of

if __name__ == "__main__":
    shard = shard_of()  # group=None under torchrun: the default group, started by reslens
    alone = shard_of(False)
    with open(f"{sys.argv[1]}.{shard.rank}.json", "w") as f:
        json.dump({"rank": shard.rank, "world": shard.world, "backend": dist.get_backend(),
                   "alone": [alone.rank, alone.world]}, f)
    dist.barrier()
    dist.destroy_process_group()
