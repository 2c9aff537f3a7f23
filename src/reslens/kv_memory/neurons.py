"""Per-neuron readings of the MLP weights alone (no forward).

Each value's top and bottom tokens in vocabulary space (:func:`value_tokens`), and each
neuron's key-value cosine (:func:`deletion_neurons`: strongly negative neurons write against
what they read; a gated MLP's are classified by the up key, with the gate key's cosine beside it).

A value is read as the direction it writes in the residual (:func:`value_directions`): the row
``v_i`` of the value projection or, where the MLP's output passes a norm before it joins the
residual (Gemma 2/3, OLMo 2), ``γ_out ⊙ v_i``. There a memory writes ``m_i (γ_out ⊙ v_i) / σ`` at a
position, ``σ`` the output norm's scale of the whole MLP output there: one positive number per
position that no single memory owns and no weight holds, so it is dropped. Rankings of
``W_U (γ_out ⊙ v_i)`` are exactly those of what the memory writes at any position; its scores are
that position's scores times ``σ``. A mixture of experts' memory ``i`` is neuron ``i % d_expert`` of
expert ``i // d_expert`` and is labelled ``"L2 E1 N5"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from reslens._checks import check_block, check_bool, check_float, check_int
from reslens._saving import Saveable
from reslens._tokens import token_strings
from reslens.arch import Arch, adapter
from reslens._text import html_table, pandas
from reslens.kv_memory._common import check_neurons, d_expert_of, memory_label

__all__ = ["ValueTokens", "value_tokens", "DeletionNeurons", "deletion_neurons", "vocab_scores", "convention",
           "value_directions"]


def convention(through_final_norm: bool, out_norm: bool = False, cosine: bool = False) -> str:
    """How a value ``v`` became vocabulary scores: ``"W_U v"`` or ``"W_U final_norm(v)"``.

    ``out_norm``: the MLP's output passes a norm first (Gemma 2/3, OLMo 2), so ``v`` is read as
    ``γ_out ⊙ v`` (:func:`value_directions`): ``"W_U (γ_out ⊙ v)"``, ``"W_U final_norm(γ_out ⊙ v)"``.
    ``cosine``: the norm-aware readout, each score divided by both vectors' norms: ``"cos(W_U, v)"``.
    """
    v = "γ_out ⊙ v" if out_norm else "v"
    if through_final_norm:
        v = f"final_norm({v})"
    if cosine:
        return f"cos(W_U, {v})"
    return f"W_U {v}" if through_final_norm or not out_norm else f"W_U ({v})"


def value_directions(arch: Arch, layer: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The residual directions values of block ``layer`` write: ``[n, d_model]`` float32.

    ``rows``: neuron indices ``[n]`` (``None``: all ``d_mlp``). Each is ``v_i``, the value
    projection's row, or, under an MLP output norm (Gemma 2/3, OLMo 2), ``γ_out ⊙ v_i``: a memory's
    piece of ``mlp_out`` is ``m_i (γ_out ⊙ v_i) / σ`` at a position, and the positive scale ``1/σ``
    (the norm of the whole MLP output there, owned by no memory) is dropped.
    """
    values_ = arch.mlp_weights(layer).W_out
    if rows is not None:
        values_ = values_[rows.to(values_.device)]
    values_ = values_.detach().float()
    norm = arch.out_norm("mlp", layer)
    if norm is None:
        return values_
    if norm.centred or norm.bias is not None:  # no family has one; a bias would not be a direction
        raise NotImplementedError(f"a centred or biased MLP output norm ({arch.family}) is not read")
    return values_ * norm.gamma.to(values_.device)


