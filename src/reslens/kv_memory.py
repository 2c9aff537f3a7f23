"""The MLP as key-value memories (Geva et al. 2021): ``FF(x) = sum_i m_i v_i + b``.

For block ``layer`` of HuggingFace GPT-2 (weights as stored, see :mod:`reslens._gpt2`):

- key ``k_i``: column ``i`` of ``mlp.c_fc.weight`` -> :func:`keys` ``[d_mlp, d_model]``
- value ``v_i``: row ``i`` of ``mlp.c_proj.weight`` -> :func:`values` ``[d_mlp, d_model]``
- coefficient ``m_i``: the post-GELU activation, the input of ``c_proj`` -> :func:`coefficients`
  ``[batch, pos, d_mlp]`` (the ``mlp_act`` site), so ``mlp_out = m @ values + c_proj.bias``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reslens._checks import check_block, check_layers
from reslens._corpus import UNITS, corpus_texts, token_units
from reslens._gpt2 import GPT2
from reslens.hooks import Patch, Residuals, capture, pad_ids, pad_token_id, patch

__all__ = [
    "keys", "values", "coefficients", "contributions", "MemoryContributions", "value_tokens", "ValueTokens",
    "mine_triggers", "TriggerIndex", "agreement", "KeyValueAgreement", "deletion_neurons", "DeletionNeurons",
    "edit_coefficients", "UNITS",
]


def _block(g: GPT2, layer: Any, name: str = "layer") -> int:
    return check_block(layer, g.n_layer, name=name)


def keys(model: Any, layer: int) -> torch.Tensor:
    """Keys of block ``layer``: ``[d_mlp, d_model]``, row ``i`` = ``c_fc.weight[:, i]`` (a view).

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    >>> tuple(keys(model, 1).shape)
    (64, 16)
    """
    g = GPT2(model)
    return g.mlp_keys(_block(g, layer))


def values(model: Any, layer: int) -> torch.Tensor:
    """Values of block ``layer``: ``[d_mlp, d_model]``, row ``i`` = ``c_proj.weight[i]`` (a view)."""
    g = GPT2(model)
    return g.mlp_values(_block(g, layer))


def coefficients(residuals: Residuals, layer: int) -> torch.Tensor:
    """Memory coefficients ``m`` of block ``layer``: ``[batch, pos, d_mlp]`` from captured ``mlp_act``.

    Capture them with ``capture(model, ids, sites="mlp_act")``.
    """
    if not isinstance(residuals, Residuals):
        raise TypeError(f"residuals must be reslens Residuals (from capture); got {type(residuals).__name__}")
    if residuals.mlp_act is None:
        raise ValueError("residuals hold no 'mlp_act'; capture with sites=('mlp_act', ...)")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int block index; got {layer!r} ({type(layer).__name__})")
    return residuals.get("mlp_act", layer)


def _position_index(residuals: Residuals, seq: int, position: int) -> int:
    """Padded index of the ``position``-th real token of sequence ``seq`` (negatives from the end)."""
    batch = residuals.attention_mask.shape[0]
    for name, value in (("seq", seq), ("position", position)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
    if not -batch <= seq < batch:
        raise ValueError(f"seq={seq} is out of range for a batch of {batch} sequences")
    real = residuals.attention_mask[seq].nonzero().flatten()
    n = len(real)
    if not -n <= position < n:
        raise ValueError(
            f"position={position} is out of range for sequence {seq % batch}, which has {n} real tokens "
            f"(0..{n - 1}, or -1 for the last)"
        )
    return int(real[position])


@dataclass(frozen=True)
class MemoryContributions:
    """The MLP output at one position split into its memories: ``mlp_out = Σ_i m_i v_i + bias``.

    - ``coefficients: [d_mlp]`` (``m``), ``value_norms: [d_mlp]`` (``‖v_i‖``), ``bias: [d_model]``
    - ``magnitude: [d_mlp]`` = ``|m_i|·‖v_i‖``
    - ``token_effect: [d_mlp]`` or None: each memory's effect on ``token``'s logit,
      ``m_i (v_i · W_U[token])`` (``through_ln_f=False``), or with ``ln_f`` linearised at this
      position: ``m_i ((γ ⊙ (v_i − mean(v_i))) / σ) · W_U[token]`` where ``σ`` is ``ln_f``'s
      scale of the final raw residual here (``through_ln_f=True``)
    - ``order: [d_mlp]``: neuron indices by ``rank_by`` (``"magnitude"`` or ``"token"``), largest first
    - ``values: [d_mlp, d_model]``: the value vectors (float32) so ``updates`` can be formed
    """

    layer: int
    seq: int
    position: int
    coefficients: torch.Tensor
    value_norms: torch.Tensor
    magnitude: torch.Tensor
    bias: torch.Tensor
    values: torch.Tensor
    order: torch.Tensor
    rank_by: str
    token: int | None = None
    token_effect: torch.Tensor | None = None
    through_ln_f: bool = False

    def __post_init__(self) -> None:
        d_mlp, d_model = self.values.shape
        for name in ("coefficients", "value_norms", "magnitude", "order"):
            if tuple(getattr(self, name).shape) != (d_mlp,):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}; expected ({d_mlp},)")
        if tuple(self.bias.shape) != (d_model,):
            raise ValueError(f"bias has shape {tuple(self.bias.shape)}; expected ({d_model},)")
        if self.token_effect is not None and tuple(self.token_effect.shape) != (d_mlp,):
            raise ValueError(f"token_effect has shape {tuple(self.token_effect.shape)}; expected ({d_mlp},)")

    @property
    def updates(self) -> torch.Tensor:
        """The per-memory sub-updates ``m_i v_i``: ``[d_mlp, d_model]``."""
        return self.coefficients[:, None] * self.values

    def total(self) -> torch.Tensor:
        """``Σ_i m_i v_i + bias`` ``[d_model]``: the MLP output at this position."""
        return self.coefficients @ self.values + self.bias

    @property
    def scores(self) -> torch.Tensor:
        """The ranking score ``[d_mlp]``: ``magnitude`` or ``token_effect``."""
        return self.magnitude if self.rank_by == "magnitude" else self.token_effect  # type: ignore[return-value]

    def top(self, k: int = 10) -> list[tuple[int, float, float]]:
        """The first ``k`` neurons of ``order`` as ``(neuron, coefficient, score)``."""
        idx = self.order[:k].tolist()
        return [(i, float(self.coefficients[i]), float(self.scores[i])) for i in idx]

    def to_frame(self):
        """``pandas.DataFrame``: one row per neuron in rank order."""
        import pandas as pd

        idx = self.order
        columns = {
            "neuron": idx.numpy(),
            "coefficient": self.coefficients[idx].numpy(),
            "value_norm": self.value_norms[idx].numpy(),
            "magnitude": self.magnitude[idx].numpy(),
        }
        if self.token_effect is not None:
            columns["token_effect"] = self.token_effect[idx].numpy()
        return pd.DataFrame(columns)


def contributions(
    model: Any,
    residuals: Residuals,
    layer: int,
    position: int = -1,
    *,
    seq: int = 0,
    token: int | None = None,
    rank_by: str | None = None,
    through_ln_f: bool = False,
) -> MemoryContributions:
    """Split block ``layer``'s MLP output at one position into its memories ``m_i v_i``.

    ``position`` counts the real tokens of sequence ``seq`` (``-1`` = its last token).
    ``rank_by="magnitude"`` orders by ``|m_i|·‖v_i‖``; ``rank_by="token"`` (the default when
    ``token`` is given) by the effect on ``token``'s logit, raw (``m_i v_i · W_U[token]``) or,
    with ``through_ln_f=True``, through ``ln_f`` linearised at this position (needs ``resid``
    captured at layer ``n_layer``).

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from reslens.hooks import capture
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).eval()
    >>> res = capture(model, torch.tensor([[1, 2, 3]]), sites=("mlp_act", "mlp_out"))
    >>> c = contributions(model, res, layer=1)
    >>> torch.allclose(c.total(), res.mlp_out[1, 0, -1], atol=1e-5)
    True
    """
    g = GPT2(model)
    block = _block(g, layer)
    act = coefficients(residuals, block)
    pos = _position_index(residuals, seq, position)
    if rank_by is None:
        rank_by = "magnitude" if token is None else "token"
    if rank_by not in ("magnitude", "token"):
        raise ValueError(f"rank_by must be 'magnitude' or 'token'; got {rank_by!r}")
    if rank_by == "token" and token is None:
        raise ValueError("rank_by='token' needs token= (the vocabulary id whose logit the memories push)")
    if token is not None and (isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < g.d_vocab):
        raise ValueError(f"token must be a vocabulary id in 0..{g.d_vocab - 1}; got {token!r}")
    if through_ln_f and token is None:
        raise ValueError("through_ln_f=True needs token= (it linearises ln_f for that token's logit)")
    with torch.no_grad():
        m = act[seq, pos].float()  # [d_mlp]
        values_ = g.mlp_values(block).detach().float()  # [d_mlp, d_model]
        norms = values_.norm(dim=-1)
        magnitude = m.abs() * norms
        effect = None
        if token is not None:
            direction = g.W_U[token].detach().float()  # [d_model]
            if through_ln_f:
                final = _final_resid(g, residuals, seq, pos)
                sigma = torch.sqrt(final.var(unbiased=False) + g.ln_f.eps)
                direction = g.ln_f.weight.detach().float() * direction / sigma
                centred = values_ - values_.mean(-1, keepdim=True)
                effect = m * (centred @ direction)
            else:
                effect = m * (values_ @ direction)
        score = magnitude if rank_by == "magnitude" else effect
        order = torch.sort(score, descending=True, stable=True).indices
    return MemoryContributions(
        layer=block, seq=seq % residuals.attention_mask.shape[0], position=pos, coefficients=m.cpu(),
        value_norms=norms.cpu(), magnitude=magnitude.cpu(), bias=g.mlp_value_bias(block).detach().float().cpu(),
        values=values_.cpu(), order=order.cpu(), rank_by=rank_by, token=token,
        token_effect=None if effect is None else effect.cpu(), through_ln_f=through_ln_f,
    )


def _final_resid(g: GPT2, residuals: Residuals, seq: int, pos: int) -> torch.Tensor:
    if residuals.resid is None or g.n_layer not in residuals.layers:
        raise ValueError(
            "through_ln_f=True needs the final raw residual: capture with sites=('mlp_act', 'resid') "
            f"and layers including {g.n_layer} (or layers=None)"
        )
    return residuals.get("resid", g.n_layer)[seq, pos].float()


# --- values in vocabulary space -----------------------------------------------------------------


def _vocab_scores(g: GPT2, vectors: torch.Tensor, through_ln_f: bool) -> torch.Tensor:
    """``[n, d_model]`` vectors -> ``[n, d_vocab]`` scores, raw ``W_U v`` or ``W_U ln_f(v)``."""
    vectors = vectors.float()
    if through_ln_f:
        ln = g.ln_f
        vectors = torch.nn.functional.layer_norm(
            vectors, ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps
        )
    return vectors @ g.W_U.detach().float().T


def _check_neurons(g: GPT2, neurons: Any, name: str = "neurons") -> torch.Tensor:
    if neurons is None:
        return torch.arange(g.d_mlp)
    if isinstance(neurons, int) and not isinstance(neurons, bool):
        neurons = [neurons]
    idx = torch.as_tensor(list(neurons) if not isinstance(neurons, torch.Tensor) else neurons)
    if idx.ndim != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise TypeError(f"{name} must be an int, a sequence of ints or None; got {neurons!r}")
    if len(idx) == 0:
        raise ValueError(f"{name} is empty; pass None for every neuron")
    bad = idx[(idx < 0) | (idx >= g.d_mlp)]
    if len(bad):
        raise ValueError(f"{name} contains {int(bad[0])}, outside 0..{g.d_mlp - 1} (d_mlp={g.d_mlp})")
    return idx.long()


@dataclass(frozen=True)
class ValueTokens:
    """Top and bottom vocabulary entries of value vectors (``N`` neurons, ``k`` tokens each).

    ``convention`` says how a value ``v`` became vocabulary scores: ``"W_U v"`` (raw, Geva et
    al. 2021) or ``"W_U ln_f(v)"`` (``ln_f`` applied to ``v`` alone, then the unembedding).

    - ``neurons: [N]``; ``top_ids``, ``top_scores``, ``bottom_ids``, ``bottom_scores``: ``[N, k]``
    """

    layer: int
    neurons: torch.Tensor
    top_ids: torch.Tensor
    top_scores: torch.Tensor
    bottom_ids: torch.Tensor
    bottom_scores: torch.Tensor
    convention: str
    token_strings: dict[int, str] | None = None

    def __post_init__(self) -> None:
        n = len(self.neurons)
        shape = tuple(self.top_ids.shape)
        for name in ("top_ids", "top_scores", "bottom_ids", "bottom_scores"):
            t = getattr(self, name)
            if t.ndim != 2 or t.shape[0] != n or tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({n}, k) like top_ids {shape}")

    def token(self, token_id: int) -> str:
        return self.token_strings.get(token_id, str(token_id)) if self.token_strings else str(token_id)

    def tokens(self, neuron: int, *, bottom: bool = False) -> list[str]:
        """The token strings of one neuron's top (or bottom) list."""
        rows = (self.neurons == neuron).nonzero().flatten()
        if not len(rows):
            raise ValueError(f"neuron {neuron} is not in this result; it has {self.neurons.tolist()}")
        ids = (self.bottom_ids if bottom else self.top_ids)[rows[0]]
        return [self.token(i) for i in ids.tolist()]

    def table(self, k: int | None = None) -> str:
        """One line per neuron: its top tokens, then its bottom tokens."""
        k = k or self.top_ids.shape[1]
        lines = [f"layer {self.layer} values as {self.convention}: top tokens | bottom tokens"]
        for r, neuron in enumerate(self.neurons.tolist()):
            top = " ".join(repr(self.token(i)) for i in self.top_ids[r, :k].tolist())
            bottom = " ".join(repr(self.token(i)) for i in self.bottom_ids[r, :k].tolist())
            lines.append(f"L{self.layer}N{neuron:<5} {top} | {bottom}")
        return "\n".join(lines)

    def to_frame(self):
        """``pandas.DataFrame``: one row per (neuron, side, rank)."""
        import pandas as pd

        rows = []
        for r, neuron in enumerate(self.neurons.tolist()):
            for side, ids, scores in (("top", self.top_ids, self.top_scores), ("bottom", self.bottom_ids, self.bottom_scores)):
                for rank, (i, s) in enumerate(zip(ids[r].tolist(), scores[r].tolist())):
                    rows.append({"layer": self.layer, "neuron": neuron, "side": side, "rank": rank,
                                 "token_id": i, "token": self.token(i), "score": s})
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return f"ValueTokens(layer={self.layer}, neurons={len(self.neurons)}, k={self.top_ids.shape[1]}, {self.convention})"


