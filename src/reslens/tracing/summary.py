"""Causal traces averaged over facts in ROME's position buckets: :func:`trace_many`, :class:`TraceSummary`."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from reslens._checks import check_bool, check_choice, check_int
from reslens._distributed import shard_of
from reslens._prompts import answer_ids, prompt_ids, prompt_pieces, subject_span
from reslens._saving import read_safetensors, write_safetensors
from reslens._text import html_table, pandas
from reslens.arch import Arch, adapter
from reslens.tracing.trace import KINDS, Noise, TraceResult, causal_trace_ids, embedding_std, noise_of

__all__ = ["BUCKETS", "TraceSummary", "trace_many"]

#: ROME's position buckets for averaged traces (:func:`trace_many`).
BUCKETS = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
_FORMAT = "reslens.TraceSummary/1"
#: Column headers of :meth:`TraceSummary.interval_table`.
_SHORT = dict(zip(BUCKETS, ("first subj", "middle subj", "last subj", "first after", "further",
                            "last token")))


def _bucket_positions(span: tuple[int, int], n: int) -> list[list[int]]:
    """ROME's position buckets (``average_causal_effects``); a bucket may be empty.

    The first subsequent token is ``end`` even when it is also the last token (as ROME).
    """
    start, end = span
    return [
        [start],
        list(range(start + 1, end - 1)),
        [end - 1],
        [end] if end < n else [],
        list(range(end + 1, n - 1)),
        [n - 1],
    ]


@dataclass(frozen=True)
class TraceSummary:
    """Causal traces averaged over facts in ROME's position buckets (:data:`BUCKETS`).

    - ``mean``, ``low``, ``high``: ``[n_bucket, n_layer]`` mean indirect effect and its 95%
      interval (Student t over facts; NaN where a bucket has fewer than 2 facts for the interval)
    - ``count: [n_bucket]`` facts that have tokens in each bucket
    - ``clean_prob``, ``corrupted_prob``: mean over the traced facts
    - ``results``: the per-fact :class:`TraceResult`; ``skipped``: indices of facts not traced
      (the model does not give the answer)

    ``save``/``load`` write one safetensors file holding the summary and every per-fact result.
    """

    kind: str
    buckets: tuple[str, ...]
    mean: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    count: torch.Tensor
    clean_prob: float
    corrupted_prob: float
    results: tuple[TraceResult, ...] = field(default=(), compare=False, repr=False)
    skipped: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_choice(self.kind, KINDS, "kind")
        object.__setattr__(self, "buckets", tuple(self.buckets))
        object.__setattr__(self, "results", tuple(self.results))
        object.__setattr__(self, "skipped", tuple(int(i) for i in self.skipped))
        shape = (len(self.buckets), self.mean.shape[-1] if self.mean.ndim == 2 else -1)
        for name in ("mean", "low", "high"):
            t = getattr(self, name)
            if t.ndim != 2 or tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; "
                                 f"expected [{len(self.buckets)}, n_layer]")
        if tuple(self.count.shape) != (len(self.buckets),):
            raise ValueError(f"count must be [{len(self.buckets)}]; got {tuple(self.count.shape)}")

    @property
    def n_facts(self) -> int:
        """Facts traced (not counting the skipped ones)."""
        return len(self.results)

    @property
    def n_layer(self) -> int:
        """Columns of the averages: the model's blocks."""
        return self.mean.shape[1]

    def to_frame(self):
        """One row per (bucket, layer): mean indirect effect, 95% interval, facts counted."""
        pd = pandas()
        rows = []
        for b, bucket in enumerate(self.buckets):
            for layer in range(self.n_layer):
                rows.append({"kind": self.kind, "bucket": bucket, "layer": layer,
                             "mean": float(self.mean[b, layer]), "low": float(self.low[b, layer]),
                             "high": float(self.high[b, layer]), "count": int(self.count[b])})
        return pd.DataFrame(rows)

    def table(self, *, cell: int = 7) -> str:
        """Text table: one line per bucket, the mean indirect effect per layer, and the facts counted."""
        width = max(len(b) for b in self.buckets) + 2
        lines = [
            f"average indirect effect ({self.kind}) over {self.n_facts} facts "
            f"(clean {self.clean_prob:.4f}, corrupted {self.corrupted_prob:.4f}, "
            f"skipped {len(self.skipped)})",
            f"{'':<{width}}" + "".join(f"{f'L{layer}':>{cell}}" for layer in range(self.n_layer)) + "      n",
        ]
        for b, bucket in enumerate(self.buckets):
            values = "".join(f"{float(self.mean[b, layer]):>{cell}.3f}" for layer in range(self.n_layer))
            lines.append(f"{bucket:<{width}}" + values + f"{int(self.count[b]):>7}")
        return "\n".join(lines)

    def interval_table(self, *, layers: Sequence[int] | None = None) -> str:
        """Text table: one line per layer, ``mean±half-width`` of the 95% interval in each bucket.

        ``layers``: the layers shown (default all). A bucket with one fact shows its mean alone,
        an empty bucket ``-``. The last lines name each bucket's peak layer with its interval.
        """
        shown = range(self.n_layer) if layers is None else [check_int(x, "layers", low=0,
                                                                    high=self.n_layer - 1) for x in layers]
        names = [_SHORT.get(b, b) for b in self.buckets]
        width = max([13] + [len(name) + 2 for name in names])

        def cell(b: int, layer: int) -> str:
            mean, low, high = (float(t[b, layer]) for t in (self.mean, self.low, self.high))
            if mean != mean:
                return "-"
            return f"{mean:.3f}" if low != low else f"{mean:.3f}±{(high - low) / 2:.3f}"

        lines = [f"mean indirect effect ({self.kind}) ± 95% interval (Student t over facts), "
                 f"{self.n_facts} facts",
                 "layer" + "".join(f"{name:>{width}}" for name in names),
                 "n    " + "".join(f"{int(n):>{width}}" for n in self.count)]
        for layer in shown:
            lines.append(f"{layer:<5}" + "".join(f"{cell(b, layer):>{width}}" for b in range(len(names))))
        for b, bucket in enumerate(self.buckets):
            if int(self.count[b]) and not bool(torch.isnan(self.mean[b]).all()):
                layer = int(torch.nan_to_num(self.mean[b], nan=-float("inf")).argmax())
                lines.append(f"peak of {bucket}: layer {layer}, {cell(b, layer)}")
        return "\n".join(lines)

    def plot(self, *, ax=None):
        """ROME's average-effect heatmap: buckets x layers."""
        from reslens.plot import plot_trace_summary

        return plot_trace_summary(self, ax=ax)

    def __repr__(self) -> str:
        return (f"TraceSummary(kind={self.kind!r}, n_facts={self.n_facts}, skipped={len(self.skipped)}, "
                f"n_layer={self.n_layer}, clean={self.clean_prob:.4f}, corrupted={self.corrupted_prob:.4f})")

    def _repr_html_(self) -> str:
        header = ("bucket", "n", *(f"L{layer}" for layer in range(self.n_layer)))
        rows = [(bucket, int(self.count[b]), *(float(x) for x in self.mean[b]))
                for b, bucket in enumerate(self.buckets)]
        return html_table(f"TraceSummary ({self.kind}): mean indirect effect over {self.n_facts} facts, "
                          f"{len(self.skipped)} skipped", header, rows)

    # --- persistence: the summary's fields and each result's, in one file ----------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file (atomically; the folder is created); read it back with :meth:`load`."""
        tensors = {name: getattr(self, name) for name in ("mean", "low", "high", "count")}
        meta = {"format": _FORMAT, "kind": self.kind, "buckets": json.dumps(self.buckets),
                "clean_prob": json.dumps(self.clean_prob), "corrupted_prob": json.dumps(self.corrupted_prob),
                "skipped": json.dumps(self.skipped), "n_results": str(len(self.results))}
        for i, result in enumerate(self.results):
            scalars = {}
            for f in fields(result):
                value = getattr(result, f.name)
                if isinstance(value, torch.Tensor):
                    tensors[f"results.{i}.{f.name}"] = value
                else:
                    scalars[f.name] = value
            meta[f"results.{i}"] = json.dumps(scalars)
        write_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> TraceSummary:
        """Read a file written by :meth:`save`."""
        tensors, meta = read_safetensors(path, _FORMAT, device=device, what="reslens TraceSummary")
        try:
            results = []
            for i in range(int(meta["n_results"])):
                scalars = json.loads(meta[f"results.{i}"])
                scalars["tokens"] = tuple(scalars["tokens"])
                scalars["subject_span"] = tuple(scalars["subject_span"])
                own = {f.name: tensors[f"results.{i}.{f.name}"] for f in fields(TraceResult)
                       if f"results.{i}.{f.name}" in tensors}
                results.append(TraceResult(**scalars, **own))
            return cls(kind=meta["kind"], buckets=tuple(json.loads(meta["buckets"])), mean=tensors["mean"],
                       low=tensors["low"], high=tensors["high"], count=tensors["count"],
                       clean_prob=json.loads(meta["clean_prob"]),
                       corrupted_prob=json.loads(meta["corrupted_prob"]),
                       results=tuple(results), skipped=tuple(json.loads(meta["skipped"])))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as error:
            raise ValueError(f"{os.fspath(path)!r} holds an inconsistent TraceSummary: {error!r}") from None