def vocab_scores(arch: Arch, vectors: torch.Tensor, through_final_norm: bool,
                 cosine: bool = False) -> torch.Tensor:
    """``[n, d_model]`` vectors -> ``[n, d_vocab]`` float32 scores: ``W_U v`` or ``W_U final_norm(v)``.

    ``cosine=True``: the norm-aware readout, the cosine of ``v`` with every unembedding row. The raw
    product favours the rows of largest norm whatever ``v`` is: SmolLM2's ``' strugg'`` (norm 7.49
    against a median of 3.15) is the top-1 of the raw embedding of 35% of its first 5,000 tokens, a hub
    token; the cosine reads the direction alone.
    """
    vectors = vectors.float()
    if through_final_norm:
        vectors = arch.norm("final")(vectors)
    w_u = arch.W_U.detach().float()
    scores = vectors @ w_u.T
    if cosine:
        scores = scores / (vectors.norm(dim=-1, keepdim=True) * w_u.norm(dim=-1)).clamp(min=1e-12)
    return scores


@dataclass(frozen=True, repr=False)
class ValueTokens(Saveable):
    """Top and bottom vocabulary entries of value vectors (``N`` neurons, ``k`` tokens each).

    ``convention`` says how a value ``v`` became vocabulary scores: ``"W_U v"`` (raw, Geva et
    al. 2021) or ``"W_U final_norm(v)"`` (the final norm applied to ``v`` alone, then the unembedding);
    under an MLP output norm ``v`` is read as ``γ_out ⊙ v`` (:func:`value_directions`).

    - ``neurons: [N]``; ``top_ids``, ``top_scores``, ``bottom_ids``, ``bottom_scores``: ``[N, k]``
    - ``d_expert``: memories per expert in a mixture of experts (labels ``"L2 E1 N5"``), 0 when dense
    """

    layer: int
    neurons: torch.Tensor
    top_ids: torch.Tensor
    top_scores: torch.Tensor
    bottom_ids: torch.Tensor
    bottom_scores: torch.Tensor
    convention: str
    token_strings: dict[int, str] | None = None
    d_expert: int = 0

    def __post_init__(self) -> None:
        n = len(self.neurons)
        shape = tuple(self.top_ids.shape)
        for name in ("top_ids", "top_scores", "bottom_ids", "bottom_scores"):
            t = getattr(self, name)
            if t.ndim != 2 or t.shape[0] != n or tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({n}, k) like top_ids {shape}")

    def token(self, token_id: int) -> str:
        """The decoded string of ``token_id`` (its number without a tokenizer)."""
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
        k = self.top_ids.shape[1] if k is None else check_int(k, "k", low=1)
        lines = [f"layer {self.layer} values as {self.convention}: top tokens | bottom tokens"]
        for r, neuron in enumerate(self.neurons.tolist()):
            top = " ".join(repr(self.token(i)) for i in self.top_ids[r, :k].tolist())
            bottom = " ".join(repr(self.token(i)) for i in self.bottom_ids[r, :k].tolist())
            lines.append(f"{memory_label(self.layer, neuron, self.d_expert):<7} {top} | {bottom}")
        return "\n".join(lines)

    def to_frame(self):
        """``pandas.DataFrame``: one row per (neuron, side, rank)."""
        pd = pandas("ValueTokens.to_frame")
        rows = []
        for r, neuron in enumerate(self.neurons.tolist()):
            for side, ids, scores in (("top", self.top_ids, self.top_scores),
                                      ("bottom", self.bottom_ids, self.bottom_scores)):
                for rank, (i, s) in enumerate(zip(ids[r].tolist(), scores[r].tolist())):
                    rows.append({"layer": self.layer, "neuron": neuron, "side": side, "rank": rank,
                                 "token_id": i, "token": self.token(i), "score": s})
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return (f"ValueTokens(layer={self.layer}, neurons={len(self.neurons)}, k={self.top_ids.shape[1]}, "
                f"{self.convention})")

    def _repr_html_(self) -> str:
        k = min(5, self.top_ids.shape[1])
        rows = [(memory_label(self.layer, n, self.d_expert),
                 " ".join(repr(self.token(i)) for i in self.top_ids[r, :k].tolist()),
                 " ".join(repr(self.token(i)) for i in self.bottom_ids[r, :k].tolist()))
                for r, n in enumerate(self.neurons[:20].tolist())]
        return html_table(f"ValueTokens: layer {self.layer} values as {self.convention}",
                          ("neuron", "top tokens", "bottom tokens"), rows)


