"""Keys, values and coefficients of one MLP, and the MLP output split into its memories.

In Geva et al.'s reading ``FF(x) = Σ_i m_i v_i + b``; through the adapter
(:meth:`reslens.arch.Arch.mlp_weights`, every matrix ``[d_mlp, d_model]``, row ``i`` = neuron ``i``):

- key ``k_i``: row ``i`` of ``W_in`` -> :func:`keys` (a gated MLP also has gate keys ``W_gate``)
- value ``v_i``: row ``i`` of ``W_out`` -> :func:`values`
- coefficient ``m_i``: the input of the MLP output projection (the ``mlp_act`` site) ->
  :func:`coefficients` ``[batch, pos, d_mlp]``, so ``mlp_out = m @ values + b_out`` exactly

GPT-2: ``m_i = gelu(k_i·x̂ + b_i)``, almost never below -0.17, so a memory writes ``+v_i``.
A gated MLP (Llama, Mistral, Qwen2): ``m_i = act(g_i·x̂)(u_i·x̂)``; the gate key ``g_i`` decides
whether the neuron fires, the up key ``u_i`` gives a signed, linear amplitude, so ``m_i`` is
often large and negative, writing ``-v_i``. The sums, contributions and edits here are exact
either way (no bias on a gated MLP's output projection).

Where the MLP's output passes a norm before it joins the residual (Gemma 2/3, OLMo 2), a memory's
piece of ``mlp_out`` at a position is ``m_i v_i ⊙ γ_out / σ``, the norm linearised at the actual
scale ``σ`` of the whole output there (``arch.mlp_out_factor``), so the pieces still sum to
``mlp_out`` exactly. A mixture of experts' memory ``i`` is neuron ``i % d_expert`` of expert
``i // d_expert`` (its coefficient includes the router's weight), labelled ``"L2 E1 N5"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from reslens._checks import (check_block, check_bool, check_choice, check_float, check_int, check_position,
                             check_residuals_fit)
from reslens._inputs import as_batch
from reslens._saving import Saveable
from reslens._text import html_table, pandas
from reslens._tokens import token_id
from reslens.arch import Arch, adapter
from reslens.hooks import Patch, capture, patch
from reslens.kv_memory._common import check_neurons, d_expert_of, memory_label
from reslens.residuals import Residuals

__all__ = [
    "keys", "values", "coefficients", "Memory", "MemoryContributions", "contributions", "contributions_of",
    "edit_coefficients",
]


def keys(model: Any, layer: int) -> torch.Tensor:
    """Keys of block ``layer``: ``[d_mlp, d_model]``, row ``i`` = neuron ``i``'s key (a view of ``W_in``).

    For a gated MLP these are the up keys (the gate keys are ``arch.mlp_weights(layer).W_gate``).

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50))
    >>> tuple(keys(model, 1).shape)
    (64, 16)
    """
    arch = adapter(model)
    return arch.mlp_weights(check_block(layer, arch.n_layer)).W_in


def values(model: Any, layer: int) -> torch.Tensor:
    """Values of block ``layer``: ``[d_mlp, d_model]``, row ``i`` = neuron ``i``'s value (a view of W_out)."""
    arch = adapter(model)
    return arch.mlp_weights(check_block(layer, arch.n_layer)).W_out


def coefficients(residuals: Residuals, layer: int) -> torch.Tensor:
    """Memory coefficients ``m`` of block ``layer``: ``[batch, pos, d_mlp]`` from captured ``mlp_act``.

    Capture them with ``capture(model, ids, sites="mlp_act")``. For a gated MLP this is the
    gated product ``act(mlp_gate) * mlp_up`` (both sites can be captured too).
    """
    if not isinstance(residuals, Residuals):
        raise TypeError(f"residuals must be reslens Residuals (from capture); got {type(residuals).__name__}")
    if residuals.mlp_act is None:
        raise ValueError("residuals hold no 'mlp_act'; capture with sites=('mlp_act', ...)")
    check_int(layer, "layer")
    return residuals.get("mlp_act", layer)


