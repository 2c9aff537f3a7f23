"""Worker (run under torchrun): data-set passes given something wrong on rank 1; each rank writes its error.

Rank 1 alone gets an invalid option (or other weights, another lens, a bad batch); every rank must raise
the same error at once. The process group's timeout is 20 s, so a rank left waiting in a collective fails
the case (and the test) in seconds instead of torchrun's default 30 minutes.
"""

import copy
import json
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from cases import FACTS, MINING_TEXTS, TEXT, Chars


def _cases(rank: int):
    """``name -> call``: each call is wrong on rank 1 only."""
    from helpers import make_family

    import reslens
    from reslens import kv_memory as kv
    from reslens.lenses import TunedLens, compare_lenses, fit_shortcut, train_tuned_lens
    from reslens.lens_stats import lens_stats
    from reslens.pca import pca_experiment
    from reslens.rome import SecondMoment
    from reslens.tracing import trace_many

    model, tokenizer = reslens.load_model()
    llama, bad = make_family("llama"), rank == 1
    text = dict(tokenizer=tokenizer, max_length=24, batch_size=4, progress=False)
    chars = dict(tokenizer=Chars(), max_tokens=300, max_length=40, batch_size=3, progress=False)
    edited = copy.deepcopy(model)
    if bad:
        with torch.no_grad():
            edited.lm_head.weight[0, 0] += 1.0  # rank 1 holds other weights (of the same shape)
    arch = reslens.adapter(model)
    g = torch.Generator().manual_seed(rank)  # each rank its own lens
    lens = TunedLens(0.01 * torch.randn(arch.n_layer, arch.d_model, arch.d_model, generator=g),
                     torch.zeros(arch.n_layer, arch.d_model))
    ids = [torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ids[1][0, 3] = 10**6  # batch 1, rank 1's: an id outside the vocabulary, found mid-pass
    return {
        "lens_stats": lambda: lens_stats(model, TEXT, quantiles=(2.0,) if bad else (0.5,), **text),
        "fit_shortcut": lambda: fit_shortcut(llama, [TEXT], ridge=-1.0 if bad else 1e-6, **chars),
        "train_tuned_lens": lambda: train_tuned_lens(llama, [TEXT], optimizer="lbfgs" if bad else "sgd",
                                                     **chars),
        "compare_lenses": lambda: compare_lenses(model, [TEXT], [] if bad else [None], **text),
        "second_moment": lambda: SecondMoment.compute(model, 99 if bad else 1, [TEXT], tokenizer=tokenizer,
                                                      max_tokens=200, batch_size=3),
        "pca_experiment": lambda: pca_experiment(model, tokenizer, TEXT, n=0 if bad else 10, max_length=32,
                                                 progress=False),
        "mine_triggers": lambda: kv.mine_triggers(model, tokenizer, MINING_TEXTS, top_k=0 if bad else 5,
                                                  progress=False),
        "trace_many": lambda: trace_many(model, tokenizer, FACTS, kind="bogus" if bad else "resid",
                                         progress=False),
        "a bad batch mid-pass": lambda: lens_stats(model, ids, progress=False),
        "lens_stats, other weights": lambda: lens_stats(edited, TEXT, **text),
        "fit_shortcut, other weights": lambda: fit_shortcut(edited, [TEXT],
                                                            **{**chars, "tokenizer": tokenizer}),
        "lens_stats, another lens": lambda: lens_stats(model, TEXT, lens=lens, **text),
    }


if __name__ == "__main__":
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    rank = dist.get_rank()
    seen = {}
    for name, call in _cases(rank).items():
        began = time.monotonic()
        try:
            call()
            seen[name] = {"raised": None}
        except Exception as error:  # what every rank raised, and how long it took
            seen[name] = {"raised": type(error).__name__, "message": str(error)}
        seen[name]["seconds"] = time.monotonic() - began
    with open(f"{sys.argv[1]}.{rank}.json", "w") as f:
        json.dump(seen, f)
    dist.barrier()  # leave together: a rank closing while the other still talks can abort it
    dist.destroy_process_group()