def value_tokens(
    model: Any, layer: int, neurons: Any = None, k: int = 10, *, through_final_norm: bool = False,
    tokenizer: Any = None, chunk_size: int = 256, cosine: bool = False,
) -> ValueTokens:
    """Each value vector's top and bottom ``k`` tokens in vocabulary space.

    ``through_final_norm=False``: scores are ``W_U v_i`` (Geva et al. 2021); ``True``:
    ``W_U final_norm(v_i)`` (the value alone put through the final norm, as LM-Debugger-style
    tools do). Under an MLP output norm (Gemma 2/3, OLMo 2) ``v_i`` is the direction the value
    writes, ``γ_out ⊙ v_i`` (:func:`value_directions`; the per-position scale ``1/σ`` of that norm
    is dropped: rankings are what the memory writes anywhere, scores are off by that scale). The
    ``cosine=True`` reads each value by its cosine with the unembedding rows (the norm-aware readout:
    :func:`vocab_scores`), which keeps the rows of largest norm (hub tokens) from topping every value.
    The convention is recorded in the result. ``neurons=None`` means all ``d_mlp``
    of them (computed ``chunk_size`` at a time). ``tokenizer`` adds token strings.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50))
    >>> vt = value_tokens(model, 1, [0, 5], k=3)
    >>> tuple(vt.top_ids.shape), vt.convention
    ((2, 3), 'W_U v')
    """
    arch = adapter(model)
    block = check_block(layer, arch.n_layer)
    idx = check_neurons(neurons, arch.d_mlp)
    check_int(k, "k", low=1, high=arch.d_vocab)
    check_bool(through_final_norm, "through_final_norm")
    check_bool(cosine, "cosine")
    check_int(chunk_size, "chunk_size", low=1)
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for start in range(0, len(idx), chunk_size):
            rows = value_directions(arch, block, idx[start : start + chunk_size])
            scores = vocab_scores(arch, rows, through_final_norm, cosine)
            top = scores.topk(k, dim=-1)
            bottom = scores.topk(k, dim=-1, largest=False)
            parts.append((top.indices.cpu(), top.values.cpu(), bottom.indices.cpu(), bottom.values.cpu()))
    top_ids, top_scores, bottom_ids, bottom_scores = (torch.cat(p) for p in zip(*parts))
    return ValueTokens(
        layer=block, neurons=idx, top_ids=top_ids, top_scores=top_scores, bottom_ids=bottom_ids,
        bottom_scores=bottom_scores,
        convention=convention(through_final_norm, arch.out_norm("mlp", block) is not None, cosine),
        token_strings=token_strings(tokenizer, top_ids, bottom_ids), d_expert=d_expert_of(arch, block),
    )