@dataclass(frozen=True)
class Memory:
    """One memory at one position: ``neuron``, its coefficient ``m_i`` and its ranking ``score``.

    In a mixture of experts (``d_expert`` memories per expert, 0 when dense) ``neuron`` indexes
    ``mlp_act``: neuron ``neuron % d_expert`` of expert ``neuron // d_expert`` (:attr:`label`).
    """

    layer: int
    neuron: int
    coefficient: float
    score: float
    d_expert: int = 0

    @property
    def label(self) -> str:
        """``"L2N5"``, or ``"L2 E1 N5"`` in a mixture of experts."""
        return memory_label(self.layer, self.neuron, self.d_expert)

    @property
    def expert(self) -> int | None:
        """The expert the memory belongs to (``None`` for a dense MLP)."""
        return self.neuron // self.d_expert if self.d_expert else None

    def _repr_html_(self) -> str:
        rows = [("neuron", self.label), ("coefficient m", self.coefficient), ("score", self.score)]
        return html_table("Memory", (), rows)


@dataclass(frozen=True, repr=False)
class MemoryContributions(Saveable):
    """The MLP output at one position split into its memories: ``mlp_out = Σ_i m_i v_i + bias``.

    - ``coefficients: [d_mlp]`` (``m``), ``value_norms: [d_mlp]`` (``‖v_i‖``), ``bias: [d_model]``
      (the MLP output bias; zeros when the MLP has none, so the sum stays exact)
    - ``magnitude: [d_mlp]`` = ``|m_i|·‖v_i‖``
    - ``token_effect: [d_mlp]`` or None: each memory's effect on ``token``'s logit,
      ``m_i (v_i · W_U[token])`` (``through_final_norm=False``), or with the final norm linearised
      at this position: ``m_i ((γ ⊙ centre(v_i)) / σ) · W_U[token]`` where ``σ`` is the final
      norm's scale of the final raw residual here (``through_final_norm=True``; ``centre`` is the
      identity for RMSNorm)
    - ``order: [d_mlp]``: neuron indices by ``rank_by`` (``"magnitude"`` or ``"token"``), largest first
    - ``values: [d_mlp, d_model]``: the value vectors (float32) so ``updates`` can be formed;
      under an MLP output norm (Gemma 2/3, OLMo 2) what each writes at this position,
      ``v_i ⊙ γ_out / σ`` (``value_norms`` and ``bias`` likewise)
    - ``position``: the index on the padded ``pos`` axis of sequence ``seq``
    - ``d_expert``: memories per expert in a mixture of experts (labels ``"L2 E1 N5"``), 0 when dense
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
    through_final_norm: bool = False
    d_expert: int = 0

    def __post_init__(self) -> None:
        d_mlp, d_model = self.values.shape
        for name in ("coefficients", "value_norms", "magnitude", "order"):
            if tuple(getattr(self, name).shape) != (d_mlp,):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}; expected ({d_mlp},)")
        if tuple(self.bias.shape) != (d_model,):
            raise ValueError(f"bias has shape {tuple(self.bias.shape)}; expected ({d_model},)")
        if self.token_effect is not None and tuple(self.token_effect.shape) != (d_mlp,):
            raise ValueError(f"token_effect has shape {tuple(self.token_effect.shape)}; expected ({d_mlp},)")
        check_choice(self.rank_by, ("magnitude", "token"), "rank_by")
        if self.rank_by == "token" and self.token_effect is None:
            raise ValueError("rank_by='token' needs token_effect")

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

    def top(self, k: int = 10) -> list[Memory]:
        """The first ``k`` neurons of ``order``, each a :class:`Memory` (neuron, coefficient, score)."""
        check_int(k, "k", low=1)
        return [Memory(self.layer, i, float(self.coefficients[i]), float(self.scores[i]), self.d_expert)
                for i in self.order[:k].tolist()]

    def to_frame(self):
        """``pandas.DataFrame``: one row per neuron in rank order."""
        pd = pandas("MemoryContributions.to_frame")
        idx = self.order
        columns = {
            "neuron": idx.numpy(),
            "coefficient": self.coefficients[idx].numpy(),
            "value_norm": self.value_norms[idx].numpy(),
            "magnitude": self.magnitude[idx].numpy(),
        }
        if self.token_effect is not None:
            columns["token_effect"] = self.token_effect[idx].numpy()
        if self.d_expert:  # a mixture of experts: neuron (of mlp_act) = expert * d_expert + expert_neuron
            columns["expert"] = (idx // self.d_expert).numpy()
            columns["expert_neuron"] = (idx % self.d_expert).numpy()
        return pd.DataFrame(columns)

    def _describe(self) -> str:
        by = "magnitude" if self.rank_by == "magnitude" else f"effect on token {self.token}"
        norm = ", through the final norm" if self.through_final_norm else ""
        return f"block {self.layer}, seq {self.seq}, position {self.position}; ranked by {by}{norm}"

    def __repr__(self) -> str:
        d_mlp, d_model = self.values.shape
        return f"MemoryContributions({self._describe()}; d_mlp={d_mlp}, d_model={d_model})"

    def _repr_html_(self) -> str:
        rows = [(m.label, f"{m.coefficient:+.3f}", f"{m.score:+.3f}") for m in self.top(10)]
        score = "|m|·‖v‖" if self.rank_by == "magnitude" else "m (v · the token's unembedding)"
        note = (f"— the MLP's output here as a sum of memories m·v: the 10 with the largest score = {score}; "
                "neuron = layer.key, m = the key's coefficient.")
        title = f"MemoryContributions: {self._describe()}"
        return html_table(title, ("neuron", "m", "score"), rows, note=note)


def _check_contribution_options(arch: Arch, token: Any, tokenizer: Any, rank_by: Any,
                                through_final_norm: Any) -> tuple[int | None, str]:
    """``(token id or None, rank_by)``; no ``rank_by``: ``"magnitude"`` without a token, else ``"token"``."""
    if token is not None:
        token = token_id(token, d_vocab=arch.d_vocab, tokenizer=tokenizer, name="token")
    check_bool(through_final_norm, "through_final_norm")
    if rank_by is None:
        rank_by = "magnitude" if token is None else "token"
    check_choice(rank_by, ("magnitude", "token"), "rank_by")
    if rank_by == "token" and token is None:
        raise ValueError("rank_by='token' needs token= (the token whose logit the memories push: an id, or "
                         "its text with tokenizer=)")
    if through_final_norm and token is None:
        raise ValueError("through_final_norm=True needs token= (it linearises the final norm for that "
                         "token's logit)")
    return token, rank_by


def _position(mask: torch.Tensor, seq: Any, position: Any) -> tuple[int, int]:
    """``(seq, index on the padded pos axis)`` with reslens's one meaning of ``position``."""
    batch, n_pos = mask.shape
    seq = check_int(seq, "seq", low=-batch, high=batch - 1) % batch
    try:
        return seq, int(check_position(position, mask[seq : seq + 1])[0])
    except ValueError:
        if position is None or not -n_pos <= position < n_pos or bool(mask[seq, position % n_pos]):
            raise
        real = mask[seq].nonzero().flatten().tolist()
        raise ValueError(
            f"position={position} is a padding position of sequence seq={seq}, whose real tokens are at "
            f"{real[0]}..{real[-1]} of the padded pos axis; pass position=None for its last real token"
        ) from None


