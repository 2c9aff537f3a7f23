"""Exact activation capture from an unmodified HuggingFace GPT-2: the only module that
registers hooks.

``capture`` runs the forward pass itself and returns :class:`Residuals`; ``trace`` is a
context manager that records a forward the caller runs; ``patch`` is a context manager that
replaces sites during the forwards the caller runs (interventions: coefficient edits,
causal-tracing noise and restoration). All remove every hook they added on exit (also on
exceptions) in reverse order, and never change weights, the ``training`` flag or
``requires_grad``.

Sites and shapes (``L`` = number of kept layers or blocks):

============  =====================================  ==========================================
site          shape                                   what it is
============  =====================================  ==========================================
resid         ``[L, batch, pos, d_model]``            input of block ``l`` (``resid[0] = wte+wpe``);
                                                      layer ``n_layer`` = raw residual before ``ln_f``
resid_mid     ``[L, batch, pos, d_model]``            after attention: ``resid[l] + attn_out[l]``
attn_out      ``[L, batch, pos, d_model]``            attention output (after ``attn.c_proj``)
mlp_out       ``[L, batch, pos, d_model]``            MLP output (after ``mlp.c_proj``)
mlp_act       ``[L, batch, pos, d_mlp]``              post-GELU coefficients, input of ``c_proj``
attn_pattern  ``[L, batch, head, query, key]``        softmax attention (float32, recomputed from q, k)
attn_z        ``[L, batch, pos, n_head * d_head]``    per-head attention outputs ``z`` side by side (the
                                                      input of ``attn.c_proj``; head ``h`` writes
                                                      ``z_h @ W_O[h]``)
final         ``[batch, pos, d_model]``               ``ln_f`` output
logits        ``[batch, pos, d_vocab]``               the model's logits
============  =====================================  ==========================================
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from reslens._checks import check_device, check_dtype, check_ids, check_layers, check_mask, check_sites
from reslens._gpt2 import GPT2

__all__ = [
    "SITES", "BLOCK_SITES", "PATCH_SITES", "Batch", "Residuals", "Trace", "Patch", "capture", "trace", "patch", "tokenize",
]

BLOCK_SITES = ("resid_mid", "attn_out", "mlp_out", "mlp_act", "attn_pattern", "attn_z")
SITES = ("resid", *BLOCK_SITES, "final", "logits")
#: Sites :func:`patch` can replace: ``resid`` layer ``l`` is the input of block ``l`` (of
#: ``ln_f`` for ``l = n_layer``); the others are per block, as in :func:`capture`.
PATCH_SITES = ("resid", "attn_out", "mlp_out", "mlp_act")


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[batch, pos]`` that count real tokens only (0 for left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass(frozen=True)
class Batch:
    """Token ids with their padding mask and the positions the model sees.

    ``input_ids: [batch, pos]`` (int), ``attention_mask: [batch, pos]`` (bool, True = real
    token), ``position_ids: [batch, pos]`` (default: counted from the mask, so padding on
    either side gives each sequence the positions of running it alone).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not isinstance(self.input_ids, torch.Tensor) or self.input_ids.ndim != 2:
            got = tuple(self.input_ids.shape) if isinstance(self.input_ids, torch.Tensor) else type(self.input_ids)
            raise ValueError(f"Batch.input_ids must be a 2-D tensor [batch, pos]; got {got}")
        mask = check_mask(self.attention_mask, self.input_ids, name="Batch.attention_mask")
        object.__setattr__(self, "attention_mask", mask)
        if self.position_ids is None:
            object.__setattr__(self, "position_ids", positions_from_mask(mask))
        elif not isinstance(self.position_ids, torch.Tensor) or self.position_ids.shape != self.input_ids.shape:
            raise ValueError(f"Batch.position_ids must be a tensor shaped like input_ids {tuple(self.input_ids.shape)}")

    @classmethod
    def from_ids(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Batch:
        """A batch from ids ``[batch, pos]``; no mask means every token is real."""
        if attention_mask is None:
            if not isinstance(input_ids, torch.Tensor):
                raise TypeError(f"input_ids must be a torch.Tensor; got {type(input_ids).__name__}")
            attention_mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        return cls(input_ids, attention_mask)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Number of real tokens per sequence ``[batch]``."""
        return self.attention_mask.sum(-1)

    def to(self, device: str | torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device))


def tokenize(tokenizer: Any, texts: str | Sequence[str], *, padding_side: str = "right") -> Batch:
    """Tokenize texts one by one (no special tokens added) and pad them into a :class:`Batch`.

    Padding uses the tokenizer's pad id (its end-of-text id for GPT-2, which has no pad
    token); the mask marks pads, so their id never matters.

    ``tokenize(tokenizer, ["The cat", "A much longer text"], padding_side="left")`` gives a
    ``[2, n]`` batch whose first row starts with pads.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a string or a sequence of strings")
    if not texts:
        raise ValueError("texts is empty; give at least one string")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
    if tokenizer is None or not callable(tokenizer):
        raise TypeError("tokenizer must be a HuggingFace tokenizer (pass tokenizer= with text inputs)")
    encoded = [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"texts {empty} tokenize to no tokens; every text needs at least one token")
    return pad_ids(encoded, pad_id=pad_token_id(tokenizer), padding_side=padding_side)


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad id, else its end-of-text id, else 0."""
    ids = (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
    return next((i for i in ids if i is not None), 0)


def pad_ids(encoded: Sequence[Sequence[int]], *, pad_id: int = 0, padding_side: str = "right") -> Batch:
    """Token id lists of any lengths -> a padded :class:`Batch` ``[len(encoded), longest]``."""
    n_pos = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), n_pos), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), n_pos), dtype=torch.bool)
    for row, ids in enumerate(encoded):
        span = slice(n_pos - len(ids), n_pos) if padding_side == "left" else slice(0, len(ids))
        input_ids[row, span] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, span] = True
    return Batch(input_ids, attention_mask)


def as_batch(inputs: Any, g: GPT2, tokenizer: Any = None) -> Batch:
    """Turn ids, a :class:`Batch`, a tokenizer output mapping, or text into a checked Batch."""
    if isinstance(inputs, Batch):
        batch = inputs
    elif isinstance(inputs, torch.Tensor):
        batch = Batch.from_ids(check_ids(inputs, d_vocab=g.d_vocab, n_positions=g.n_positions))
    elif isinstance(inputs, Mapping) and "input_ids" in inputs:
        ids = inputs["input_ids"]
        ids = torch.as_tensor(ids) if not isinstance(ids, torch.Tensor) else ids
        mask = inputs.get("attention_mask")
        batch = Batch.from_ids(
            check_ids(ids, d_vocab=g.d_vocab, n_positions=g.n_positions),
            torch.as_tensor(mask) if mask is not None else None,
        )
    elif isinstance(inputs, str) or (
        isinstance(inputs, Sequence) and len(inputs) > 0 and all(isinstance(t, str) for t in inputs)
    ):
        if tokenizer is None:
            raise TypeError("inputs are text, so tokenizer= is required (e.g. from reslens.load_model())")
        batch = tokenize(tokenizer, inputs)
    elif isinstance(inputs, Sequence) and len(inputs) == 0:
        raise ValueError("inputs is empty; give token ids [batch, pos], a Batch, or a list of strings")
    else:
        raise TypeError(
            "inputs must be a [batch, pos] tensor of token ids, a reslens Batch, a tokenizer output "
            f"with 'input_ids', or a list of strings with tokenizer=; got {type(inputs).__name__}"
        )
    check_ids(batch.input_ids, d_vocab=g.d_vocab, n_positions=g.n_positions)
    return batch.to(g.device)


@dataclass(frozen=True)
class Residuals:
    """Activations captured from one forward pass. Shapes are checked on construction.

    ``layers`` are the residual-stream layers kept in ``resid`` (0..n_layer); ``blocks`` the
    blocks kept in the per-block sites (0..n_layer-1). ``resid[i]`` is layer ``layers[i]``;
    use :meth:`get` to index by the true layer number. Sites not captured are ``None``.

    - ``attention_mask: [batch, pos]`` bool (True = real token); ``input_ids``, ``position_ids`` ``[batch, pos]``
    - ``resid: [len(layers), batch, pos, d_model]``
    - ``resid_mid``, ``attn_out``, ``mlp_out``: ``[len(blocks), batch, pos, d_model]``
    - ``mlp_act: [len(blocks), batch, pos, d_mlp]``; ``attn_pattern: [len(blocks), batch, head, pos, pos]``
    - ``attn_z: [len(blocks), batch, pos, n_head * d_head]`` (input of ``attn.c_proj``)
    - ``final: [batch, pos, d_model]``; ``logits: [batch, pos, d_vocab]``
    """

    attention_mask: torch.Tensor
    layers: tuple[int, ...] = ()
    blocks: tuple[int, ...] = ()
    input_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    resid: torch.Tensor | None = None
    resid_mid: torch.Tensor | None = None
    attn_out: torch.Tensor | None = None
    mlp_out: torch.Tensor | None = None
    mlp_act: torch.Tensor | None = None
    attn_pattern: torch.Tensor | None = None
    attn_z: torch.Tensor | None = None
    final: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    _meta: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        object.__setattr__(self, "blocks", tuple(int(block) for block in self.blocks))
        if self.attention_mask.ndim != 2:
            raise ValueError(f"attention_mask must be [batch, pos]; got shape {tuple(self.attention_mask.shape)}")
        batch, n_pos = self.attention_mask.shape
        for name in ("input_ids", "position_ids"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (batch, n_pos):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {(batch, n_pos)}")
        expect = {"resid": (len(self.layers), batch, n_pos)}
        expect.update({site: (len(self.blocks), batch, n_pos) for site in ("resid_mid", "attn_out", "mlp_out", "mlp_act", "attn_z")})
        expect.update({"final": (batch, n_pos), "logits": (batch, n_pos)})
        for site, lead in expect.items():
            t = getattr(self, site)
            if t is not None and tuple(t.shape[: len(lead)]) != lead:
                raise ValueError(f"{site} has shape {tuple(t.shape)}; expected leading dims {lead}")
        if self.attn_pattern is not None:
            p = self.attn_pattern
            if p.ndim != 5 or (p.shape[0], p.shape[1], p.shape[3], p.shape[4]) != (len(self.blocks), batch, n_pos, n_pos):
                raise ValueError(
                    f"attn_pattern has shape {tuple(p.shape)}; expected {(len(self.blocks), batch, 'head', n_pos, n_pos)}"
                )

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites that hold a tensor."""
        return tuple(site for site in SITES if getattr(self, site) is not None)

    def get(self, site: str, layer: int | None = None) -> torch.Tensor:
        """The tensor of ``site`` at true layer/block number ``layer`` (not needed for final/logits)."""
        check_sites((site,), SITES, name="site")
        tensor = getattr(self, site)
        if tensor is None:
            raise ValueError(f"site {site!r} was not captured; captured sites: {', '.join(self.sites) or 'none'}")
        if site in ("final", "logits"):
            return tensor
        kept = self.layers if site == "resid" else self.blocks
        if layer not in kept:
            raise ValueError(f"layer={layer} was not captured for {site!r}; kept layers: {kept}")
        return tensor[kept.index(layer)]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Residuals:
        """A copy on ``device``; ``dtype`` casts the floating activations (not ids or the mask)."""
        check_dtype(dtype)
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                cast = dtype if (dtype is not None and value.dtype.is_floating_point) else None
                changes[f.name] = value.to(device=device, dtype=cast)
        return replace(self, **changes)

    def save(self, path: str | os.PathLike) -> None:
        """Write every tensor to a safetensors file (no pickle); layer numbers go in its metadata."""
        from safetensors.torch import save_file

        tensors = {
            f.name: getattr(self, f.name).detach().contiguous().cpu()
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        meta = {"layers": json.dumps(self.layers), "blocks": json.dumps(self.blocks), "format": "reslens.Residuals/1"}
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Residuals:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != "reslens.Residuals/1":
                raise ValueError(f"{os.fspath(path)!r} is not a reslens Residuals file (format={meta.get('format')!r})")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        return cls(layers=tuple(json.loads(meta["layers"])), blocks=tuple(json.loads(meta["blocks"])), **tensors)


class _StopForward(Exception):
    """Raised by the last needed hook so ``capture`` skips the rest of the forward pass."""


class _SiteBuffer:
    """Collects one site's per-layer tensors; copies into one preallocated tensor when detached."""

    def __init__(self, n: int, dtype: torch.dtype | None, device: torch.device | None, detach: bool):
        self.n, self.dtype, self.device, self.detach = n, dtype, device, detach
        self.parts: list[torch.Tensor | None] = [None] * n
        self.buffer: torch.Tensor | None = None
        self.filled = 0

    def write(self, i: int, t: torch.Tensor) -> None:
        if self.n == 1:  # a whole-model site (final, logits): keep the tensor itself, no copy
            t = t.detach() if self.detach else t
            self.parts[0] = t.to(device=self.device, dtype=self.dtype)
        elif self.detach:
            if self.buffer is None:
                self.buffer = torch.empty(
                    (self.n, *t.shape), dtype=self.dtype or t.dtype, device=self.device or t.device
                )
            self.buffer[i].copy_(t.detach())
        else:
            self.parts[i] = t.to(device=self.device, dtype=self.dtype)
        self.filled += 1

    def result(self) -> torch.Tensor | None:
        if self.filled < self.n:
            return None
        if self.n == 1:
            return self.parts[0][None]  # type: ignore[index]
        if self.detach:
            return self.buffer
        return torch.stack(self.parts)  # type: ignore[arg-type]


class Trace:
    """Hooks that record the sites of a forward pass; use via :func:`capture` or :func:`trace`.

    After a forward, :attr:`residuals` holds the captured :class:`Residuals` (of the last
    forward if several ran inside the context).
    """

    def __init__(
        self,
        model: Any,
        sites: Any = ("resid",),
        *,
        layers: Any = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        detach: bool = True,
        _stop_when_done: bool = False,
    ) -> None:
        self.g = GPT2(model)
        self.sites = check_sites(sites, SITES)
        self.layers = check_layers(layers, self.g.n_layer, what=f"a {self.g.n_layer}-layer model's residual stream")
        self.blocks = tuple(layer for layer in self.layers if layer < self.g.n_layer)
        if not self.blocks and any(site in BLOCK_SITES for site in self.sites):
            raise ValueError(
                f"layers={list(self.layers)} selects no block for the per-block sites "
                f"{[s for s in self.sites if s in BLOCK_SITES]}; blocks are 0..{self.g.n_layer - 1}"
            )
        self.dtype = check_dtype(dtype)
        self.device = check_device(device)
        if not isinstance(detach, bool):
            raise TypeError(f"detach must be True or False; got {detach!r}")
        self.detach = detach
        self._stop_when_done = _stop_when_done
        self._handles: list[Any] = []
        self._result: Residuals | None = None
        self._reset(None, None, None)

    # --- bookkeeping ----------------------------------------------------------------------

    def _n_entries(self, site: str) -> int:
        if site == "resid":
            return len(self.layers)
        return len(self.blocks) if site in BLOCK_SITES else 1

    def _reset(self, input_ids: Any, attention_mask: Any, position_ids: Any) -> None:
        self._buffers = {
            site: _SiteBuffer(
                self._n_entries(site),
                self.dtype if site != "attn_pattern" else (self.dtype or torch.float32),
                self.device,
                self.detach,
            )
            for site in self.sites
        }
        self._inputs = (input_ids, attention_mask, position_ids)
        self._remaining = sum(buffer.n for buffer in self._buffers.values())

    def _store(self, site: str, i: int, t: torch.Tensor) -> None:
        self._buffers[site].write(i, t)
        self._remaining -= 1
        if self._remaining == 0:
            self._finish()
            if self._stop_when_done:
                raise _StopForward

    def _finish(self) -> None:
        input_ids, attention_mask, position_ids = self._inputs
        tensors = {site: buffer.result() for site, buffer in self._buffers.items()}
        for site in ("final", "logits"):
            if site in tensors:
                tensors[site] = tensors[site][0]  # the one entry of a whole-model site
        if attention_mask is None:
            shape = tuple(input_ids.shape) if input_ids is not None else self._batch_pos(tensors)
            attention_mask = torch.ones(shape, dtype=torch.bool)
        on = self.device or attention_mask.device
        self._result = Residuals(
            attention_mask=attention_mask.bool().to(on),
            layers=self.layers,
            blocks=self.blocks,
            input_ids=None if input_ids is None else input_ids.to(on),
            position_ids=None if position_ids is None else position_ids.to(on),
            **tensors,
        )

    @staticmethod
    def _batch_pos(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
        for site, t in tensors.items():
            if site == "attn_pattern":
                return t.shape[1], t.shape[3]
            if site in ("final", "logits"):
                return t.shape[0], t.shape[1]
            return t.shape[1], t.shape[2]
        raise RuntimeError("no site captured")

    @property
    def residuals(self) -> Residuals:
        """What the last completed forward pass recorded."""
        if self._result is None:
            raise RuntimeError("no forward pass has completed inside this trace; run the model first")
        return self._result

    # --- hooks ----------------------------------------------------------------------------

    def _hook_points(self):
        """(module, 'pre' | 'post', callback) for every site and kept layer."""
        g = self.g
        points = []
        index_of_block = {block: i for i, block in enumerate(self.blocks)}
        if "resid" in self.sites:
            for i, layer in enumerate(self.layers):
                module = g.ln_f if layer == g.n_layer else g.blocks[layer]
                points.append((module, "pre", lambda args, kwargs, i=i: self._store("resid", i, _first(args, kwargs))))
        for block, i in index_of_block.items():
            if "resid_mid" in self.sites:
                points.append((g.ln_2(block), "pre", lambda args, kwargs, i=i: self._store("resid_mid", i, args[0])))
            if "attn_out" in self.sites:
                points.append((g.attn(block), "post", lambda out, i=i: self._store("attn_out", i, out[0])))
            if "attn_pattern" in self.sites:
                points.append(
                    (g.c_attn(block), "post", lambda out, i=i, b=block: self._store_pattern(i, b, out))
                )
            if "attn_z" in self.sites:
                points.append((g.attn_c_proj(block), "pre", lambda args, kwargs, i=i: self._store("attn_z", i, args[0])))
            if "mlp_act" in self.sites:
                points.append((g.c_proj(block), "pre", lambda args, kwargs, i=i: self._store("mlp_act", i, args[0])))
            if "mlp_out" in self.sites:
                points.append((g.mlp(block), "post", lambda out, i=i: self._store("mlp_out", i, out)))
        if "final" in self.sites or ("logits" in self.sites and g.lm_head is None):
            points.append((g.ln_f, "post", self._on_final))
        if "logits" in self.sites and g.lm_head is not None:
            points.append((g.lm_head, "post", lambda out: self._store("logits", 0, out)))
        return points

    def _on_final(self, out: torch.Tensor) -> None:
        if "logits" in self.sites and self.g.lm_head is None:
            logits = out @ self.g.W_U.T  # [batch, pos, d_vocab]
            if "final" in self.sites:
                self._buffers["final"].write(0, out)
                self._remaining -= 1
            self._store("logits", 0, logits)
        else:
            self._store("final", 0, out)

    def _store_pattern(self, i: int, block: int, qkv: torch.Tensor) -> None:
        mask = self._inputs[1]
        pattern = self.g.attention_pattern(block, qkv, None if mask is None else mask.to(qkv.device))
        self._store("attn_pattern", i, pattern)

    def _on_forward_start(self, module: Any, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        position_ids = kwargs.get("position_ids", args[4] if len(args) > 4 else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values", args[1] if len(args) > 1 else None))
        if cache is not None and getattr(cache, "get_seq_length", lambda: 0)() > 0:
            raise ValueError(
                "reslens records whole forward passes; this one continues a KV cache "
                "(pass the full sequence with use_cache=False)"
            )
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError(
                f"reslens needs a 2-D attention_mask [batch, pos]; got shape {tuple(attention_mask.shape)}"
            )
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
        self._reset(input_ids, attention_mask, position_ids)

    def __enter__(self) -> Trace:
        if self._handles:
            raise RuntimeError("this trace is already active")
        if self.g.model.training:
            warnings.warn(
                "the model is in training mode, so dropout makes captured activations random; call model.eval()",
                stacklevel=3,
            )
        try:
            self._handles.append(
                self.g.transformer.register_forward_pre_hook(self._on_forward_start, with_kwargs=True)
            )
            for module, kind, callback in self._hook_points():
                if kind == "pre":
                    handle = module.register_forward_pre_hook(
                        lambda m, args, kwargs, cb=callback: cb(args, kwargs), with_kwargs=True
                    )
                else:
                    handle = module.register_forward_hook(lambda m, args, out, cb=callback: cb(out))
                self._handles.append(handle)
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, *exc: Any) -> None:
        self._remove()


def _first(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def trace(
    model: Any,
    sites: Any = ("resid",),
    *,
    layers: Any = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    detach: bool = True,
) -> Trace:
    """Record ``sites`` during a forward pass the caller runs; hooks go away on exit.

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).eval()
    >>> with trace(model, sites=("resid", "mlp_out")) as tr:
    ...     _ = model(torch.tensor([[1, 2, 3]]))
    >>> tuple(tr.residuals.resid.shape), tuple(tr.residuals.mlp_out.shape)
    ((3, 1, 3, 16), (2, 1, 3, 16))
    """
    return Trace(model, sites, layers=layers, dtype=dtype, device=device, detach=detach)


def capture(
    model: Any,
    inputs: Any,
    *,
    sites: Any = ("resid",),
    layers: Any = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    detach: bool = True,
    tokenizer: Any = None,
) -> Residuals:
    """Run ``model`` on ``inputs`` and return the requested sites as :class:`Residuals`.

    ``inputs``: ids ``[batch, pos]``, a :class:`Batch`, a tokenizer output, or text with
    ``tokenizer=``. Positions come from the attention mask, so padded sequences get the
    numbers of running alone. ``layers`` (0..n_layer, negatives from the end) limits the
    residual layers and blocks kept; the forward stops as soon as everything asked for is
    recorded (the LM head only runs when ``logits`` are asked for). ``dtype``/``device``
    say how captured tensors are stored; ``detach=False`` keeps them in the autograd graph.

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).eval()
    >>> res = capture(model, torch.tensor([[1, 2, 3, 4]]), sites=("resid", "mlp_act"))
    >>> tuple(res.resid.shape), tuple(res.mlp_act.shape), res.layers
    ((3, 1, 4, 16), (2, 1, 4, 64), (0, 1, 2))
    """
    recorder = Trace(model, sites, layers=layers, dtype=dtype, device=device, detach=detach, _stop_when_done=True)
    batch = as_batch(inputs, recorder.g, tokenizer)
    runner = recorder.g.model if "logits" in recorder.sites else recorder.g.transformer
    with recorder, (torch.no_grad() if detach else nullcontext()):
        try:
            runner(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask.long(),
                position_ids=batch.position_ids,
                use_cache=False,
            )
        except _StopForward:
            pass
    return recorder.residuals


class Patch:
    """Hooks that replace sites during forwards; use via :func:`patch`."""

    def __init__(self, model: Any, edits: Any) -> None:
        self.g = GPT2(model)
        if not isinstance(edits, Mapping):
            raise TypeError(
                "edits must be a mapping {(site, layer): function}; "
                f"got {type(edits).__name__}"
            )
        self.edits: dict[tuple[str, int], Any] = {}
        for key, fn in edits.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise TypeError(f"edits keys must be (site, layer) pairs; got {key!r}")
            site, layer = key
            check_sites((site,), PATCH_SITES, name="edits site")
            n_max = self.g.n_layer if site == "resid" else self.g.n_layer - 1
            (layer,) = check_layers(layer, n_max, what=f"site {site!r} of a {self.g.n_layer}-layer model",
                                    name=f"edits layer for {site!r}")
            if not callable(fn):
                raise TypeError(f"edits[({site!r}, {layer})] must be a function tensor -> tensor; got {type(fn).__name__}")
            if (site, layer) in self.edits:
                raise ValueError(f"edits names ({site!r}, {layer}) twice (negative and positive layer numbers?)")
            self.edits[(site, layer)] = fn
        self._handles: list[Any] = []

    def _apply(self, site: str, layer: int, t: torch.Tensor) -> torch.Tensor:
        out = self.edits[(site, layer)](t)
        if out is None:  # edited in place
            return t
        if not isinstance(out, torch.Tensor) or out.shape != t.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the edit of ({site!r}, {layer}) returned {got}; expected a tensor {tuple(t.shape)}")
        return out.to(t.dtype)

    def _register(self, site: str, layer: int):
        g = self.g
        if site == "resid":
            module = g.ln_f if layer == g.n_layer else g.blocks[layer]

            def pre(m, args, kwargs):
                if args:
                    return (self._apply(site, layer, args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": self._apply(site, layer, kwargs["hidden_states"])}

            return module.register_forward_pre_hook(pre, with_kwargs=True)
        if site == "mlp_act":
            return g.c_proj(layer).register_forward_pre_hook(
                lambda m, args: (self._apply(site, layer, args[0]), *args[1:])
            )
        if site == "attn_out":
            return g.attn(layer).register_forward_hook(
                lambda m, args, out: (self._apply(site, layer, out[0]), *out[1:])
            )
        return g.mlp(layer).register_forward_hook(lambda m, args, out: self._apply(site, layer, out))

    def __enter__(self) -> Patch:
        if self._handles:
            raise RuntimeError("this patch is already active")
        try:
            for site, layer in self.edits:
                self._handles.append(self._register(site, layer))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        while self._handles:
            self._handles.pop().remove()


def patch(model: Any, edits: Mapping[tuple[str, int], Any]) -> Patch:
    """Replace sites during the forwards run inside the context; hooks go away on exit.

    ``edits`` maps ``(site, layer)`` to a function that receives the site's tensor
    ``[batch, pos, d_model]`` (``[batch, pos, d_mlp]`` for ``mlp_act``) as this forward
    computed it and returns the tensor to use instead (or ``None`` after editing it in
    place). Sites: ``resid`` (layer ``l`` = the input of block ``l``, ``n_layer`` = the input
    of ``ln_f``; layer 0 is ``wte + wpe``), ``attn_out``, ``mlp_out``, ``mlp_act``. Gradients
    flow through the functions, so they may add trainable tensors. To record the patched
    run, enter :func:`patch` before :func:`trace` (hooks run in the order they were added).

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).eval()
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> with patch(model, {("mlp_out", 1): torch.zeros_like}):
    ...     res = capture(model, ids, sites="mlp_out")
    >>> float(res.mlp_out[1].abs().max())
    0.0
    """
    return Patch(model, edits)
