"""The data-set passes the distributed tests run: each under torchrun (2 gloo ranks) and in one process.

Every case builds its model and data the same way wherever it runs and returns plain tensors, so a
worker's output and the test process's can be compared key by key.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers.py

SENTENCES = (
    "The river ran past the old mill, and the miller's daughter counted the boats going down to the sea. ",
    "Seven ravens sat on the roof of the barn and argued about the weather until the farmer came out. ",
    "In the morning the baker opened his shop, lit the oven and sang a song his grandmother had taught him. ",
    "Nobody in the village knew where the stranger came from, but everyone agreed that his coat was blue. ",
)
TEXT = "".join(SENTENCES[i % len(SENTENCES)] for i in range(18))  # ~390 GPT-2 tokens


class Chars:
    """A toy tokenizer for the tiny models: one id per character."""

    def __call__(self, texts, add_special_tokens=False, **_):
        if isinstance(texts, str):
            return {"input_ids": [ord(c) % 97 for c in texts]}
        return {"input_ids": [[ord(c) % 97 for c in t] for t in texts]}


def _stats_tensors(stats, prefix: str) -> dict[str, torch.Tensor]:
    from reslens.lens import METRICS

    out = {"n_tokens": torch.tensor(stats.n_tokens), "n_sequences": torch.tensor(stats.n_sequences),
           "exact": torch.tensor(stats.exact_quantiles), "n_non_finite": stats.n_non_finite,
           "top1_agreement": stats.top1_agreement, "input_token_top1": stats.input_token_top1}
    for name in METRICS:
        out[f"mean.{name}"] = getattr(stats.mean, name)
        out[f"quantiles.{name}"] = getattr(stats.quantiles, name)
    return {f"{prefix}.{key}": value for key, value in out.items()}


def lens_stats_case(group=None) -> dict[str, torch.Tensor]:
    """Lens statistics of text (5 batches: 3 + 2) and of 3 id batches; exact and sampled quantiles."""
    import reslens
    from reslens._inputs import encode
    from reslens.lens_stats import lens_stats

    model, tokenizer = reslens.load_model()
    kwargs = dict(tokenizer=tokenizer, max_length=24, batch_size=4, progress=False, group=group)
    out = _stats_tensors(lens_stats(model, TEXT, **kwargs), "text")
    out |= _stats_tensors(lens_stats(model, TEXT, max_samples=120, **kwargs), "sampled")
    ids = torch.tensor(encode(tokenizer, TEXT)[:120]).view(3, 2, 20)  # 3 batches [2, 20]
    out |= _stats_tensors(lens_stats(model, list(ids), progress=False, group=group), "ids")
    return out


def second_moment_case(group=None, cache_dir=None) -> dict[str, torch.Tensor]:
    """ROME's key statistics of layer 1 (5 batches: 3 + 2), also through ``cache_dir``."""
    import reslens
    from reslens.rome import SecondMoment

    model, tokenizer = reslens.load_model()
    kwargs = dict(tokenizer=tokenizer, max_tokens=300, max_length=20, batch_size=3, group=group)
    stats = SecondMoment.compute(model, 1, [TEXT], **kwargs)
    out = {"mom2": stats.mom2, "n_tokens": torch.tensor(stats.n_tokens)}
    if cache_dir is not None:
        first = SecondMoment.compute(model, 1, [TEXT], cache_dir=cache_dir, **kwargs)  # rank 0 writes
        again = SecondMoment.compute(model, 1, [TEXT], cache_dir=cache_dir, **kwargs)  # every rank reads
        out |= {"cached.mom2": first.mom2, "again.mom2": again.mom2}
    return out


def shortcut_case(group=None) -> dict[str, torch.Tensor]:
    """The linear shortcut of a tiny Llama over 5 batches (3 + 2)."""
    from helpers import make_family

    from reslens.lenses import fit_shortcut

    model = make_family("llama")
    lens = fit_shortcut(model, [TEXT], tokenizer=Chars(), max_tokens=600, max_length=40, batch_size=3,
                        progress=False, group=group)
    return {"weight": lens.weight, "bias": lens.bias, "n_tokens": torch.tensor(lens.config["n_tokens"])}


def jacobian_lens_case(group=None) -> dict[str, torch.Tensor]:
    """The Jacobian lens of a tiny Llama: 8 windows in 3 batches (3 + 3 + 2; rank 0 reads two, rank 1 one)."""
    from helpers import make_family

    from reslens.lens import fit_jacobian_lens

    model = make_family("llama")
    lens = fit_jacobian_lens(model, [TEXT], tokenizer=Chars(), max_tokens=300, max_length=40, batch_size=3,
                             skip_first=4, progress=False, group=group)
    return {"weight": lens.weight, "n_windows": torch.tensor(lens.config["n_windows"]),
            "n_tokens": torch.tensor(lens.config["n_tokens"])}


def tuned_lens_case(group=None, checkpoint=None) -> dict[str, torch.Tensor]:
    """A tuned lens of a tiny GPT-2: 13 windows, 3 a step (2 + 1 on two ranks; the last step 1 + 0)."""
    from helpers import make_family

    from reslens.lenses import train_tuned_lens

    model = make_family("gpt2")
    lens = train_tuned_lens(model, [TEXT], tokenizer=Chars(), max_tokens=520, tokens_per_step=120,
                            max_length=40, batch_size=2, chunk_size=32, checkpoint=checkpoint, save_every=2,
                            progress=False, group=group)
    loss = torch.tensor(lens.config["loss"], dtype=torch.float64)  # [steps, n_layer]
    steps = torch.tensor(lens.config["steps"])
    return {"weight": lens.weight, "bias": lens.bias, "loss": loss, "steps": steps}


