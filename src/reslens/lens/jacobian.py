"""The Jacobian lens (Gurnee et al. 2026, "Verbalizable Representations Form a Global Workspace"): fitting it.

Each ``resid`` layer ``l`` gets one ``d_model x d_model`` matrix, the average over windows ``w`` of

    J_l(w) = 1/|V| sum_{t in V} sum_{t' in V, t' >= t} d resid_{n_layer}[t'] / d resid_l[t],

``V`` the window's valid positions, and the lens reads ``W_U norm(J_l h_l)`` through the model's own
final norm and unembedding (:class:`~reslens.lens.JacobianLens`; ``J = I`` is the logit lens). This is
TransformerLens's estimator (``transformer_lens/tools/analysis/jacobian_lens.py``, 4.3, "the
reference estimator" of ``anthropics/jacobian-lens``): an effect on *later* positions counts (summed
over targets), sources and windows are averaged, each window weighing the same. ``V``: the window's
positions from ``skip_first`` on (counted from the row's first position, its start tokens included;
TransformerLens's default 16 leaves out the attention-sink positions), less the last one (it has no
next token in the window), less start tokens and pads.

The Jacobian is exact, never sampled: one forward per batch of windows, then ``d_model``
vector-Jacobian products, several output directions per backward pass where they are small
(``torch.autograd.grad`` with ``is_grads_batched``), each a one-hot cotangent planted at every valid
target position at once (causality makes the gradient at ``t`` the sum over ``t' >= t``). Where
TransformerLens freezes the parameters, reslens leaves the model as it is and roots the graph at a
copy of the embedding.

The sums over windows are float64 and, under a process group (``group=``, see
:mod:`reslens._distributed`; rank ``r`` reads the batches ``i`` with ``i % world == r``), merged by
all-reduce, so every rank gets the one-process lens up to the order of float64 additions.
``resid 0`` (the embedding) is fitted too; the reference artifacts (:func:`load_jacobian_lens`) start at
the first block's output.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from reslens._checks import check_bool, check_int
from reslens._distributed import Shard, shard_of
from reslens._inputs import Batch, as_batch
from reslens._stream import batches, chunks
from reslens._text import html_table
from reslens.arch import Arch, adapter
from reslens.hooks import patch
from reslens.lens._data import corpus_windows, model_name
from reslens.lens.values import JacobianLens

__all__ = ["fit_jacobian_lens", "load_jacobian_lens", "JacobianSums"]

#: numbers of source gradients one backward pass may hold: several output directions per pass where they
#: are small (4x faster on the tiny test models), one at a time where one is large (on CPUs, larger
#: passes were no faster at the embedded GPT-2's size and slower beyond)
_GRADIENT_BUDGET = 2**20


def valid_positions(batch: Batch, skip_first: int) -> torch.Tensor:
    """``[batch, pos]`` bool: the window positions the fit reads (see the module docstring)."""
    real = batch.attention_mask.bool()
    counted = real if batch.special_mask is None else real & ~batch.special_mask.bool()
    index = torch.arange(real.shape[1], device=real.device)
    last = torch.where(real, index, -1).amax(1)  # each row's last real position
    return counted & (batch.position_ids >= skip_first) & (index < last[:, None])


def _graph(arch: Arch, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A forward with the graph kept: ``(resid n_layer, [resid 0 .. n_layer-1])``, ``[batch, pos, d]``."""
    held: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Any:
        def fn(t: torch.Tensor) -> torch.Tensor | None:
            if layer == 0:  # a leaf copy roots the graph, whether or not the weights require grad
                t = t.detach().requires_grad_(True)
                held[0] = t
                return t
            held[layer] = t
            return None

        return fn

    with torch.enable_grad(), patch(arch, {("resid", i): keep(i) for i in range(arch.n_layer + 1)}):
        arch.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                  position_ids=batch.position_ids, use_cache=False)
    return held[arch.n_layer], [held[i] for i in range(arch.n_layer)]