def _decode_map(tokenizer: Any, *id_tensors: torch.Tensor) -> dict[int, str] | None:
    if tokenizer is None:
        return None
    ids = sorted({int(i) for t in id_tensors for i in t.flatten().tolist() if int(i) >= 0})
    return {i: tokenizer.decode([i]) for i in ids}


def value_tokens(
    model: Any, layer: int, neurons: Any = None, k: int = 10, *, through_ln_f: bool = False,
    tokenizer: Any = None, chunk_size: int = 256,
) -> ValueTokens:
    """Each value vector's top and bottom ``k`` tokens in vocabulary space.

    ``through_ln_f=False``: scores are ``W_U v_i`` (Geva et al. 2021); ``True``: ``W_U ln_f(v_i)``
    (the value alone put through the final LayerNorm, as LM-Debugger-style tools do). The
    convention is recorded in the result. ``neurons=None`` means all ``d_mlp`` of them
    (computed ``chunk_size`` at a time). ``tokenizer`` adds token strings.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    >>> vt = value_tokens(model, 1, [0, 5], k=3)
    >>> tuple(vt.top_ids.shape), vt.convention
    ((2, 3), 'W_U v')
    """
    g = GPT2(model)
    block = _block(g, layer)
    idx = _check_neurons(g, neurons)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= g.d_vocab:
        raise ValueError(f"k must be an int in 1..{g.d_vocab}; got {k!r}")
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        values_ = g.mlp_values(block)
        for start in range(0, len(idx), chunk_size):
            scores = _vocab_scores(g, values_[idx[start : start + chunk_size].to(values_.device)], through_ln_f)
            top = scores.topk(k, dim=-1)
            bottom = scores.topk(k, dim=-1, largest=False)
            parts.append((top.indices.cpu(), top.values.cpu(), bottom.indices.cpu(), bottom.values.cpu()))
    top_ids, top_scores, bottom_ids, bottom_scores = (torch.cat(p) for p in zip(*parts))
    return ValueTokens(
        layer=block, neurons=idx, top_ids=top_ids, top_scores=top_scores, bottom_ids=bottom_ids,
        bottom_scores=bottom_scores, convention="W_U ln_f(v)" if through_ln_f else "W_U v",
        token_strings=_decode_map(tokenizer, top_ids, bottom_ids),
    )


