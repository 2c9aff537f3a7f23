"""Worker (run under torchrun): fit_jacobian_lens on 2 gloo processes; every rank writes what it got."""

import sys

import torch.distributed as dist

from cases import jacobian_lens_case, save

if __name__ == "__main__":
    dist.init_process_group("gloo")
    save(jacobian_lens_case(), sys.argv[1], dist.get_rank())
    dist.barrier()  # leave together: a rank closing while the other still talks can abort it
    dist.destroy_process_group()
