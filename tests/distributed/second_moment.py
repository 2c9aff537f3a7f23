"""Worker (run under torchrun): SecondMoment.compute, also through cache_dir, on 2 gloo processes.

Every rank writes what it got.
"""

import sys
from pathlib import Path

import torch.distributed as dist

from cases import second_moment_case, save

if __name__ == "__main__":
    dist.init_process_group("gloo")
    save(second_moment_case(cache_dir=Path(sys.argv[1]).parent / "cache"), sys.argv[1], dist.get_rank())
    dist.barrier()  # leave together: a rank closing while the other still talks can abort it
    dist.destroy_process_group()