# --- trace_many -----------------------------------------------------------------------------


def _prepare(arch: Arch, tokenizer: Any,
             facts: Any) -> list[tuple[list[int], tuple[int, int], list[int] | None, str]]:
    """``(ids, subject span, answer ids or None, prompt)`` of each fact, checked."""
    if isinstance(facts, (str, bytes)) or not isinstance(facts, Sequence) or not facts:
        raise TypeError("facts must be a non-empty list of (prompt, subject, answer) tuples")
    prepared = []
    for i, fact in enumerate(facts):
        if not (isinstance(fact, (tuple, list)) and len(fact) == 3):
            raise TypeError(f"facts[{i}] must be a (prompt, subject, answer) tuple; got {fact!r}")
        prompt, subject, answer = fact
        ids = prompt_ids(arch, tokenizer, prompt)
        span = subject_span(tokenizer, prompt, subject)
        answer = None if answer is None else answer_ids(tokenizer, answer, name=f"facts[{i}] answer")
        if answer is not None and len(ids) + len(answer) - 1 > arch.n_ctx:
            raise ValueError(f"facts[{i}]: the prompt plus its answer exceed the model's context "
                             f"(n_ctx={arch.n_ctx})")
        prepared.append((ids, span, answer, prompt))
    return prepared


def _gives(arch: Arch, ids: list[int], answer: list[int]) -> bool:
    """Whether the model's greedy continuation of ``ids`` is ``answer`` (every token the top-1)."""
    with torch.no_grad():
        h = arch.final_hidden(torch.tensor([ids + answer[:-1]], device=arch.device))[0, len(ids) - 1 :]
        return arch.unembed(h).argmax(-1).tolist() == answer