def contributions_of(
    residuals: Residuals,
    arch: Any,
    layer: int,
    position: int | None = None,
    *,
    seq: int = 0,
    token: Any = None,
    tokenizer: Any = None,
    rank_by: str | None = None,
    through_final_norm: bool = False,
) -> MemoryContributions:
    """Block ``layer``'s MLP output at one position of captured residuals, split into its memories.

    No forward runs: ``residuals`` must hold ``mlp_act`` at block ``layer`` (and ``resid`` at layer
    ``n_layer`` for ``through_final_norm=True``); ``arch``: the model or its adapter. The options are
    :func:`contributions`'s.

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from reslens.hooks import capture
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> res = capture(model, torch.tensor([[1, 2, 3]]), sites=("mlp_act", "mlp_out"))
    >>> c = contributions_of(res, model, layer=1)
    >>> torch.allclose(c.total(), res.mlp_out[1, 0, -1], atol=1e-5)
    True
    """
    arch = adapter(arch)
    block = check_block(layer, arch.n_layer)
    act = coefficients(residuals, block)
    check_residuals_fit(residuals, arch)
    seq, pos = _position(residuals.attention_mask, seq, position)
    token, rank_by = _check_contribution_options(arch, token, tokenizer, rank_by, through_final_norm)
    weights = arch.mlp_weights(block)
    with torch.no_grad():
        m = act[seq, pos].float()  # [d_mlp]
        values_ = weights.W_out.detach().float()  # [d_mlp, d_model]
        factor = arch.mlp_out_factor(block, m)  # the MLP's output norm, linearised here (Gemma 2/3, OLMo 2)
        if factor is not None:
            values_ = values_ * factor.to(values_.device)
        norms = values_.norm(dim=-1)
        magnitude = m.abs() * norms
        effect = None
        if token is not None:
            direction = arch.W_U[token].detach().float()  # [d_model]
            if through_final_norm:
                final = _final_resid(arch, residuals, seq, pos)
                norm = arch.norm("final")
                sigma = norm.scale(final)
                direction = norm.gamma.to(direction.device) * direction / sigma
                effect = m * (norm.centre(values_) @ direction)
            else:
                effect = m * (values_ @ direction)
        score = magnitude if rank_by == "magnitude" else effect
        order = torch.sort(score, descending=True, stable=True).indices
        bias = torch.zeros(arch.d_model) if weights.b_out is None else weights.b_out.detach().float().cpu()
        if factor is not None:
            bias = bias * factor.cpu()
    return MemoryContributions(
        layer=block, seq=seq, position=pos, coefficients=m.cpu(), value_norms=norms.cpu(),
        magnitude=magnitude.cpu(), bias=bias, values=values_.cpu(), order=order.cpu(), rank_by=rank_by,
        token=token, token_effect=None if effect is None else effect.cpu(),
        through_final_norm=through_final_norm,
        d_expert=d_expert_of(arch, block),
    )


