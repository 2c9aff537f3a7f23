"""Worker (run under torchrun): mine_triggers on 2 gloo processes, full, interrupted and resumed.

Every rank writes what it got; the index file is ``<OUT>.index.safetensors`` (rank 0 writes it).
"""

import sys

import torch.distributed as dist

from cases import mining_case, save

if __name__ == "__main__":
    dist.init_process_group("gloo")
    save(mining_case(out=f"{sys.argv[1]}.index.safetensors"), sys.argv[1], dist.get_rank())
    dist.barrier()  # leave together: a rank closing while the other still talks can abort it
    dist.destroy_process_group()
