"""Direct logit attribution: the final logit (difference) split into the pieces that write the residual.

The final residual ``x = resid[n_layer]`` at a position is exactly the sum of the embedding
pieces (:meth:`~reslens.arch.Arch.embedding_components`: the token embedding, plus learned
position embeddings where the family has them) and, per block, every head's ``z_h @ W_O[h]``,
the attention output bias (where the family has one) and the MLP output. With the final norm
linearised at ``x`` (its scale ``σ(x)`` held at its actual value), each piece ``p`` contributes
``read_direction(u) · p / σ`` to the logit, ``u = W_U[target] - W_U[against]``; the final norm's
bias (LayerNorm) and the LM head's bias, where they exist, are pieces of their own. The pieces
sum to the model's own logit exactly, to float rounding.

By family: GPT-2 has ``pos_embed``, ``attn_bias`` and ``norm_bias`` pieces; the Llama family
(Llama, Mistral, Qwen2) has none of them. Under rotary positions the residual stream carries no
position vector (position acts inside attention, so its effect is part of the head pieces);
RMSNorm has no bias and does not centre, so ``σ = sqrt(mean(x²) + eps)`` and the reader is
``γ ⊙ u``; Qwen2's value bias is inside each head's ``z``. A tied head (``W_U = W_E``) or an
untied one makes no difference to the method. Where the heads' sum passes a norm before it joins
the residual (Gemma 2/3, OLMo 2), the head pieces go through it linearised at its actual scale
(:meth:`~reslens.arch.Arch.attn_pieces`), so they still sum exactly; Gemma's embedding piece carries
its ``√d_model`` scale. Under a final-logit soft-cap (Gemma 2) the pieces sum to the logit before the
cap (``logit`` is that one), since ``c · tanh(l / c)`` is not a sum.

:func:`logit_attribution_of` reads captured :class:`~reslens.residuals.Residuals` (sites
``resid``, ``attn_z``, ``mlp_out``, ``logits``); :func:`logit_attribution` captures them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from reslens._checks import check_int, check_position
from reslens._dla import block_pieces, read_direction
from reslens._inputs import as_batch
from reslens._saving import Saveable
from reslens._text import head_label, html_table, pandas
from reslens._tokens import token_ids, token_strings
from reslens.arch import Arch, adapter
from reslens.heads.scores import HeadScores
from reslens.hooks import _capture
from reslens.residuals import Residuals

__all__ = ["LogitAttribution", "PIECE_KINDS", "ATTRIBUTION_SITES", "logit_attribution",
           "logit_attribution_of"]

#: The kinds of piece, in the order they appear (``unembed_bias`` only with an LM-head bias).
PIECE_KINDS = ("embed", "pos_embed", "head", "attn_bias", "mlp", "norm_bias", "unembed_bias")
_PER_LAYER = ("head", "attn_bias", "mlp")
#: The sites :func:`logit_attribution_of` reads.
ATTRIBUTION_SITES = ("resid", "attn_z", "mlp_out", "logits")


@dataclass(frozen=True)
class LogitAttribution(Saveable):
    """The final logit (or logit difference) at one position per sequence, split into pieces.

    Piece ``c`` is described by ``kind[c]`` (one of :data:`PIECE_KINDS`), ``layer[c]`` (-1 where not
    per layer) and ``head[c]`` (-1 where not a head); ``labels`` are derived from them
    (``"embed"``, ``"pos_embed"``, ``"l.h"``, ``"attn_bias l"``, ``"mlp l"``, ``"norm_bias"``,
    ``"unembed_bias"``). In order: the embedding pieces, then per layer every head, the
    attention output bias and the MLP, then the biases after the final norm.

    - ``contributions: [batch, n_components]`` float32; ``logit: [batch]`` the model's own
      logit (difference), computed by the model; ``sum()`` equals it to float rounding
    - ``input_ids``, ``attention_mask``: ``[batch, pos]``; ``position``, ``target``: ``[batch]``;
      ``against: [batch]`` or None; ``scale: [batch]`` (the final norm's ``σ``)
    """

    contributions: torch.Tensor
    kind: tuple[str, ...]
    layer: torch.Tensor
    head: torch.Tensor
    logit: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position: torch.Tensor
    target: torch.Tensor
    against: torch.Tensor | None
    scale: torch.Tensor
    n_layer: int
    n_head: int
    token_strings: dict[int, str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", tuple(self.kind))
        batch, n = self.input_ids.shape[0], len(self.kind)
        if tuple(self.contributions.shape) != (batch, n):
            got = tuple(self.contributions.shape)
            raise ValueError(f"contributions has shape {got}; expected {(batch, n)}")
        unknown = sorted(set(self.kind) - set(PIECE_KINDS))
        if unknown:
            raise ValueError(f"kind holds unknown piece kinds {unknown}; known: {', '.join(PIECE_KINDS)}")
        for name in ("layer", "head"):
            if tuple(getattr(self, name).shape) != (n,):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}; expected {(n,)}")
        for k, layer, head in zip(self.kind, self.layer.tolist(), self.head.tolist()):
            layer_ok = 0 <= layer < self.n_layer if k in _PER_LAYER else layer == -1
            head_ok = 0 <= head < self.n_head if k == "head" else head == -1
            if not (layer_ok and head_ok):
                raise ValueError(
                    f"piece ({k!r}, layer {layer}, head {head}) is inconsistent: layer and head are -1 "
                    "exactly where a piece is not per layer / not a head, and lie within "
                    f"{self.n_layer} layers of {self.n_head} heads"
                )
        is_head = torch.tensor([k == "head" for k in self.kind], dtype=torch.bool)
        if int(is_head.sum()) != self.n_layer * self.n_head:
            raise ValueError(
                f"{int(is_head.sum())} head pieces do not fit {self.n_layer} layers of {self.n_head} heads"
            )
        for name in ("logit", "position", "target", "against", "scale"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (batch,):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {(batch,)}")

    @property
    def labels(self) -> tuple[str, ...]:
        """One label per piece, derived from ``kind``, ``layer`` and ``head``."""
        out = []
        for kind, layer, head in zip(self.kind, self.layer.tolist(), self.head.tolist()):
            if kind == "head":
                out.append(head_label(layer, head))
            else:
                out.append(f"{kind} {layer}" if layer >= 0 else kind)
        return tuple(out)

    def sum(self) -> torch.Tensor:
        """``[batch]``: the sum of all pieces (equals ``logit`` to float rounding)."""
        return self.contributions.sum(-1)

    def heads(self) -> torch.Tensor:
        """Head pieces as ``[batch, n_layer, n_head]``."""
        index = torch.full((self.n_layer, self.n_head), -1, dtype=torch.long)
        cols = torch.tensor([k == "head" for k in self.kind]).nonzero().flatten()
        index[self.layer[cols], self.head[cols]] = cols
        return self.contributions[:, index.flatten()].reshape(-1, self.n_layer, self.n_head)

    def head_scores(self, seq: int = 0) -> HeadScores:
        """Head pieces of sequence ``seq`` as :class:`~reslens.heads.HeadScores`."""
        seq = self._seq(seq)
        return HeadScores(self.heads()[seq], "direct logit attribution", self.describe(seq))

    def _seq(self, seq: Any) -> int:
        return check_int(seq, "seq", low=0, high=self.contributions.shape[0] - 1)

    def top(self, k: int = 10, seq: int = 0) -> list[tuple[str, float]]:
        """The ``k`` pieces of largest magnitude in sequence ``seq`` as ``(label, contribution)``."""
        check_int(k, "k", low=1)
        row, labels = self.contributions[self._seq(seq)], self.labels
        order = row.abs().argsort(descending=True, stable=True)[:k].tolist()
        return [(labels[i], float(row[i])) for i in order]

    def token(self, token_id: int) -> str:
        """The decoded token (its id as text when no tokenizer was given)."""
        if self.token_strings is None:
            return str(int(token_id))
        return self.token_strings.get(int(token_id), str(int(token_id)))

    def describe(self, seq: int = 0) -> str:
        """What sequence ``seq``'s pieces add up to, e.g. ``"logit of ' mat' at position 4"``."""
        seq = self._seq(seq)
        what = f"logit of {self.token(int(self.target[seq]))!r}"
        if self.against is not None:
            what += f" - logit of {self.token(int(self.against[seq]))!r}"
        return what + f" at position {int(self.position[seq])}"

    def to_frame(self):
        """``pandas.DataFrame`` of ``seq, label, kind, layer, head, contribution``: one row per piece."""
        pd = pandas()
        batch, n = self.contributions.shape
        return pd.DataFrame({
            "seq": torch.arange(batch).repeat_interleave(n).numpy(),
            "label": list(self.labels) * batch,
            "kind": list(self.kind) * batch,
            "layer": self.layer.repeat(batch).numpy(),
            "head": self.head.repeat(batch).numpy(),
            "contribution": self.contributions.flatten().numpy(),
        })

    def table(self, seq: int = 0, k: int = 10) -> str:
        """The model's logit, the sum of the pieces and the ``k`` largest pieces of sequence ``seq``."""
        seq = self._seq(seq)
        model, total = float(self.logit[seq]), float(self.sum()[seq])
        lines = [self.describe(seq) + f": model {model:.4f}, sum of pieces {total:.4f}"]
        lines += [f"  {label:<12} {value:+.4f}" for label, value in self.top(k, seq)]
        return "\n".join(lines)

    def plot(self, seq: int = 0):
        """Heads as a layers x heads heatmap beside a bar chart of the other pieces. Returns the figure.

        For the bar chart of every piece on axes of your own, use
        :func:`reslens.plot.plot_logit_attribution_bars`.
        """
        from reslens.plot import plot_logit_attribution

        return plot_logit_attribution(self, seq=seq)

    def __repr__(self) -> str:
        return (f"LogitAttribution(batch={self.contributions.shape[0]}, components={len(self.kind)}, "
                f"top: {self.top(3)})")

    def _repr_html_(self) -> str:
        rows = [[seq, self.describe(seq), float(self.logit[seq]), float(self.sum()[seq]),
                 ", ".join(f"{label} {value:+.3f}" for label, value in self.top(3, seq))]
                for seq in range(min(self.contributions.shape[0], 20))]
        header = ["seq", "what", "model", "sum", "top pieces"]
        return html_table(f"LogitAttribution: {len(self.kind)} pieces", header, rows)


# --- computing it -------------------------------------------------------------------------------


def _check_residuals(residuals: Any, arch: Arch) -> None:
    if not isinstance(residuals, Residuals):
        raise TypeError(f"residuals must be reslens Residuals (from capture); got {type(residuals).__name__}")
    residuals.require(*ATTRIBUTION_SITES, what="logit_attribution_of")
    if residuals.blocks != tuple(range(arch.n_layer)) or arch.n_layer not in residuals.layers:
        raise ValueError(
            f"logit_attribution_of needs every block (0..{arch.n_layer - 1}) and resid layer {arch.n_layer}; "
            f"these Residuals hold blocks {list(residuals.blocks)}, layers {list(residuals.layers)} (capture "
            "with layers=None)"
        )
    if residuals.input_ids is None or residuals.position_ids is None:
        raise ValueError("logit_attribution_of needs the residuals' input_ids and position_ids")
    width = arch.n_head * arch.d_head
    if residuals.attn_z.shape[-1] != width or residuals.resid.shape[-1] != arch.d_model:
        raise ValueError(
            f"these Residuals (attn_z width {residuals.attn_z.shape[-1]}, d_model "
            f"{residuals.resid.shape[-1]}) come from another model than {arch!r}"
        )


def _pieces(arch: Arch, residuals: Residuals, rows: torch.Tensor, pos: torch.Tensor):
    """``(pieces [B, C', d_model] float32, kind, layer, head)`` of the residual-stream pieces."""
    kind: list[str] = []
    layer: list[int] = []
    head: list[int] = []
    ids, positions = residuals.input_ids[rows, pos], residuals.position_ids[rows, pos]
    parts = []
    for name, tensor in arch.embedding_components(ids.to(arch.device), positions.to(arch.device)):
        parts.append(tensor.float()[:, None])
        kind.append(name), layer.append(-1), head.append(-1)
    for block in range(arch.n_layer):
        block_parts, block_kind, block_layer, block_head = block_pieces(arch, residuals, block, rows, pos)
        parts += block_parts
        kind += block_kind
        layer += block_layer
        head += block_head
    device = parts[-1].device
    pieces = torch.cat([p.to(device) for p in parts], dim=1)
    return pieces, kind, layer, head


def logit_attribution_of(
    residuals: Residuals, arch: Any, target: Any, *, against: Any = None, position: int | None = None,
    tokenizer: Any = None,
) -> LogitAttribution:
    """Direct logit attribution of captured residuals (no forward): see :func:`logit_attribution`.

    ``residuals`` must hold ``resid`` (layer ``n_layer``), ``attn_z`` and ``mlp_out`` of every
    block, and ``logits``, as ``capture(model, inputs, sites=ATTRIBUTION_SITES)`` records
    (:data:`reslens.attribution.ATTRIBUTION_SITES`); ``arch``: the model or its adapter.
    """
    arch = adapter(arch)
    _check_residuals(residuals, arch)
    n = residuals.attention_mask.shape[0]
    pos = check_position(position, residuals.attention_mask)
    vocab = dict(d_vocab=arch.d_vocab, tokenizer=tokenizer)
    target_ids = token_ids(target, n, name="target", **vocab)
    against_ids = None if against is None else token_ids(against, n, name="against", **vocab)
    rows = torch.arange(n, device=pos.device)
    with torch.no_grad():
        pieces, kind, layer, head = _pieces(arch, residuals, rows, pos)  # [B, C-1, d]
        device = pieces.device
        x = residuals.get("resid", arch.n_layer)[rows, pos].to(device)  # [B, d]: final raw residual
        t, a = target_ids.to(device), None if against_ids is None else against_ids.to(device)
        direction, u, norm = read_direction(arch, t, a, device)  # [B, d], [B, d], the final norm
        scale = norm.scale(x)  # [B]
        contributions = [torch.einsum("bcd,bd->bc", pieces, u) / scale[:, None]]
        if norm.bias is not None:
            contributions.append((direction @ norm.bias.detach().float().to(device))[:, None])
            kind.append("norm_bias"), layer.append(-1), head.append(-1)
        if arch.b_U is not None:
            b = arch.b_U.detach().float().to(device)
            contributions.append((b[t] - (b[a] if a is not None else 0))[:, None])
            kind.append("unembed_bias"), layer.append(-1), head.append(-1)
        logits = residuals.logits[rows, pos].to(device)  # [B, V]
        if arch.final_softcap is not None:  # Gemma 2: the pieces sum to the logit before its soft-cap
            logits = arch.unembed_raw(norm(x.to(arch.dtype)))
        logit = logits.gather(1, t[:, None]).squeeze(1)
        if a is not None:
            logit = logit - logits.gather(1, a[:, None]).squeeze(1)
    return LogitAttribution(
        contributions=torch.cat(contributions, dim=1).float().cpu(), kind=tuple(kind),
        layer=torch.tensor(layer, dtype=torch.long), head=torch.tensor(head, dtype=torch.long),
        logit=logit.float().cpu(), input_ids=residuals.input_ids.cpu(),
        attention_mask=residuals.attention_mask.cpu(), position=pos.cpu(), target=target_ids.cpu(),
        against=None if against_ids is None else against_ids.cpu(), scale=scale.cpu(),
        n_layer=arch.n_layer, n_head=arch.n_head,
        token_strings=token_strings(tokenizer, target_ids, against_ids),
    )


def logit_attribution(
    model: Any, inputs: Any, target: Any, *, against: Any = None, position: int | None = None,
    tokenizer: Any = None,
) -> LogitAttribution:
    """Direct logit attribution of ``target``'s logit (minus ``against``'s) at ``position``.

    The logit is split into the embedding pieces, every head, every attention output bias,
    every MLP and the biases after the final norm, through the final norm linearised at that
    position (see :class:`LogitAttribution`; the pieces sum to the model's logit exactly).

    ``inputs``: ids ``[batch, pos]``, a Batch, or text with ``tokenizer=``. ``target`` /
    ``against``: a token id, a one-token string (with ``tokenizer=``), or one such token per
    sequence. ``position``: an index of the (padded) ``pos`` axis, negatives from its end,
    ``None`` (default) for each sequence's last real token; it must be a real token in every
    sequence. Computed in float32 from activations captured in float32; for a
    float16/bfloat16 model the pieces sum to the logit to that dtype's rounding, not
    float32's. With a capture of your own, use :func:`logit_attribution_of`.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> dla = logit_attribution(model, torch.tensor([[1, 2, 3]]), target=7, against=8)
    >>> dla.labels[:5], len(dla.labels)
    (('embed', 'pos_embed', '0.0', '0.1', 'attn_bias 0'), 11)
    >>> bool(torch.allclose(dla.sum(), dla.logit, atol=1e-5))
    True
    """
    arch = adapter(model)
    batch = as_batch(inputs, arch, tokenizer)
    # check the cheap arguments before the forward
    check_position(position, batch.attention_mask)
    token_ids(target, len(batch), d_vocab=arch.d_vocab, tokenizer=tokenizer, name="target")
    if against is not None:
        token_ids(against, len(batch), d_vocab=arch.d_vocab, tokenizer=tokenizer, name="against")
    residuals = _capture(arch, batch, sites=ATTRIBUTION_SITES, layers=tuple(range(arch.n_layer + 1)),
                         dtype=torch.float32)
    return logit_attribution_of(residuals, arch, target, against=against, position=position,
                                tokenizer=tokenizer)