# --- trigger mining -------------------------------------------------------------------------------

@dataclass(frozen=True)
class TriggerIndex:
    """For every (layer, key), the ``top_k`` corpus examples on which that key fires most.

    An example is one unit of the corpus (a sentence, or a window of tokens); its score for a
    key is the key's largest coefficient ``m_i`` over the example's positions, and the
    trigger is the prefix up to that position (Geva et al. 2021). ``L = len(layers)``.

    - ``scores: [L, d_mlp, top_k]`` float32, descending (``-inf`` = empty slot)
    - ``example: [L, d_mlp, top_k]`` example number in corpus order (``-1`` = empty)
    - ``position: [L, d_mlp, top_k]`` the activating position in that example
    - ``example_ids: [E]``, ``example_offsets: [E + 1]``, ``example_tokens: [N]``: the token
      ids of the ``E`` examples some slot refers to (nothing else is kept)
    - ``n_examples``, ``n_tokens``: how much of the corpus has been read (for resuming)
    """

    layers: tuple[int, ...]
    top_k: int
    scores: torch.Tensor
    example: torch.Tensor
    position: torch.Tensor
    example_ids: torch.Tensor
    example_offsets: torch.Tensor
    example_tokens: torch.Tensor
    n_examples: int
    n_tokens: int
    unit: str
    window: int
    model_info: dict = field(default_factory=dict)
    corpus: str = ""
    _tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        shape = (len(self.layers), self.scores.shape[1] if self.scores.ndim == 3 else -1, self.top_k)
        for name in ("scores", "example", "position"):
            t = getattr(self, name)
            if t.ndim != 3 or tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [len(layers), d_mlp, top_k] = {shape}")
        if len(self.example_offsets) != len(self.example_ids) + 1:
            raise ValueError("example_offsets must have one more entry than example_ids")
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}; got {self.unit!r}")

    @property
    def d_mlp(self) -> int:
        return self.scores.shape[1]

    def _row(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer={layer} was not mined; this index has layers {list(self.layers)}")
        return self.layers.index(layer)

    def tokens(self, example: int) -> list[int]:
        """Token ids of one stored example."""
        where = (self.example_ids == example).nonzero().flatten()
        if not len(where):
            raise ValueError(f"example {example} is not stored (only examples in some top-k list are kept)")
        i = int(where[0])
        return self.example_tokens[self.example_offsets[i] : self.example_offsets[i + 1]].tolist()

    def triggers(self, layer: int, key: int, n: int | None = None) -> list[dict]:
        """The key's top examples, best first: score, example, position, prefix ids (ending at the
        activating token), and the id of the next token (``None`` at the end of the example)."""
        row = self._row(layer)
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < self.d_mlp:
            raise ValueError(f"key must be an int in 0..{self.d_mlp - 1}; got {key!r}")
        out = []
        for slot in range(self.top_k if n is None else min(n, self.top_k)):
            example = int(self.example[row, key, slot])
            if example < 0:
                break
            pos = int(self.position[row, key, slot])
            ids = self.tokens(example)
            out.append({
                "score": float(self.scores[row, key, slot]), "example": example, "position": pos,
                "prefix": ids[: pos + 1], "next": ids[pos + 1] if pos + 1 < len(ids) else None,
            })
        return out

    def format(self, layer: int, key: int, n: int = 10, *, tokenizer: Any = None, width: int = 90) -> str:
        """The top prefixes, the activating token in ``[[ ]]``, the next token after ``→``."""
        tokenizer = tokenizer or self._tokenizer
        decode = (lambda ids: tokenizer.decode(ids)) if tokenizer is not None else (lambda ids: " ".join(map(str, ids)))
        lines = [f"L{layer}N{key}: top {n} of {self.n_examples} {self.unit}s ({self.n_tokens} tokens)"]
        for t in self.triggers(layer, key, n):
            before, token = _split_last(decode, t["prefix"])
            after = "" if t["next"] is None else " → " + repr(decode([t["next"]]))
            if "\ufffd" in token and t["next"] is not None:  # the first bytes of a character the next token ends
                token = _split_last(decode, [*t["prefix"], t["next"]])[1] + " (first bytes)"
                after = " → (its last bytes)"
            before, token = before.replace("\n", "⏎"), token.replace("\n", "⏎")
            room = max(10, width - len(token) - len(after) - 12)
            before = before if len(before) <= room else "…" + before[-room:]
            lines.append(f"{t['score']:7.3f}  {before}[[{token}]]{after}")
        return "\n".join(lines)

    def show(self, layer: int, key: int, n: int = 10, *, tokenizer: Any = None, width: int = 90) -> None:
        """Print :meth:`format` (the tokenizer of ``mine_triggers`` is used when none is given)."""
        print(self.format(layer, key, n, tokenizer=tokenizer, width=width))

    def to_frame(self, layer: int | None = None):
        """``pandas.DataFrame``: one row per filled (layer, key, rank) slot."""
        import pandas as pd

        rows = [self._row(layer)] if layer is not None else range(len(self.layers))
        frames = []
        for r in rows:
            key, rank = (self.example[r] >= 0).nonzero(as_tuple=True)
            frames.append(pd.DataFrame({
                "layer": self.layers[r], "key": key.numpy(), "rank": rank.numpy(),
                "score": self.scores[r, key, rank].numpy(), "example": self.example[r, key, rank].numpy(),
                "position": self.position[r, key, rank].numpy(),
            }))
        return pd.concat(frames, ignore_index=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to folder ``path``: ``index.safetensors`` (tensors) and ``index.json`` (the rest)."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).contiguous().cpu() for name in _INDEX_TENSORS}
        save_file(tensors, os.fspath(folder / "index.safetensors"))
        meta = {"format": "reslens.TriggerIndex/1", "layers": list(self.layers), "top_k": self.top_k,
                "n_examples": self.n_examples, "n_tokens": self.n_tokens, "unit": self.unit, "window": self.window,
                "model_info": self.model_info, "corpus": self.corpus}
        tmp = folder / "index.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        tmp.replace(folder / "index.json")

    @classmethod
    def load(cls, path: str | os.PathLike, *, tokenizer: Any = None) -> TriggerIndex:
        """Read an index written by :meth:`save`; ``tokenizer`` is used by :meth:`show`."""
        from safetensors.torch import load_file

        folder = Path(path)
        if not (folder / "index.json").is_file():
            raise FileNotFoundError(f"{os.fspath(folder)!r} holds no index.json; is it a folder written by TriggerIndex.save?")
        meta = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        if meta.get("format") != "reslens.TriggerIndex/1":
            raise ValueError(f"{os.fspath(folder)!r} is not a reslens TriggerIndex (format={meta.get('format')!r})")
        tensors = load_file(os.fspath(folder / "index.safetensors"))
        del meta["format"]
        meta["layers"] = tuple(meta["layers"])
        return cls(**meta, **tensors, _tokenizer=tokenizer)

    def __repr__(self) -> str:
        return (f"TriggerIndex(layers={list(self.layers)}, d_mlp={self.d_mlp}, top_k={self.top_k}, "
                f"{self.n_examples} {self.unit}s, {self.n_tokens} tokens)")


def _split_last(decode: Any, ids: list[int]) -> tuple[str, str]:
    """Text before the last token and the last token's text; a token that completes a
    multi-byte character (GPT-2's byte-level BPE splits curly quotes) shows that character."""
    full, before = decode(ids), decode(ids[:-1])
    stem = before.rstrip("\ufffd")
    if full.startswith(stem) and len(full) > len(stem):
        return stem, full[len(stem):]
    return before, decode(ids[-1:])


_INDEX_TENSORS = ("scores", "example", "position", "example_ids", "example_offsets", "example_tokens")


def _order_key(scores: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
    """An int64 that orders by float32 ``scores`` descending, then ``example`` ascending.

    The float's bits, with the magnitude bits of negatives flipped, order like the floats
    (``-inf`` included); they fill the high 32 bits, ``2^31 - 1 - example`` the low ones.
    """
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (bits.long() << 32) | (2**31 - 1 - example)


class _Miner:
    """Running top-k state of :func:`mine_triggers`; memory bounded by layers x d_mlp x top_k."""

    def __init__(self, n_layers: int, d_mlp: int, top_k: int, start: TriggerIndex | None):
        if start is None:
            self.scores = torch.full((n_layers, d_mlp, top_k), float("-inf"))
            self.example = torch.full((n_layers, d_mlp, top_k), -1, dtype=torch.long)
            self.position = torch.full((n_layers, d_mlp, top_k), -1, dtype=torch.long)
            self.stored: dict[int, list[int]] = {}
        else:
            self.scores, self.example, self.position = start.scores.clone(), start.example.clone(), start.position.clone()
            self.stored = {int(e): start.tokens(int(e)) for e in start.example_ids.tolist()}

    def add(self, units: list[list[int]], numbered: torch.Tensor, act: torch.Tensor, mask: torch.Tensor) -> None:
        """Merge one batch: ``act: [L, B, P, d_mlp]`` (overwritten), ``mask: [B, P]``, ``numbered: [B]``.

        Order: score descending, ties to the earlier example, so batching never changes the result.
        Only keys where some new example beats the current k-th score are re-sorted.
        """
        penalty = torch.zeros(mask.shape, dtype=act.dtype, device=act.device).masked_fill_(~mask, float("-inf"))
        act.add_(penalty[None, :, :, None])  # pads -> -inf (an add: far cheaper than a broadcast masked_fill)
        best = act.amax(dim=2).float().transpose(1, 2).cpu()  # [L, d_mlp, B]; positions only for winners, below
        kth, kth_example = self.scores[..., -1:], self.example[..., -1:]  # [L, d_mlp, 1]
        beats = (best > kth) | ((best == kth) & (numbered < kth_example))
        layer, key = beats.any(-1).nonzero(as_tuple=True)  # the keys whose top-k changes
        if not len(layer):
            return
        top_k, batch = self.scores.shape[-1], best.shape[-1]
        scores = torch.cat([self.scores[layer, key], best[layer, key]], dim=-1)  # [R, top_k + B]
        example = torch.cat([self.example[layer, key], numbered.expand(len(layer), batch)], dim=-1)
        keep = _order_key(scores, example).topk(top_k, dim=-1).indices  # one top-k instead of two sorts
        position = self.position[layer, key].gather(-1, keep.clamp(max=top_k - 1))  # [R, top_k]
        row, slot = (keep >= top_k).nonzero(as_tuple=True)  # slots filled from this batch
        at = act.device
        where = act[layer[row].to(at), (keep[row, slot] - top_k).to(at), :, key[row].to(at)].argmax(-1)
        position[row, slot] = where.cpu()  # the first position of the maximum, as max(dim) gives
        self.scores[layer, key] = scores.gather(-1, keep)
        self.example[layer, key] = example.gather(-1, keep)
        self.position[layer, key] = position
        row_of = {int(e): r for r, e in enumerate(numbered.tolist())}
        for e in self.example[layer, key][keep >= top_k].unique().tolist():
            self.stored[e] = units[row_of[e]]

    def prune(self) -> None:
        referenced = set(self.example[self.example >= 0].unique().tolist())
        self.stored = {e: ids for e, ids in self.stored.items() if e in referenced}

    def index(self, **meta: Any) -> TriggerIndex:
        self.prune()
        order = sorted(self.stored)
        lengths = torch.tensor([0] + [len(self.stored[e]) for e in order], dtype=torch.long)
        tokens = [t for e in order for t in self.stored[e]]
        return TriggerIndex(
            scores=self.scores, example=self.example, position=self.position,
            example_ids=torch.tensor(order, dtype=torch.long), example_offsets=lengths.cumsum(0),
            example_tokens=torch.tensor(tokens, dtype=torch.long), **meta,
        )


def _model_info(g: GPT2) -> dict:
    return {"n_layer": g.n_layer, "d_model": g.d_model, "d_mlp": g.d_mlp, "d_vocab": g.d_vocab,
            "name_or_path": str(getattr(g.config, "name_or_path", "") or getattr(g.config, "_name_or_path", ""))}


def mine_triggers(
    model: Any,
    tokenizer: Any,
    corpus: Any,
    *,
    layers: Any = None,
    top_k: int = 50,
    unit: str = "sentence",
    window: int | None = None,
    batch_size: int = 32,
    max_tokens: int | None = None,
    resume: TriggerIndex | str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    save_every: int = 500_000,
    progress: bool = True,
) -> TriggerIndex:
    """Stream a corpus once and keep, for every (layer, key), its ``top_k`` trigger examples.

    ``corpus``: a text file, a folder of ``.txt`` files (sorted by name), or an iterable of
    strings. ``unit="sentence"`` splits paragraphs into sentences (Geva et al. used
    sentences); ``"window"`` cuts the token stream of each text into windows of ``window``
    tokens (default: the model's context, at most 128). Units are cut to ``window`` tokens;
    units shorter than 2 tokens are skipped. ``layers`` are blocks (default all).
    Examples are numbered in corpus order (0, 1, ...).

    Memory does not grow with the corpus: the state is ``[layers, d_mlp, top_k]`` plus the
    token ids of examples that are in some top-k list. Batches are formed from length-sorted
    groups of ``16 * batch_size`` units to limit padding. ``max_tokens`` stops before the
    first unit that would pass that many tokens (in total, counting a resumed index's). ``resume`` (an index or its
    folder) skips the units it has already read and continues; ``out`` saves the index there
    every ``save_every`` tokens and at the end, so an interrupted run can be resumed.
    """
    from tqdm.auto import tqdm

    g = GPT2(model)
    blocks = check_layers(layers, g.n_layer - 1, what=f"a {g.n_layer}-layer model's blocks")
    for name, value, low in (("top_k", top_k, 1), ("batch_size", batch_size, 1), ("save_every", save_every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}; got {unit!r}")
    window = min(g.n_positions, 128) if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= g.n_positions:
        raise ValueError(f"window must be an int in 2..{g.n_positions} (the model's context); got {window!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive int or None; got {max_tokens!r}")
    if tokenizer is None or not callable(tokenizer):
        raise TypeError("tokenizer must be a HuggingFace tokenizer (e.g. from reslens.load_model())")
    texts, description = corpus_texts(corpus)
    info = _model_info(g)

    if resume is not None and not isinstance(resume, TriggerIndex):
        resume = TriggerIndex.load(resume, tokenizer=tokenizer)
    if resume is not None:
        _check_resume(resume, blocks, top_k, unit, window, info)
    miner = _Miner(len(blocks), g.d_mlp, top_k, resume)
    n_examples = resume.n_examples if resume is not None else 0
    n_tokens = resume.n_tokens if resume is not None else 0
    skip = n_examples
    pad_id = pad_token_id(tokenizer)
    meta = dict(layers=blocks, top_k=top_k, unit=unit, window=window, model_info=info, corpus=description)

    def snapshot() -> TriggerIndex:
        return miner.index(n_examples=n_examples, n_tokens=n_tokens, _tokenizer=tokenizer, **meta)

    bar = tqdm(total=max_tokens, initial=n_tokens, unit="tok", unit_scale=True, disable=not progress,
               desc="mining triggers")
    last_save = n_tokens
    group: list[list[int]] = []
    units = token_units(tokenizer, texts, unit, window)
    done = max_tokens is not None and n_tokens >= max_tokens
    while not done:
        group.clear()
        group_tokens = 0
        for ids in units:
            if skip:
                skip -= 1
                continue
            if max_tokens is not None and n_tokens + group_tokens + len(ids) > max_tokens:
                done = True  # units are never cut, so a resumed run starts at a unit boundary
                break
            group.append(ids)
            group_tokens += len(ids)
            if len(group) == 16 * batch_size:
                break
        else:
            done = True
        if not group:
            break
        order = sorted(range(len(group)), key=lambda i: len(group[i]))
        for start in range(0, len(group), batch_size):
            rows = order[start : start + batch_size]
            batch = pad_ids([group[i] for i in rows], pad_id=pad_id)
            act = capture(model, batch, sites="mlp_act", layers=blocks).mlp_act  # [L, B, P, d_mlp]
            numbered = torch.tensor([n_examples + i for i in rows])  # examples are numbered in corpus order
            miner.add([group[i] for i in rows], numbered, act, batch.attention_mask.to(act.device))
            bar.update(int(batch.attention_mask.sum()))
        n_examples += len(group)
        n_tokens += group_tokens
        miner.prune()
        if out is not None and n_tokens - last_save >= save_every:
            snapshot().save(out)
            last_save = n_tokens
    bar.close()
    if n_examples == 0:
        raise ValueError(f"corpus ({description}) holds no unit of at least 2 tokens")
    index = snapshot()
    if out is not None:
        index.save(out)
    return index


def _check_resume(index: TriggerIndex, blocks: tuple[int, ...], top_k: int, unit: str, window: int, info: dict) -> None:
    theirs = (tuple(index.layers), index.top_k, index.unit, index.window)
    ours = (blocks, top_k, unit, window)
    if theirs != ours:
        raise ValueError(
            f"resume index was mined with layers, top_k, unit, window = {theirs}; this call asks for {ours}"
        )
    dims = ("n_layer", "d_model", "d_mlp", "d_vocab")
    if any(index.model_info.get(k) != info[k] for k in dims):
        raise ValueError(
            f"resume index comes from a model with {({k: index.model_info.get(k) for k in dims})}; "
            f"this model has {({k: info[k] for k in dims})}"
        )


# --- key-value agreement ------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyValueAgreement:
    """Does a key's value predict the token that follows the key's top trigger? (Geva et al. Figs. 4-5)

    For every mined key: ``next_token`` = the token after the activating token of its top
    trigger (``-1`` when the trigger ends its example: such keys are left out), the value's
    top token under ``convention`` and the next token's ``rank`` in the value's vocabulary
    scores (0 = its top token). ``L = len(layers)``.

    - ``next_token``, ``value_top``, ``rank``: ``[L, d_mlp]`` (``-1`` = no next token)
    - ``agreement: [L]``: fraction of keys with ``value_top == next_token``
    - ``n_keys: [L]``: keys with a next token; ``baseline`` = ``1 / d_vocab`` (a random top token)
    - ``shuffled: [L]``: the agreement when each key's next token is paired with another key's
      value (mean over ``n_shuffles`` permutations within the layer): the chance level given
      how often frequent tokens such as ``' the'`` top both lists, a stricter baseline than ``1/|V|``
    """

    layers: tuple[int, ...]
    next_token: torch.Tensor
    value_top: torch.Tensor
    rank: torch.Tensor
    agreement: torch.Tensor
    n_keys: torch.Tensor
    shuffled: torch.Tensor
    d_vocab: int
    convention: str

    def __post_init__(self) -> None:
        shape = tuple(self.next_token.shape)
        if len(shape) != 2 or shape[0] != len(self.layers):
            raise ValueError(f"next_token has shape {shape}; expected [len(layers), d_mlp]")
        for name in ("value_top", "rank"):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}; expected {shape}")
        for name in ("agreement", "n_keys", "shuffled"):
            if tuple(getattr(self, name).shape) != (len(self.layers),):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}; expected ({len(self.layers)},)")

    @property
    def baseline(self) -> float:
        return 1.0 / self.d_vocab

    def median_rank(self) -> torch.Tensor:
        """``[L]`` median rank of the next token in the value's distribution (valid keys only)."""
        return torch.stack([
            r[r >= 0].float().median() if bool((r >= 0).any()) else torch.tensor(float("nan")) for r in self.rank
        ])

    def to_frame(self):
        """``pandas.DataFrame``: one row per layer."""
        import pandas as pd

        return pd.DataFrame({
            "layer": list(self.layers), "keys": self.n_keys.numpy(), "agreement": self.agreement.numpy(),
            "baseline": self.baseline, "ratio_to_baseline": (self.agreement / self.baseline).numpy(),
            "shuffled": self.shuffled.numpy(), "median_rank": self.median_rank().numpy(),
        })

    def table(self) -> str:
        head = f"{'layer':>5} {'keys':>6} {'agreement':>10} {'x random':>9} {'shuffled':>9} {'median rank':>12}"
        lines = [f"value top token == token after the top trigger ({self.convention}); random = 1/{self.d_vocab}, "
                 "shuffled = values paired with other keys' next tokens", head, "-" * len(head)]
        median = self.median_rank()
        for r, layer in enumerate(self.layers):
            lines.append(f"{layer:>5} {int(self.n_keys[r]):>6} {float(self.agreement[r]):>10.4f} "
                         f"{float(self.agreement[r]) / self.baseline:>9.1f} {float(self.shuffled[r]):>9.4f} "
                         f"{float(median[r]):>12.0f}")
        return "\n".join(lines)

    def plot(self, *, ax=None):
        from reslens.plot import plot_agreement

        return plot_agreement(self, ax=ax)


def agreement(
    index: TriggerIndex, model: Any, *, through_ln_f: bool = False, n_shuffles: int = 100, seed: int = 0,
    chunk_size: int = 256,
) -> KeyValueAgreement:
    """Per layer, the fraction of keys whose value's top token is the token after their top trigger.

    Values are read as ``W_U v`` (Geva et al.) or, with ``through_ln_f=True``, ``W_U ln_f(v)``.
    Two baselines: ``1/|V|`` (Geva et al.'s) and ``shuffled`` (next tokens permuted across
    the layer's keys, ``n_shuffles`` times, seeded).
    """
    if not isinstance(index, TriggerIndex):
        raise TypeError(f"index must be a TriggerIndex (from mine_triggers or TriggerIndex.load); got {type(index).__name__}")
    g = GPT2(model)
    info = _model_info(g)
    if any(index.model_info.get(k) != info[k] for k in ("n_layer", "d_mlp", "d_vocab")):
        raise ValueError(f"index was mined on a model with {index.model_info}; this model has {info}")
    n_layers, d_mlp = len(index.layers), index.d_mlp
    value_top = torch.full((n_layers, d_mlp), -1, dtype=torch.long)
    rank = torch.full((n_layers, d_mlp), -1, dtype=torch.long)
    # the token after each key's top trigger (example_ids are sorted: find each example's offset)
    example, position = index.example[..., 0], index.position[..., 0]  # [L, d_mlp]
    next_token = torch.full((n_layers, d_mlp), -1, dtype=torch.long)
    if len(index.example_ids):
        slot = torch.searchsorted(index.example_ids, example.clamp(min=0)).clamp(max=len(index.example_ids) - 1)
        after = index.example_offsets[slot] + position + 1
        valid = (example >= 0) & (after < index.example_offsets[slot + 1])
        next_token = torch.where(valid, index.example_tokens[after.clamp(0, len(index.example_tokens) - 1)], -1)
    with torch.no_grad():
        for r, layer in enumerate(index.layers):
            values_ = g.mlp_values(layer)
            for start in range(0, d_mlp, chunk_size):
                scores = _vocab_scores(g, values_[start : start + chunk_size], through_ln_f).cpu()  # [n, d_vocab]
                value_top[r, start : start + chunk_size] = scores.argmax(-1)
                nxt = next_token[r, start : start + chunk_size]
                valid = nxt >= 0
                target = scores.gather(-1, nxt.clamp(min=0)[:, None])
                ranks = (scores > target).sum(-1)
                rank[r, start : start + chunk_size] = torch.where(valid, ranks, -1)
    valid = next_token >= 0
    n_keys = valid.sum(-1)
    hits = ((value_top == next_token) & valid).sum(-1)
    gen = torch.Generator().manual_seed(seed)
    shuffled = torch.zeros(n_layers)
    for r in range(n_layers):
        keys_ = valid[r].nonzero().flatten()
        for _ in range(n_shuffles if len(keys_) else 0):
            perm = keys_[torch.randperm(len(keys_), generator=gen)]
            shuffled[r] += (value_top[r, keys_] == next_token[r, perm]).float().mean() / n_shuffles
    return KeyValueAgreement(
        layers=index.layers, next_token=next_token, value_top=value_top, rank=rank,
        agreement=hits.float() / n_keys.clamp(min=1), n_keys=n_keys, shuffled=shuffled, d_vocab=g.d_vocab,
        convention="W_U ln_f(v)" if through_ln_f else "W_U v",
    )


# --- deletion neurons ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeletionNeurons:
    """``cos[l, i] = cos(k_i ⊙ γ_ln2, v_i)`` for every neuron: ``[n_layer, d_mlp]``.

    ``γ_ln2`` is ``ln_2``'s weight, so ``k_i ⊙ γ`` is the direction of the residual the key
    reads. Strongly negative neurons write against what they read: they delete it.
    """

    cos: torch.Tensor

    def __post_init__(self) -> None:
        if self.cos.ndim != 2:
            raise ValueError(f"cos has shape {tuple(self.cos.shape)}; expected [n_layer, d_mlp]")

    def most_negative(self, k: int = 10, layer: int | None = None) -> list[tuple[int, int, float]]:
        """The ``k`` most negative neurons as ``(layer, neuron, cos)`` (of one layer if given)."""
        cos = self.cos if layer is None else self.cos[layer : layer + 1]
        flat = cos.flatten().topk(min(k, cos.numel()), largest=False)
        d_mlp = self.cos.shape[1]
        first = 0 if layer is None else layer
        return [(first + i // d_mlp, i % d_mlp, float(v)) for i, v in zip(flat.indices.tolist(), flat.values)]

    def summary(self) -> torch.Tensor:
        """``[n_layer, 4]``: per layer the mean, minimum, 1st percentile and fraction below -0.5."""
        return torch.stack([self.cos.mean(-1), self.cos.min(-1).values,
                            self.cos.quantile(0.01, dim=-1), (self.cos < -0.5).float().mean(-1)], dim=-1)

    def table(self, k: int = 10) -> str:
        s = self.summary()
        lines = [f"{'layer':>5} {'mean cos':>9} {'min':>7} {'1st pct':>8} {'< -0.5':>7}"]
        lines += [f"{layer:>5} {s[layer, 0]:>9.3f} {s[layer, 1]:>7.3f} {s[layer, 2]:>8.3f} {s[layer, 3]:>7.3f}"
                  for layer in range(len(s))]
        lines.append("most negative: " + ", ".join(f"L{l}N{n} ({c:.2f})" for l, n, c in self.most_negative(k)))
        return "\n".join(lines)

    def to_frame(self):
        import pandas as pd

        n_layer, d_mlp = self.cos.shape
        return pd.DataFrame({"layer": torch.arange(n_layer).repeat_interleave(d_mlp).numpy(),
                             "neuron": torch.arange(d_mlp).repeat(n_layer).numpy(), "cos": self.cos.flatten().numpy()})

    def plot(self, *, ax=None):
        from reslens.plot import plot_deletion_neurons

        return plot_deletion_neurons(self, ax=ax)


def deletion_neurons(model: Any) -> DeletionNeurons:
    """Cosine between each neuron's input direction ``k_i ⊙ γ_ln2`` and its value ``v_i``, every layer."""
    g = GPT2(model)
    with torch.no_grad():
        cos = torch.stack([
            torch.nn.functional.cosine_similarity(
                g.mlp_keys(layer).float() * g.ln_2(layer).weight.float(), g.mlp_values(layer).float(), dim=-1
            )
            for layer in range(g.n_layer)
        ])
    return DeletionNeurons(cos=cos.cpu())


# --- coefficient edits ----------------------------------------------------------------------------


def edit_coefficients(model: Any, edits: Mapping[int, Mapping[int, float | None]], *, positions: Any = None) -> Patch:
    """A context manager that sets chosen coefficients ``m_i`` during forwards (None = zero).

    ``edits = {layer: {neuron: value or None}}``; ``positions`` (indices of the ``pos`` axis)
    limits the edit, default every position. This is LM-Debugger's intervention: the MLP
    output moves by exactly ``(value - m_i) v_i``. Hooks go away on exit, also on exceptions.

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).eval()
    >>> with edit_coefficients(model, {1: {3: None, 7: 5.0}}):
    ...     logits = model(torch.tensor([[1, 2, 3]])).logits
    """
    g = GPT2(model)
    if not isinstance(edits, Mapping) or not edits:
        raise TypeError(f"edits must be a non-empty mapping {{layer: {{neuron: value or None}}}}; got {edits!r}")
    if positions is not None:
        positions = torch.as_tensor(positions if not isinstance(positions, int) else [positions])
        if positions.dtype.is_floating_point or positions.ndim != 1:
            raise TypeError(f"positions must be an int or a sequence of ints; got {positions!r}")
    patches = {}
    for layer, neurons in edits.items():
        block = _block(g, layer, name="edits layer")
        if not isinstance(neurons, Mapping) or not neurons:
            raise TypeError(f"edits[{layer}] must be a non-empty mapping {{neuron: value or None}}; got {neurons!r}")
        idx = _check_neurons(g, list(neurons), name=f"edits[{layer}] neurons")
        vals = []
        for neuron, value in neurons.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"edits[{layer}][{neuron}] must be a number or None; got {value!r}")
            vals.append(0.0 if value is None else float(value))
        patches[("mlp_act", block)] = _set_coefficients(idx, torch.tensor(vals), positions)
    return patch(model, patches)


def _set_coefficients(neurons: torch.Tensor, vals: torch.Tensor, positions: torch.Tensor | None):
    def edit(act: torch.Tensor) -> torch.Tensor:  # act: [batch, pos, d_mlp]
        act = act.clone()
        v = vals.to(act.device, act.dtype)
        n = neurons.to(act.device)
        if positions is None:
            act[..., n] = v
        else:
            p = positions.to(act.device)
            if bool(((p >= act.shape[1]) | (p < -act.shape[1])).any()):
                raise ValueError(f"positions {positions.tolist()} fall outside this forward's {act.shape[1]} positions")
            act[:, p[:, None], n[None, :]] = v
        return act

    return edit