def trace_many(model: Any, tokenizer: Any, facts: Sequence[tuple[str, str, str | None]], *,
               kind: str = "resid", window: int = 10, noise: Noise | float = Noise(),
               require_correct: bool = True, batch_size: int = 256, progress: bool = True,
               group: Any = None, **legacy: Any) -> TraceSummary:
    """Trace every ``(prompt, subject, answer)`` of ``facts`` and average in ROME's buckets.

    Each entry of ``facts`` is a ``(prompt, subject, answer)`` tuple (or list) of strings:

    - ``prompt``: the text whose next token is the answer, e.g.
      ``"The Eiffel Tower is located in the city of"`` (read as the tokenizer gives it to the
      model, with its start token if it puts one; see :func:`reslens.tracing.subject_span`);
    - ``subject``: the subject exactly as it appears in the prompt (its first occurrence is the
      span corrupted), e.g. ``"The Eiffel Tower"``; the buckets are positions relative to it;
    - ``answer``: the answer as it follows the prompt, leading space included (``" Paris"``); it
      may be several tokens (``" San Francisco"``), or ``None`` for the model's own top-1.

    ``noise.embedding_std=None`` = std of the embeddings of all the facts' subject tokens (ROME's
    ``collect_embedding_std`` over the known facts), so every fact gets the same ``nu``. The
    probability traced is that of the answer's first token (an answer may have several).
    With ``require_correct`` (ROME), a fact is traced only when the model's greedy continuation
    of the prompt is the whole answer; the others are listed in ``skipped``. ``answer=None``
    traces the model's own top-1.

    ``group``: a torch.distributed process group (None = the default group under ``torchrun``,
    else one process; False = one process). Rank ``r`` of ``W`` traces the facts ``i`` with
    ``i % W == r`` (each fact's noise is drawn from ``noise.seed`` alone, so where it runs does
    not change it); the traces are gathered in fact order and every rank returns the
    one-process summary. Every rank must be given the same facts and options (checked).
    """
    from tqdm.auto import tqdm

    shard = shard_of(group)
    with shard.together():  # an argument refused on one rank is refused on every rank
        noise = noise_of(noise, legacy, "trace_many")
        arch = adapter(model)
        kind = check_choice(kind, KINDS, "kind")
        window = check_int(window, "window", low=1)
        require_correct = check_bool(require_correct, "require_correct")
        prepared = _prepare(arch, tokenizer, facts)
        if noise.embedding_std is None:
            subjects = [i for ids, (s, e), _, _ in prepared for i in ids[s:e]]
            noise = replace(noise, embedding_std=embedding_std(arch, subjects))

    facts_read = [(ids, span, answer) for ids, span, answer, _ in prepared]
    shard.same((facts_read, kind, window, noise, require_correct), "the facts and tracing options")
    shard.same_model(arch)
    traced: list[tuple[int, TraceResult | None]] = []  # (fact, its trace or None = skipped)
    facts_bar = tqdm(list(shard.take(prepared)), desc=f"causal traces ({kind})", unit="fact",
                     disable=not (progress and shard.primary))
    with shard.together():  # a fact that fails on one rank stops every rank at the gather
        for i, (ids, span, answer, prompt) in facts_bar:
            if answer is not None and require_correct and not _gives(arch, ids, answer):
                traced.append((i, None))
                continue
            traced.append((i, causal_trace_ids(
                arch, torch.tensor(ids), span, answer_id=None if answer is None else answer[0], kind=kind,
                window=window, noise=noise, batch_size=batch_size, tokenizer=tokenizer,
                token_strings=prompt_pieces(tokenizer, prompt, ids),
            )))
    if shard.parallel:  # every rank's traces, in fact order
        traced = sorted((pair for part in shard.gather_objects(traced) for pair in part), key=lambda p: p[0])
    results = [r for _, r in traced if r is not None]
    skipped = [i for i, r in traced if r is None]
    if not results:
        raise ValueError(f"the model gives none of the {len(facts)} facts' answers; nothing to average "
                         "(pass require_correct=False to trace them anyway)")
    return _summarise(kind, results, tuple(skipped))