class JacobianSums:
    """Per layer the float64 sum over windows of each window's mean Jacobian, merged exactly over ranks.

    ``total: [n_layer, d_model (out), d_model (in)]``; ``n_windows`` counts the windows with a valid
    position, ``n_tokens`` their valid positions.
    """

    def __init__(self, n_layer: int, d_model: int, device: Any = "cpu") -> None:
        self.total = torch.zeros(n_layer, d_model, d_model, dtype=torch.float64, device=device)
        self.n_windows = 0
        self.n_tokens = 0

    def __repr__(self) -> str:
        n_layer, d_model, _ = self.total.shape
        return (f"JacobianSums(n_layer={n_layer}, d_model={d_model}, windows={self.n_windows}, "
                f"tokens={self.n_tokens})")

    def _repr_html_(self) -> str:
        n_layer, d_model, _ = self.total.shape
        rows = [("layers", n_layer), ("d_model", d_model), ("windows", self.n_windows),
                ("tokens", self.n_tokens)]
        return html_table(repr(self), (), rows)

    def add(self, arch: Arch, batch: Batch, skip_first: int) -> None:
        """Add the windows of a checked ``batch`` (on the model's device): a forward, ``d_model`` products."""
        valid = valid_positions(batch, skip_first)
        count = valid.sum(1)  # [batch]
        if int(count.sum()) == 0:
            return
        weights = valid.double() / count.clamp(min=1)[:, None].double()  # [batch, pos]: a mean per window
        target, sources = _graph(arch, batch)
        plant = valid.to(target.dtype)
        d = arch.d_model
        per_pass = max(1, min(d, _GRADIENT_BUDGET // max(1, target.numel() * len(sources))))
        start = 0
        while start < d:
            stop = min(d, start + per_pass)
            try:
                grads = self._vjps(target, sources, plant, start, stop)
            except RuntimeError:  # no room for (or no batching rule behind) several directions: one at a time
                if per_pass == 1:
                    raise
                per_pass = 1
                continue
            for layer, grad in enumerate(grads):  # [k, batch, pos, d_in]
                self.total[layer, start:stop] += torch.einsum("bp,kbpd->kd", weights, grad.double())
            start = stop
        self.n_windows += int((count > 0).sum())
        self.n_tokens += int(count.sum())

    @staticmethod
    def _vjps(target: torch.Tensor, sources: list[torch.Tensor], plant: torch.Tensor, start: int,
              stop: int) -> tuple[torch.Tensor, ...]:
        """Rows ``start:stop`` of every source's Jacobian per position, ``[k, batch, pos, d_in]`` each."""
        k = stop - start
        cotangent = torch.zeros((k, *target.shape), dtype=target.dtype, device=target.device)
        rows = torch.arange(k, device=target.device)
        cotangent[rows, :, :, start + rows] = plant  # output direction start + i at every valid target
        if k == 1:
            grads = torch.autograd.grad(target, sources, cotangent[0], retain_graph=True)
            return tuple(g[None] for g in grads)
        # the graph is kept until the batch is done (freed on return), so a failed pass can be retried
        return torch.autograd.grad(target, sources, cotangent, retain_graph=True, is_grads_batched=True)

    def merge(self, shard: Shard) -> None:
        """Make these the sums of every rank's windows (the same on every rank): float64 all-reduces."""
        if not shard.parallel:
            return
        counts = shard.sum(torch.tensor([self.n_windows, self.n_tokens], dtype=torch.float64,
                                        device=self.total.device))
        self.total = shard.sum(self.total)
        self.n_windows, self.n_tokens = (int(round(float(c))) for c in counts)

    def mean(self) -> torch.Tensor:
        """``[n_layer, d_model, d_model]`` float32 on the CPU: the average over windows."""
        return (self.total / self.n_windows).float().cpu()


def fit_jacobian_lens(
    model: Any,
    corpus: Any,
    *,
    tokenizer: Any = None,
    max_tokens: int = 12_800,
    max_length: int = 128,
    batch_size: int = 8,
    skip_first: int = 16,
    progress: bool = True,
    group: Any = None,
) -> JacobianLens:
    """Fit the Jacobian lens of ``resid`` layers ``0..n_layer-1`` over ``corpus`` (see the module docstring).

    ``corpus``: a ``.txt`` file, a folder of them, a list of files or an iterable of strings, read as
    windows of ``max_length`` tokens until ``max_tokens`` tokens, each led by the tokenizer's start
    tokens (never fitted on; see :mod:`reslens._stream`). The defaults are TransformerLens's: windows of
    128 tokens, the first ``skip_first=16`` positions of each left out, and 100 windows ("usable"; the
    published lenses use up to 1,000). Cost: one forward and ``d_model`` vector-Jacobian products per
    batch of ``batch_size`` windows, in the model's dtype (float32 is the faithful fit); the sums are
    float64. ``group``: a torch.distributed process group; None = the default group under torchrun, else
    one process; every rank returns the merged lens. Shows a tqdm bar unless ``progress=False``.

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> _ = torch.manual_seed(0)
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=8, n_head=2, vocab_size=40)).eval()
    >>> class Chars:  # a toy tokenizer: one id per character
    ...     def __call__(self, texts, add_special_tokens=False):
    ...         return {"input_ids": [[ord(c) % 40 for c in t] for t in texts]}
    >>> lens = fit_jacobian_lens(model, ["the quick brown fox " * 20], tokenizer=Chars(), max_length=40,
    ...                          progress=False)
    >>> lens, lens.config["n_tokens"], tuple(lens.weight.shape)
    (JacobianLens(n_layer=2, d_model=8, model=GPT2LMHeadModel, n_tokens=230), 230, (2, 8, 8))
    """
    from tqdm.auto import tqdm

    shard = shard_of(group)
    with shard.together():  # an argument refused on one rank is refused on every rank
        arch = adapter(model)
        check_int(batch_size, "batch_size", low=1)
        check_int(skip_first, "skip_first", low=0)
        check_bool(progress, "progress")
        if arch.model.training:
            raise ValueError("the model is in training mode (dropout would make every Jacobian random); "
                             "call model.eval() first")
        windows = corpus_windows(arch, corpus, tokenizer, max_tokens, max_length)
    shard.same((len(windows), batch_size, skip_first), "the number of windows, batch_size and skip_first")
    shard.same_model(arch)
    sums = JacobianSums(arch.n_layer, arch.d_model, arch.device)
    mine = sum(len(chunk) for _, chunk in shard.take(chunks(windows, batch_size)))
    with shard.together(), tqdm(total=mine, desc="Jacobian lens", unit="window",
                                disable=not progress or not shard.primary) as bar:
        for _, batch in shard.take(batches(tokenizer, windows, batch_size)):
            sums.add(arch, as_batch(batch, arch), skip_first)
            bar.update(batch.input_ids.shape[0])
    sums.merge(shard)
    if sums.n_windows == 0:
        raise ValueError(
            f"no window of the corpus has a position past skip_first={skip_first} before its last one "
            f"(windows of at most {max_length} tokens): expected longer windows or a smaller skip_first"
        )
    config = {
        "model": model_name(arch),
        "model_fingerprint": arch.fingerprint,
        "n_tokens": sums.n_tokens,
        "n_windows": sums.n_windows,
        "skip_first": skip_first,
        "max_length": max_length,
        "fit": "average Jacobian of the last residual (Gurnee et al. 2026; TransformerLens's estimator)",
    }
    return JacobianLens(sums.mean(), torch.zeros(arch.n_layer, arch.d_model), config)


def load_jacobian_lens(path: str | os.PathLike, *, model: Any = None) -> JacobianLens:
    """Read a Jacobian-lens artifact: TransformerLens's ``JacobianLens.save``, ``anthropics/jacobian-lens``.

    A ``.pt`` file read with ``torch.load(weights_only=True)`` (tensors and plain values only, never
    code; :mod:`reslens.lens._jacobian_lens_format`), e.g. one of the lenses published at
    ``neuronpedia/jacobian-lens``. Its layer ``s`` (the output of block ``s``) becomes ``resid`` layer
    ``s + 1``; it has no Jacobian for ``resid 0``, so read it with ``layers=range(1, n_layer + 1)``. With
    ``model=`` (recommended: the artifact records no fingerprint of its weights) the width, the layers and
    the artifact's target layer are checked against the model, and a ``ValueError`` says what differs.
    """
    from reslens.lens._jacobian_lens_format import read_artifact

    arch = None if model is None else adapter(model)
    shown = os.fspath(path)
    lens = read_artifact(Path(shown).expanduser(), JacobianLens, arch)
    if arch is not None:
        try:
            lens.check(arch)
        except ValueError as error:
            raise ValueError(f"{shown}: {error}") from None
    return lens