def contributions(
    model: Any,
    inputs: Any,
    layer: int,
    position: int | None = None,
    *,
    seq: int = 0,
    token: Any = None,
    tokenizer: Any = None,
    rank_by: str | None = None,
    through_final_norm: bool = False,
) -> MemoryContributions:
    """Split block ``layer``'s MLP output at one position of ``inputs`` into its memories ``m_i v_i``.

    ``inputs``: ids ``[batch, pos]``, a :class:`~reslens.Batch`, or text with ``tokenizer=``.
    ``position`` has reslens's one meaning: an index of the padded ``pos`` axis (negatives count
    from its end), or ``None`` (the default) for sequence ``seq``'s last real token; a padding
    position is refused. ``rank_by="magnitude"`` orders by ``|m_i|·‖v_i‖``; ``rank_by="token"``
    (the default when ``token`` is given) by the effect on ``token``'s logit, raw
    (``m_i v_i · W_U[token]``) or, with ``through_final_norm=True``, through the final norm
    linearised at this position. ``token``: an id, or one token's text with ``tokenizer=``
    (e.g. ``" Paris"``). Captures what it needs, then :func:`contributions_of` (with a capture of
    your own, call that).

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> c = contributions(model, torch.tensor([[1, 2, 3]]), layer=1, token=7)
    >>> c.rank_by, c.position, len(c.top(3))
    ('token', 2, 3)
    """
    arch = adapter(model)
    if isinstance(inputs, Residuals):
        raise TypeError("contributions(model, inputs, layer) captures its inputs; for captured Residuals "
                        "call contributions_of(residuals, arch, layer)")
    block = check_block(layer, arch.n_layer)
    batch = as_batch(inputs, arch, tokenizer)
    # the cheap arguments are checked before the forward
    _position(batch.attention_mask, seq, position)
    _check_contribution_options(arch, token, tokenizer, rank_by, through_final_norm)
    if through_final_norm:
        residuals = capture(arch, batch, sites=("mlp_act", "resid"), layers=[block, arch.n_layer])
    else:
        residuals = capture(arch, batch, sites="mlp_act", layers=[block])
    return contributions_of(residuals, arch, block, position, seq=seq, token=token, tokenizer=tokenizer,
                            rank_by=rank_by, through_final_norm=through_final_norm)


def _final_resid(arch: Arch, residuals: Residuals, seq: int, pos: int) -> torch.Tensor:
    if residuals.resid is None or arch.n_layer not in residuals.layers:
        raise ValueError(
            "through_final_norm=True needs the final raw residual: capture with sites=('mlp_act', 'resid') "
            f"and layers including {arch.n_layer} (or layers=None)"
        )
    return residuals.get("resid", arch.n_layer)[seq, pos].float()