def _summarise(kind: str, results: Sequence[TraceResult], skipped: tuple[int, ...]) -> TraceSummary:
    n_layer = results[0].n_layer
    per_bucket: list[list[torch.Tensor]] = [[] for _ in BUCKETS]
    for r in results:
        for b, positions in enumerate(_bucket_positions(r.subject_span, r.n_tokens)):
            if positions:
                per_bucket[b].append(r.indirect_effect[:, positions].mean(1))
    mean = torch.full((len(BUCKETS), n_layer), float("nan"))
    low, high = mean.clone(), mean.clone()
    count = torch.tensor([len(v) for v in per_bucket])
    for b, values in enumerate(per_bucket):
        if not values:
            continue
        x = torch.stack(values).double()  # [facts, n_layer]
        mean[b] = x.mean(0).float()
        if len(values) > 1:
            half = _t975(len(values) - 1) * x.std(0) / math.sqrt(len(values))
            low[b], high[b] = (x.mean(0) - half).float(), (x.mean(0) + half).float()
    return TraceSummary(
        kind=kind, buckets=BUCKETS, mean=mean, low=low, high=high, count=count,
        clean_prob=sum(r.clean_prob for r in results) / len(results),
        corrupted_prob=sum(r.corrupted_prob for r in results) / len(results),
        results=tuple(results), skipped=skipped,
    )


def _t975(dof: int) -> float:
    """Two-sided 95% Student t quantile (scipy, which scikit-learn already requires)."""
    from scipy.stats import t

    return float(t.ppf(0.975, dof))
