"""Per-head interventions: zero-, mean- and resample-ablation of heads, as :func:`reslens.patch` edits.

A head's output ``z_h`` is its slice of the ``attn_z`` site (the attention output projection's input,
head ``h`` in columns ``h * d_head .. (h + 1) * d_head``), so replacing that slice changes exactly what
the head writes, through the projection and any output norm after it, and nothing else; under
grouped-query attention each query head is its own slice. :func:`head_ablation` returns the edits;
use them with :func:`reslens.patch`, or as ``patches=`` of :func:`reslens.generate` (they take the
``start`` of each step, so positions are the whole sequence's).

- ``"zero"``: ``z_h = 0``;
- ``"mean"``: ``z_h`` = its mean over the real positions of ``reference`` (inputs to capture, or
  :class:`~reslens.residuals.Residuals` holding ``attn_z``);
- ``"resample"``: ``z_h`` = the head's output on ``reference`` at the same sequence and position
  (``reference`` as wide as the run it patches, one row for every sequence or one row for all).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from reslens._checks import check_choice
from reslens._inputs import as_batch
from reslens.arch import Arch, adapter
from reslens.residuals import Residuals

__all__ = ["head_ablation", "parse_heads"]


def parse_heads(heads: Any, arch: Arch) -> list[tuple[int, int]]:
    """``heads`` as sorted unique ``(layer, head)`` pairs: pairs, ``"layer.head"`` strings, or a mix."""
    if isinstance(heads, (str, tuple)):
        heads = [heads]
    if not isinstance(heads, Iterable):
        raise TypeError("heads must be (layer, head) pairs or 'layer.head' strings; "
                        f"got {type(heads).__name__}")
    out = set()
    for item in heads:
        pair = item
        if isinstance(item, str):
            try:
                pair = tuple(int(x) for x in item.split("."))
            except ValueError:
                pair = None
        ints = isinstance(pair, tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
        if not (ints and len(pair) == 2):
            raise ValueError(f"heads: {item!r} is not a (layer, head) pair or a 'layer.head' string")
        layer, head = pair
        if not (0 <= layer < arch.n_layer and 0 <= head < arch.n_head):
            raise ValueError(f"heads: {item!r} is out of range: layers 0..{arch.n_layer - 1}, heads "
                             f"0..{arch.n_head - 1}")
        out.add(pair)
    if not out:
        raise ValueError("heads is empty; name at least one (layer, head)")
    return sorted(out)


def _reference_z(arch: Arch, reference: Any, layers: list[int], tokenizer: Any) -> Residuals:
    """``attn_z`` of ``reference`` at ``layers``: given (Residuals) or captured (inputs)."""
    if isinstance(reference, Residuals):
        reference.require("attn_z", what="mean- or resample-ablation")
        missing = [layer for layer in layers if layer not in reference.blocks]
        if missing:
            raise ValueError(f"reference holds attn_z of blocks {reference.blocks}; the heads need {missing}")
        return reference
    from reslens.hooks import _capture

    batch = as_batch(reference, arch, tokenizer)
    return _capture(arch, batch, sites=("attn_z",), layers=tuple(layers))


def _positions(positions: Any) -> torch.Tensor | None:
    if positions is None:
        return None
    t = torch.as_tensor(positions)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1 or t.dtype.is_floating_point or t.dtype == torch.bool or bool((t < 0).any()):
        raise ValueError(f"positions must be non-negative whole-sequence positions (ints); got {positions!r}")
    return t.long()


def head_ablation(
    model: Any,
    heads: Any,
    *,
    how: str = "zero",
    reference: Any = None,
    positions: Any = None,
    tokenizer: Any = None,
) -> dict[tuple[str, int], Any]:
    """:func:`reslens.patch` edits that ablate ``heads`` (``[(17, 3), "18.6"]``) at ``positions`` (None: all).

    ``how``: ``"zero"``, ``"mean"`` or ``"resample"`` (module docstring); ``reference``: the inputs (ids,
    a Batch, texts with ``tokenizer=``) or captured Residuals with ``attn_z`` that mean- and
    resample-ablation read. ``positions``: whole-sequence positions (the same in every row).

    >>> import torch, reslens
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> edits = head_ablation(model, ["1.0"])
    >>> with reslens.patch(model, edits):
    ...     z = reslens.capture(model, torch.tensor([[1, 2, 3]]), sites="attn_z").attn_z[1, 0]
    >>> float(z[:, :8].abs().max())
    0.0
    """
    arch = adapter(model)
    check_choice(how, ("zero", "mean", "resample"), "how")
    pairs = parse_heads(heads, arch)
    at = _positions(positions)
    layers = sorted({layer for layer, _ in pairs})
    if how == "zero":
        if reference is not None:
            raise ValueError("reference is read by mean- and resample-ablation; zero-ablation needs none")
        source = None
    elif reference is None:
        raise ValueError(f"how={how!r} needs reference= (the inputs, or Residuals with attn_z, it reads)")
    else:
        source = _reference_z(arch, reference, layers, tokenizer)
    d = arch.d_head
    edits = {}
    for layer in layers:
        cols = torch.cat([torch.arange(h * d, (h + 1) * d) for lay, h in pairs if lay == layer])
        value = None
        if source is not None:
            z = source.get("attn_z", layer)  # [batch, pos, n_head * d_head]
            mask = source.attention_mask.to(z.device)
            value = z[mask].mean(0)[cols] if how == "mean" else z[..., cols]
        edits[("attn_z", layer)] = _edit(cols, value, how, at)
    return edits


def _edit(cols: torch.Tensor, value: torch.Tensor | None, how: str, at: torch.Tensor | None) -> Any:
    """One layer's ``attn_z`` edit: ``cols`` set to 0, to ``value [len(cols)]`` or to ``value[b, p]``."""

    def edit(z: torch.Tensor, start: int) -> torch.Tensor:
        n = z.shape[1]
        where = torch.arange(start, start + n, device=z.device)
        keep = torch.ones_like(where, dtype=torch.bool) if at is None else torch.isin(where, at.to(z.device))
        if not bool(keep.any()):
            return z
        z = z.clone()
        c = cols.to(z.device)
        if how == "zero":
            new = torch.zeros((z.shape[0], n, len(c)), dtype=z.dtype, device=z.device)
        elif how == "mean":
            new = value.to(device=z.device, dtype=z.dtype).expand(z.shape[0], n, len(c))
        else:
            if value.shape[1] < start + n or value.shape[0] not in (1, z.shape[0]):
                raise ValueError(f"resample-ablation: reference is {tuple(value.shape[:2])} (batch, pos); "
                                 f"this run needs {z.shape[0]} rows (or 1) and positions up to {start + n}")
            new = value[:, start : start + n].to(device=z.device, dtype=z.dtype).expand(z.shape[0], n, len(c))
        part = z[..., c]
        part[:, keep] = new[:, keep]
        z[..., c] = part
        return z

    return edit
