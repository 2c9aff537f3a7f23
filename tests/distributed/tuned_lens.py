"""Worker (run under torchrun): train_tuned_lens, with a checkpoint, on 2 gloo processes.

Every rank writes what it got.
"""

import sys
from pathlib import Path

import torch.distributed as dist

from cases import tuned_lens_case, save

if __name__ == "__main__":
    dist.init_process_group("gloo")
    checkpoint = Path(sys.argv[1]).parent / "tuned.ckpt.safetensors"
    save(tuned_lens_case(checkpoint=checkpoint), sys.argv[1], dist.get_rank())
    dist.barrier()  # leave together: a rank closing while the other still talks can abort it
    dist.destroy_process_group()