def save(tensors: dict[str, torch.Tensor], prefix: str, rank: int) -> None:
    """Write a rank's results to ``<prefix>.<rank>.safetensors``."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, f"{prefix}.{rank}.safetensors")


MINING_TEXTS = [f"Chapter {n}. " + "".join(SENTENCES[(n + i) % len(SENTENCES)] for i in range(6))
                for n in range(6)]


class Interrupted(Exception):
    """What the interrupted corpus raises: a run stopped part-way, after its last snapshot."""


def _interrupted(texts, after: int):
    yield from texts[:after]
    raise Interrupted(f"stopped after {after} texts")


def _index_tensors(index, prefix: str) -> dict[str, torch.Tensor]:
    import hashlib

    out = {name: getattr(index, name) for name in ("scores", "example", "position", "example_ids",
                                                      "example_offsets", "example_tokens")}
    out["counts"] = torch.tensor([index.n_examples, index.n_tokens])
    out["corpus_fingerprint"] = torch.tensor(list(hashlib.sha256(index.corpus_fingerprint.encode()).digest()))
    return {f"{prefix}.{key}": value for key, value in out.items()}


def _keep_a_copy(path, to) -> None:
    """Copy ``path`` to ``to`` (rank 0 alone under a process group; the others wait for it)."""
    import shutil

    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.copyfile(path, to)
    if dist.is_initialized():
        dist.barrier()


def mining_case(group=None, out=None) -> dict[str, torch.Tensor]:
    """Trigger mining: the embedded GPT-2 on sentences (repeated ones: ties across ranks), also interrupted
    after its first snapshot and resumed into ``out``; a tiny Llama mined signed, on windows."""
    from helpers import make_family

    import reslens
    from reslens import kv_memory as kv

    model, tokenizer = reslens.load_model()
    kwargs = dict(top_k=5, batch_size=2, progress=False, group=group)  # groups of 32 sentences: 32 + 10
    saving = dict(out=out, save_every=200)
    result = _index_tensors(kv.mine_triggers(model, tokenizer, MINING_TEXTS, **kwargs), "gpt2")
    if out is not None:
        try:
            kv.mine_triggers(model, tokenizer, _interrupted(MINING_TEXTS, 5), **saving, **kwargs)
        except Interrupted:
            pass
        else:
            raise AssertionError("the interrupted corpus did not interrupt the run")
        result |= _index_tensors(kv.TriggerIndex.load(out), "snapshot")  # the last good snapshot: 32 units
        _keep_a_copy(out, f"{out}.interrupted")
        resumed = kv.mine_triggers(model, tokenizer, MINING_TEXTS, resume=out, **saving, **kwargs)
        result |= _index_tensors(resumed, "resumed")
    llama = make_family("llama")
    result |= _index_tensors(kv.mine_triggers(llama, Chars(), MINING_TEXTS, unit="window", window=12, top_k=4,
                                              batch_size=3, progress=False, group=group), "llama")
    return result


FACTS = (
    ("The river ran past the old mill, and the miller's daughter", "the old mill", None),
    ("Seven ravens sat on the roof of the barn", "Seven ravens", None),
    ("In the morning the baker opened his", "the baker", None),
    ("Nobody in the village knew where the stranger", "the village", " elephant"),  # not its answer: skipped
    ("The miller's daughter counted the boats going down to the", "The miller's daughter", None),
)


def trace_many_case(group=None) -> dict[str, torch.Tensor]:
    """Causal traces of 5 facts (3 + 2 on two ranks, one skipped) in ROME's buckets; resid and mlp."""
    import reslens
    from reslens.tracing import Noise, trace_many

    model, tokenizer = reslens.load_model()
    out = {}
    for kind in ("resid", "mlp"):
        summary = trace_many(model, tokenizer, FACTS, kind=kind, window=2, noise=Noise(samples=3),
                             progress=False, group=group)
        out |= {f"{kind}.{name}": getattr(summary, name) for name in ("mean", "low", "high", "count")}
        out[f"{kind}.skipped"] = torch.tensor(summary.skipped)
        out[f"{kind}.probs"] = torch.tensor([[r.clean_prob, r.corrupted_prob] for r in summary.results],
                                            dtype=torch.float64)
        for i, r in enumerate(summary.results):
            out[f"{kind}.restored.{i}"] = r.restored_prob
            out[f"{kind}.ids.{i}"] = r.input_ids
    return out


def pca_case(group=None) -> dict[str, torch.Tensor]:
    """The PCA experiment on 40 positions of 13 windows, 3 windows a batch (5 batches: 3 + 2 on two ranks)."""
    from dataclasses import fields

    import reslens
    from reslens.pca import CONDITIONS, pca_experiment

    model, tokenizer = reslens.load_model()
    result = pca_experiment(model, tokenizer, TEXT, n=40, seed=3, max_length=32, batch_size=3, progress=False,
                            group=group)
    out = {"examples": result.examples, "final_prediction": result.final_prediction}
    for name, _, _ in CONDITIONS:
        condition = result.condition(name)
        out |= {f"{name}.{f.name}": getattr(condition, f.name) for f in fields(condition)}
    return out