# --- coefficient edits ----------------------------------------------------------------------------


def _check_positions(positions: Any) -> torch.Tensor | None:
    """Indices of the ``pos`` axis ``[P]`` (negatives from the end), or ``None`` for every position."""
    if positions is None:
        return None
    if isinstance(positions, torch.Tensor):
        if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
            raise TypeError(f"positions must hold integer indices; got a tensor of dtype {positions.dtype}")
        items = positions.reshape(-1).tolist()
    else:
        items = [positions] if isinstance(positions, int) else positions
        if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
            raise TypeError(f"positions must be an int or a sequence of ints; got {positions!r}")
        items = list(items)
        for i, item in enumerate(items):
            check_int(item, f"positions[{i}]")
    if not items:
        raise ValueError("positions is empty; pass None for every position")
    return torch.tensor(items, dtype=torch.long)


def _check_edit(layer: Any, neurons: Any, arch: Arch) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(block, neuron indices [N], new values [N])`` of one ``edits`` entry."""
    block = check_block(layer, arch.n_layer, name="edits layer")
    if not isinstance(neurons, Mapping) or not neurons:
        raise TypeError(
            f"edits[{layer}] must be a non-empty mapping {{neuron: value or None}}; got {neurons!r}"
        )
    idx = check_neurons(list(neurons), arch.d_mlp, name=f"edits[{layer}] neurons")
    vals = [0.0 if value is None else check_float(value, f"edits[{layer}][{neuron}] (a number, or None)")
            for neuron, value in neurons.items()]
    return block, idx, torch.tensor(vals)


def edit_coefficients(
    model: Any, edits: Mapping[int, Mapping[int, float | None]], *, positions: Any = None
) -> Patch:
    """A context manager that sets chosen coefficients ``m_i`` during forwards (None = zero).

    ``edits = {layer: {neuron: value or None}}``; ``positions`` (indices of the ``pos`` axis,
    negatives from its end) limits the edit, default every position. Under a KV cache
    (``model.generate()``) positions still count from the sequence's first token, as without
    one; negative positions are then refused (the end moves with each new token). This is
    LM-Debugger's intervention: the MLP output moves by exactly ``(value - m_i) v_i``. The edit replaces the
    input of the MLP output projection (the ``mlp_act`` site of :func:`reslens.hooks.patch`);
    hooks go away on exit, also on exceptions.

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> with edit_coefficients(model, {1: {3: None, 7: 5.0}}):
    ...     logits = model(torch.tensor([[1, 2, 3]])).logits
    """
    arch = adapter(model)
    if not isinstance(edits, Mapping) or not edits:
        raise TypeError(
            f"edits must be a non-empty mapping {{layer: {{neuron: value or None}}}}; got {edits!r}"
        )
    positions = _check_positions(positions)
    patches = {}
    for layer, neurons in edits.items():
        block, idx, vals = _check_edit(layer, neurons, arch)
        patches[("mlp_act", block)] = _set_coefficients(idx, vals, positions)
    return patch(arch.model, patches)


def _set_coefficients(neurons: torch.Tensor, vals: torch.Tensor, positions: torch.Tensor | None):
    def edit(act: torch.Tensor, start: int) -> torch.Tensor:  # act: [batch, pos, d_mlp], pos from start
        act = act.clone()
        v = vals.to(act.device, act.dtype)
        n = neurons.to(act.device)
        if positions is None:
            act[..., n] = v
            return act
        p, end = positions.to(act.device), start + act.shape[1]  # end: the whole sequence's length
        if start > 0 and bool((p < 0).any()):
            raise ValueError(
                f"positions {positions.tolist()} count from the end of the sequence, which moves with "
                f"every token a KV cache adds (this forward continues a cache of {start} tokens, as "
                "model.generate() does); pass non-negative positions or run with use_cache=False"
            )
        if bool(((p >= end) | (p < -end)).any()):
            raise ValueError(f"positions {positions.tolist()} fall outside the sequence's {end} positions")
        p = p[p >= start] - start if start > 0 else p  # under a cache, the positions this forward computes
        act[:, p[:, None], n[None, :]] = v
        return act

    return edit