# --- deletion neurons ---------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class DeletionNeurons(Saveable):
    """``cos[l, i] = cos(k_i ⊙ γ, v_i)`` for every neuron: ``[n_layer, d_mlp]``.

    ``γ`` is the scale of the norm before the MLP (:attr:`reslens.arch.Norm.gamma`: Gemma's
    ``1 + w``; ones where there is none, OLMo 2), so ``k_i ⊙ γ`` is the direction of the
    residual the key reads (up to the norm's centring; with ``centred=True`` the direction is
    :meth:`reslens.arch.Norm.read_direction`, ``centre(k_i ⊙ γ)``, which LayerNorm actually
    reads). ``v_i`` is the direction the value writes (:func:`value_directions`: ``γ_out ⊙ v_i``
    under an MLP output norm, Gemma 2/3 and OLMo 2). Strongly negative neurons write against what
    they read: they delete it (:meth:`deleting`, :meth:`counts`).

    For a gated MLP, ``m_i = act(g_i·x̂)(u_i·x̂)``, so ``k_i`` is the up key ``u_i`` (it sets
    the signed amplitude; the classification uses it) and ``cos_gate`` (``None`` for an
    ungated MLP) is the gate key's ``cos(g_i ⊙ γ, v_i)``, reported beside it: the gate says
    *when* the neuron is open. The meaning of deleting differs between the two kinds. While
    the gate is open (``act(g·x̂) > 0``) a gated neuron writes ``(u_i·x̂) v_i`` times a positive
    factor, linear in ``u_i·x̂``: with ``cos ≪ 0`` it removes the ``±u_i`` component
    *symmetrically*, pushing a positive reading down and a negative one up. GPT-2's GELU
    neuron writes ``gelu(k_i·x̂) v_i``, near zero for negative readings, so it deletes only the
    positive side of ``k_i``.
    """

    cos: torch.Tensor
    centred: bool = False
    cos_gate: torch.Tensor | None = None
    d_expert: int = 0  # memories per expert in a mixture of experts (labels "L2 E1 N5"); 0 when dense

    def __post_init__(self) -> None:
        if self.cos.ndim != 2:
            raise ValueError(f"cos has shape {tuple(self.cos.shape)}; expected [n_layer, d_mlp]")
        if self.cos_gate is not None and self.cos_gate.shape != self.cos.shape:
            raise ValueError(
                f"cos_gate has shape {tuple(self.cos_gate.shape)}; expected {tuple(self.cos.shape)}"
            )

    @property
    def direction(self) -> str:
        """What was compared, in words (axis labels use it)."""
        return "cos(centre(key ⊙ γ), value)" if self.centred else "cos(key ⊙ γ, value)"

    def most_negative(self, k: int = 10, layer: int | None = None) -> list[tuple[int, int, float]]:
        """The ``k`` most negative neurons as ``(layer, neuron, cos)`` (of one layer if given)."""
        check_int(k, "k", low=1)
        if layer is not None:
            layer = check_block(layer, self.cos.shape[0])
        cos = self.cos if layer is None else self.cos[layer : layer + 1]
        flat = cos.flatten().topk(min(k, cos.numel()), largest=False)
        d_mlp = self.cos.shape[1]
        first = 0 if layer is None else layer
        return [(first + i // d_mlp, i % d_mlp, float(v)) for i, v in zip(flat.indices.tolist(), flat.values)]

    def deleting(self, threshold: float = -0.5) -> torch.Tensor:
        """``[n_layer, d_mlp]`` bool: the deletion neurons, ``cos < threshold`` (the up key's when gated)."""
        check_float(threshold, "threshold", low=-1.0, high=1.0)
        return self.cos < threshold

    def counts(self, threshold: float = -0.5) -> torch.Tensor:
        """``[n_layer]`` int: deletion neurons per layer (``cos < threshold``)."""
        return self.deleting(threshold).sum(-1)

    def summary(self) -> torch.Tensor:
        """``[n_layer, 4]``: per layer the mean, minimum, 1st percentile and fraction below -0.5."""
        return torch.stack([self.cos.mean(-1), self.cos.min(-1).values,
                            self.cos.quantile(0.01, dim=-1), (self.cos < -0.5).float().mean(-1)], dim=-1)

    def table(self, k: int = 10) -> str:
        """Per-layer summary lines (with the deletion count), then the ``k`` most negative neurons.

        For a gated MLP each line also gives the mean gate-key cosine of that layer's deletion
        neurons, and each listed neuron its gate-key cosine.
        """
        s, deleting = self.summary(), self.deleting()
        counts = deleting.sum(-1).tolist()
        gated = self.cos_gate is not None
        head = f"{'layer':>5} {'mean cos':>9} {'min':>7} {'1st pct':>8} {'< -0.5':>7} {'count':>6}"
        lines = [f"{self.direction} per neuron" + (" (up key; gate key's cos beside it)" if gated else ""),
                 head + (f" {'their cos_gate':>15}" if gated else "")]
        for la in range(len(s)):
            line = (f"{la:>5} {s[la, 0]:>9.3f} {s[la, 1]:>7.3f} {s[la, 2]:>8.3f} {s[la, 3]:>7.3f} "
                    f"{counts[la]:>6}")
            if self.cos_gate is not None:
                theirs = self.cos_gate[la][deleting[la]]
                line += f" {float(theirs.mean()):>15.3f}" if len(theirs) else f" {'-':>15}"
            lines.append(line)
        lines.append(f"deletion neurons (cos < -0.5): {sum(counts)} of {self.cos.numel()}")
        worst = []
        for la, n, c in self.most_negative(k):
            gate = f", gate {float(self.cos_gate[la, n]):.2f}" if self.cos_gate is not None else ""
            worst.append(f"{memory_label(la, n, self.d_expert)} ({c:.2f}{gate})")
        lines.append("most negative: " + ", ".join(worst))
        return "\n".join(lines)

    def to_frame(self):
        """``pandas.DataFrame``: one row per (layer, neuron)."""
        pd = pandas("DeletionNeurons.to_frame")
        n_layer, d_mlp = self.cos.shape
        columns = {"layer": torch.arange(n_layer).repeat_interleave(d_mlp).numpy(),
                   "neuron": torch.arange(d_mlp).repeat(n_layer).numpy(), "cos": self.cos.flatten().numpy()}
        if self.cos_gate is not None:
            columns["cos_gate"] = self.cos_gate.flatten().numpy()
        return pd.DataFrame(columns)

    def plot(self, *, ax=None):
        """Per-layer histograms of the cosines (see :func:`reslens.plot.plot_deletion_neurons`)."""
        from reslens.plot import plot_deletion_neurons

        return plot_deletion_neurons(self, ax=ax)

    def __repr__(self) -> str:
        n_layer, d_mlp = self.cos.shape
        return (f"DeletionNeurons({self.direction}: {n_layer} layers x {d_mlp} neurons, "
                f"{int((self.cos < -0.5).sum())} below -0.5"
                f"{', with gate keys' if self.cos_gate is not None else ''})")

    def _repr_html_(self) -> str:
        s = self.summary()
        rows = [(la, *(f"{float(v):.3f}" for v in s[la])) for la in range(len(s))]
        header = ("layer", "mean", "min", "1st pct", "< -0.5")
        return html_table(f"DeletionNeurons: {self.direction}", header, rows)


def _cosines(arch: Arch, layer: int, key: torch.Tensor, value: torch.Tensor, centred: bool) -> torch.Tensor:
    norm = arch.norm("mlp", layer)
    reads = norm.read_direction(key) if centred else key.float() * norm.gamma.to(key.device)
    return torch.nn.functional.cosine_similarity(reads, value.to(reads.device), dim=-1)


def deletion_neurons(model: Any, *, centred: bool = False) -> DeletionNeurons:
    """Cosine between each neuron's input direction ``k_i ⊙ γ`` and its value ``v_i``, every layer.

    ``γ`` is the scale of the norm before the MLP, and ``v_i`` the direction the value writes
    (``γ_out ⊙ v_i`` under an MLP output norm: :func:`value_directions`). ``centred=True`` compares
    ``centre(k_i ⊙ γ)`` instead (:meth:`reslens.arch.Norm.read_direction`: the direction a
    LayerNorm's reader actually reads; the same as ``False`` for RMSNorm). For a gated MLP,
    ``cos`` uses the up keys (``W_in``), which classify the neuron, and ``cos_gate`` the gate
    keys. A gated deletion neuron removes the ``±u`` component symmetrically while its gate is
    open; a GELU one removes only the positive side of its key (see :class:`DeletionNeurons`).
    """
    arch = adapter(model)
    check_bool(centred, "centred")
    cos, cos_gate = [], []
    with torch.no_grad():
        for layer in range(arch.n_layer):
            w = arch.mlp_weights(layer)
            writes = value_directions(arch, layer)
            cos.append(_cosines(arch, layer, w.W_in, writes, centred).cpu())
            if w.W_gate is not None:
                cos_gate.append(_cosines(arch, layer, w.W_gate, writes, centred).cpu())
    return DeletionNeurons(cos=torch.stack(cos), centred=centred, d_expert=d_expert_of(arch, 0),
                           cos_gate=torch.stack(cos_gate) if cos_gate else None)
