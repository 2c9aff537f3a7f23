"""Why the lens changed: the change of a target's lens logit between two rows, split into what was written.

The logit lens reads row ``l`` as ``W_U norm(h_l)``. With the final norm written out at its actual
scale ``σ_l = σ(h_l)`` (exact, not an approximation), the target's logit (minus ``against``'s) is
``u · h_l / σ_l + c``: ``u = γ ⊙ (W_U[target] - W_U[against])`` (centred for LayerNorm; see
:func:`reslens._dla.read_direction`) and ``c`` the final norm's and the LM head's biases, the same in
every row. Between rows ``l < l'`` the blocks ``l .. l'-1`` write ``h_{l'} - h_l``, piece by piece
(every head, the attention output bias, the MLP: :func:`reslens._dla.block_pieces`), so

``logit_{l'} - logit_l = Σ_pieces u · p / σ_{l'} + u · h_l (1 / σ_{l'} - 1 / σ_l)``.

The last term is a piece of its own, ``"norm scale"``: what the change of the final norm's scale
alone does. Each MLP can be split further into its ``memories`` key-value memories of largest
effect (``m_i v_i``, through the MLP's output norm where the family has one:
:func:`reslens.kv_memory.contributions_of`) and the rest of that MLP (its other memories and its
output bias); with a :class:`~reslens.kv_memory.TriggerIndex` each memory piece carries its top
trigger examples. Under a final-logit soft-cap (Gemma 2) the pieces above explain the logit before
the cap and a ``"softcap"`` piece, the cap's own change, makes them sum to the change of the logit
the lens shows. With ``against``, the logit difference is also the change of ``log p(target) -
log p(against)``. The pieces sum to the change to float32 rounding on every family.

:func:`lens_change_of` reads captured :class:`~reslens.residuals.Residuals`; :func:`lens_change`
captures them; :func:`lens_changes` gives every consecutive step ``l -> l+1`` of one capture.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from reslens._checks import check_int, check_position
from reslens._dla import block_pieces, read_direction
from reslens._inputs import as_batch
from reslens._saving import Saveable
from reslens._text import head_label, html_table, pandas
from reslens._tokens import token_id, token_strings
from reslens.arch import Arch, adapter
from reslens.hooks import _capture
from reslens.lens.values import as_lens
from reslens.residuals import Residuals

__all__ = ["LensChange", "CHANGE_KINDS", "CHANGE_SITES", "lens_change", "lens_change_of", "lens_changes"]

#: The kinds of piece: per block its heads, attention bias and MLP (or its memories and the MLP's rest),
#: then the final norm's change of scale and, under a final-logit soft-cap, the cap's own change.
CHANGE_KINDS = ("head", "attn_bias", "mlp", "memory", "mlp_rest", "norm_scale", "softcap")
_PER_LAYER = ("head", "attn_bias", "mlp", "memory", "mlp_rest")
#: The sites :func:`lens_change_of` reads (``mlp_act`` only to split MLPs into memories).
CHANGE_SITES = ("resid", "attn_z", "mlp_out", "mlp_act")
#: Trigger examples kept per memory piece when an index is given.
N_TRIGGERS = 3


@dataclass(frozen=True, repr=False, eq=False)
class LensChange(Saveable):
    """The change of the lens's logit (difference) from row ``start`` to row ``stop``, split into pieces.

    Piece ``c``: ``kind[c]`` (one of :data:`CHANGE_KINDS`), ``layer[c]`` (its block; -1 for
    ``norm_scale``/``softcap``), ``head[c]`` (-1 where not a head), ``neuron[c]`` (the memory's index
    into ``mlp_act``; -1 where not a memory) and ``d_expert[c]`` (memories per expert of a mixture of
    experts, else 0); ``labels`` derive from them (``"l.h"``, ``"attn_bias l"``, ``"mlp l"``,
    ``"L2N5"`` or ``"L2 E1 N5"``, ``"mlp l rest"``, ``"norm scale"``, ``"softcap"``).

    - ``contributions: [C]`` float32; :attr:`total` (their sum) equals :attr:`change`
      (``logit[stop] - logit[start]``) to float32 rounding
    - ``logit: [n_layer + 1]``: the lens's logit of ``target`` (minus ``against``'s) at every resid row,
      as the lens shows it (after a final soft-cap); ``raw_logit`` before the cap (the same without one)
    - ``scale: [n_layer + 1]``: the final norm's ``σ`` at every row
    - ``prob``, ``against_prob: [n_layer + 1]``: the lens's probability of each token (``against_prob``
      None without ``against``)
    - ``input_ids: [pos]`` the sequence, ``position`` the explained position on its (padded) axis
    - ``triggers``: per piece, the top trigger examples of a memory (formatted lines; ``()`` elsewhere)
    """

    contributions: torch.Tensor
    kind: tuple[str, ...]
    layer: torch.Tensor
    head: torch.Tensor
    neuron: torch.Tensor
    d_expert: torch.Tensor
    start: int
    stop: int
    logit: torch.Tensor
    raw_logit: torch.Tensor
    scale: torch.Tensor
    prob: torch.Tensor
    against_prob: torch.Tensor | None
    input_ids: torch.Tensor
    position: int
    target: int
    against: int | None
    n_layer: int
    triggers: tuple[tuple[str, ...], ...] = ()
    token_strings: dict[int, str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", tuple(self.kind))
        n = len(self.kind)
        if not self.triggers:
            object.__setattr__(self, "triggers", ((),) * n)
        for name in ("contributions", "layer", "head", "neuron", "d_expert"):
            if tuple(getattr(self, name).shape) != (n,):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}; expected {(n,)}")
        if len(self.triggers) != n:
            raise ValueError(f"triggers holds {len(self.triggers)} entries; expected one per piece ({n})")
        unknown = sorted(set(self.kind) - set(CHANGE_KINDS))
        if unknown:
            raise ValueError(f"kind holds unknown piece kinds {unknown}; known: {', '.join(CHANGE_KINDS)}")
        if not 0 <= self.start < self.stop <= self.n_layer:
            raise ValueError(f"start={self.start}, stop={self.stop}: expected 0 <= start < stop <= "
                             f"{self.n_layer}")
        for k, layer, head, neuron in zip(self.kind, self.layer.tolist(), self.head.tolist(),
                                          self.neuron.tolist()):
            ok = (self.start <= layer < self.stop if k in _PER_LAYER else layer == -1) and (
                (head >= 0) == (k == "head")) and ((neuron >= 0) == (k == "memory"))
            if not ok:
                raise ValueError(f"piece ({k!r}, layer {layer}, head {head}, neuron {neuron}) is "
                                 f"inconsistent with rows {self.start} -> {self.stop}")
        rows = (self.n_layer + 1,)
        for name in ("logit", "raw_logit", "scale", "prob", "against_prob"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != rows:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {rows}")

    @property
    def labels(self) -> tuple[str, ...]:
        """One label per piece, derived from ``kind``, ``layer``, ``head`` and ``neuron``."""
        out = []
        for kind, layer, head, neuron, width in zip(self.kind, self.layer.tolist(), self.head.tolist(),
                                                    self.neuron.tolist(), self.d_expert.tolist()):
            if kind == "head":
                out.append(head_label(layer, head))
            elif kind == "memory":
                out.append(f"L{layer}N{neuron}" if not width else
                           f"L{layer} E{neuron // width} N{neuron % width}")
            else:
                out.append({"mlp_rest": f"mlp {layer} rest", "norm_scale": "norm scale"}.get(
                    kind, f"{kind} {layer}" if layer >= 0 else kind))
        return tuple(out)

    @property
    def change(self) -> float:
        """``logit[stop] - logit[start]``: the change of the lens's logit (difference) to explain."""
        return float(self.logit[self.stop] - self.logit[self.start])

    @property
    def total(self) -> float:
        """The sum of the pieces (equals :attr:`change` to float32 rounding)."""
        return float(self.contributions.sum())

    @property
    def overtake_layer(self) -> int | None:
        """The first lens row from which ``target`` stays ahead of ``against`` (``logit > 0`` to the output).

        None without ``against`` or where the output row does not put ``target`` ahead.
        """
        if self.against is None or not bool(self.logit[-1] > 0):
            return None
        behind = (self.logit <= 0).nonzero().flatten()
        return 0 if not len(behind) else int(behind[-1]) + 1

    def token(self, token_id: int) -> str:
        """The decoded token (its id as text when no tokenizer was given)."""
        if self.token_strings is None:
            return str(int(token_id))
        return self.token_strings.get(int(token_id), str(int(token_id)))

    def describe(self) -> str:
        """What changes, e.g. ``"logit of ' Paris' - logit of ' London' at position 9, row 20 -> 21"``."""
        what = f"logit of {self.token(self.target)!r}"
        if self.against is not None:
            what += f" - logit of {self.token(self.against)!r}"
        return what + f" at position {self.position}, lens row {self.start} -> {self.stop}"

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` pieces of largest magnitude as ``(label, contribution)``."""
        check_int(k, "k", low=1)
        order = self.contributions.abs().argsort(descending=True, stable=True)[:k].tolist()
        labels = self.labels
        return [(labels[i], float(self.contributions[i])) for i in order]

    def to_frame(self):
        """``pandas.DataFrame`` of ``label, kind, layer, head, neuron, contribution, triggers`` by piece."""
        pd = pandas("LensChange.to_frame")
        return pd.DataFrame({
            "label": list(self.labels), "kind": list(self.kind), "layer": self.layer.numpy(),
            "head": self.head.numpy(), "neuron": self.neuron.numpy(),
            "contribution": self.contributions.numpy(), "triggers": [" | ".join(t) for t in self.triggers],
        })

    def _probs(self, row: int) -> str:
        text = f"p({self.token(self.target)!r}) {float(self.prob[row]):.3g}"
        if self.against_prob is not None:
            text += f", p({self.token(self.against)!r}) {float(self.against_prob[row]):.3g}"
        return text

    def table(self, k: int = 10) -> str:
        """The two rows' values, the change, the sum of the pieces and the ``k`` largest pieces."""
        start, stop = float(self.logit[self.start]), float(self.logit[self.stop])
        lines = [self.describe() + f": {start:+.4f} -> {stop:+.4f}, change {self.change:+.4f}, "
                 f"sum of pieces {self.total:+.4f}",
                 f"  row {self.start}: {self._probs(self.start)}; row {self.stop}: {self._probs(self.stop)}"]
        index = {label: i for i, label in enumerate(self.labels)}
        for label, value in self.top(k):
            lines.append(f"  {label:<16} {value:+.4f}")
            lines += [f"      {t}" for t in self.triggers[index[label]]]
        rest = len(self.kind) - min(k, len(self.kind))
        if rest:
            shown = sum(v for _, v in self.top(k))
            lines.append(f"  {f'other {rest} pieces':<16} {self.total - shown:+.4f}")
        return "\n".join(lines)

    def plot(self, k: int = 10, *, ax=None):
        """A waterfall from row ``start``'s value through the ``k`` largest pieces to row ``stop``'s.

        The other pieces are one bar; on ``ax`` or a new figure. Returns the figure.
        """
        from reslens.lens._plot import plot_lens_change

        return plot_lens_change(self, k, ax=ax)

    def __repr__(self) -> str:
        return (f"LensChange({self.describe()}: change {self.change:+.4f}, {len(self.kind)} pieces, "
                f"top: {self.top(3)})")

    def _repr_html_(self) -> str:
        start, stop = float(self.logit[self.start]), float(self.logit[self.stop])
        rows = [(f"row {self.start}", "", start), *((label, "piece", v) for label, v in self.top(10)),
                (f"row {self.stop}", "", stop)]
        note = f"(change {self.change:+.4f}; the {len(self.kind)} pieces sum to {self.total:+.4f})"
        return html_table(f"LensChange: {self.describe()}", ("", "", "logit"), rows, note=note)


# --- computing it -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    """The checked arguments: ``seq``, ``position``, the rows, the token ids, ``memories``, ``index``."""

    seq: int
    position: int
    start: int
    stop: int
    target: int
    against: int | None
    memories: int
    index: Any


def _span(layers: Any, n_layer: int) -> tuple[int, int]:
    """``(start, stop)`` of ``layers``: None (0 -> n_layer), ``l`` (l -> l+1) or a pair ``(l, l')``."""
    if layers is None:
        return 0, n_layer
    if isinstance(layers, (list, tuple)):
        if len(layers) != 2:
            raise ValueError(f"layers must be one block l (for rows l -> l+1) or two rows (l, l'); "
                             f"got {layers!r}")
        start, stop = (check_int(x, f"layers[{i}]", low=0, high=n_layer) for i, x in enumerate(layers))
        if start >= stop:
            raise ValueError(f"layers={tuple(layers)!r}: the first row must come before the second "
                             f"(l < l', rows 0..{n_layer}); got l={start}, l'={stop}")
        return start, stop
    if isinstance(layers, bool) or not isinstance(layers, int):
        raise TypeError(f"layers must be None, a block l (rows l -> l+1) or a pair of rows (l, l'); "
                        f"got {type(layers).__name__}")
    block = check_int(layers, "layers", low=0, high=n_layer - 1)
    return block, block + 1


def _check_index(index: Any, arch: Arch) -> None:
    from reslens.kv_memory import TriggerIndex, model_fingerprint

    if index is None:
        return
    if not isinstance(index, TriggerIndex):
        raise TypeError(f"index must be a reslens TriggerIndex (kv_memory.mine_triggers) or None; "
                        f"got {type(index).__name__}")
    sizes = {"n_layer": arch.n_layer, "d_mlp": arch.d_mlp, "d_vocab": arch.d_vocab}
    mined = {"n_layer": index.n_layer, "d_mlp": index.d_mlp, "d_vocab": index.d_vocab}
    if mined != sizes:
        raise ValueError(f"index was mined on a model with {mined}; this model has {sizes}")
    if index.model_fingerprint and model_fingerprint(arch, index.layers) != index.model_fingerprint:
        raise ValueError(f"index was mined on a model with other weights ({index.model_name or 'unnamed'})")


def _options(arch: Arch, mask: torch.Tensor, target: Any, *, layers: Any, against: Any, position: Any,
             seq: Any, tokenizer: Any, memories: Any, index: Any) -> _Options:
    """Every argument checked once, before any forward."""
    batch = mask.shape[0]
    seq = check_int(seq, "seq", low=-batch, high=batch - 1) % batch
    pos = int(check_position(position, mask[seq : seq + 1])[0])
    start, stop = _span(layers, arch.n_layer)
    vocab = dict(d_vocab=arch.d_vocab, tokenizer=tokenizer)
    target = token_id(target, name="target", **vocab)
    against = None if against is None else token_id(against, name="against", **vocab)
    if against == target:
        raise ValueError(f"against={against} is the target itself; the difference would be 0")
    memories = check_int(memories, "memories", low=0)
    _check_index(index, arch)
    return _Options(seq, pos, start, stop, target, against, memories, index)


def _check_residuals(residuals: Any, arch: Arch, memories: int) -> None:
    if not isinstance(residuals, Residuals):
        raise TypeError(f"residuals must be reslens Residuals (from capture); got {type(residuals).__name__}")
    sites = CHANGE_SITES if memories else CHANGE_SITES[:3]
    residuals.require(*sites, what="lens_change_of" + (" with memories" if memories else ""))
    if residuals.layers != tuple(range(arch.n_layer + 1)) or residuals.blocks != tuple(range(arch.n_layer)):
        raise ValueError(f"lens_change_of needs every resid layer (0..{arch.n_layer}) and every block; these "
                         f"Residuals hold layers {list(residuals.layers)} (capture with layers=None)")
    if residuals.input_ids is None:
        raise ValueError("lens_change_of needs the residuals' input_ids; capture them with reslens.capture")
    if residuals.resid.shape[-1] != arch.d_model or residuals.attn_z.shape[-1] != arch.n_head * arch.d_head:
        raise ValueError(f"these Residuals (d_model {residuals.resid.shape[-1]}) come from another model "
                         f"than {arch!r}")


def _rows(arch: Arch, h: torch.Tensor, opt: _Options) -> dict[str, torch.Tensor | None]:
    """The lens at every row of ``h [n_layer + 1, d_model]``: logit (difference), raw, σ, probabilities."""
    norm = arch.norm("final")
    raw = arch.unembed_raw(norm(h.to(arch.dtype)))  # [R, V]: the lens's logits, as the lens computes them
    shown = arch.softcap_logits(raw).float()
    raw = raw.float()
    logp = shown.log_softmax(-1)
    a = opt.against

    def diff(z: torch.Tensor) -> torch.Tensor:
        return z[:, opt.target] - (z[:, a] if a is not None else 0)

    return dict(logit=diff(shown), raw_logit=diff(raw), scale=norm.scale(h), prob=logp[:, opt.target].exp(),
                against_prob=None if a is None else logp[:, a].exp())


def _memories(arch: Arch, residuals: Residuals, block: int, opt: _Options, u: torch.Tensor,
              sigma: torch.Tensor, tokenizer: Any) -> tuple[list[float], list[int], list[Any], float, int]:
    """Block ``block``'s MLP as its ``opt.memories`` memories of largest effect and the rest.

    ``(effects, neurons, triggers, rest, d_expert)``; ``rest`` = the other memories and the output bias.
    """
    from reslens.kv_memory import contributions_of

    c = contributions_of(residuals, arch, block, opt.position, seq=opt.seq)
    u, sigma = u.float().cpu(), sigma.float().cpu()
    effect = c.coefficients * (c.values @ u) / sigma  # [d_mlp]
    top = effect.abs().argsort(descending=True, stable=True)[: opt.memories]
    others = torch.ones_like(effect, dtype=torch.bool)
    others[top] = False
    rest = float(effect[others].sum() + (c.bias @ u) / sigma)
    index, triggers = opt.index, []
    for neuron in top.tolist():
        shown = index is not None and block in index.layers
        lines = index.format(block, neuron, N_TRIGGERS, tokenizer=tokenizer).splitlines()[1:] if shown else []
        triggers.append(tuple(lines))
    return effect[top].tolist(), top.tolist(), triggers, rest, c.d_expert


#: one piece: kind, layer, head, neuron, d_expert, contribution, trigger lines
_Piece = tuple[str, int, int, int, int, float, tuple[str, ...]]


def _pieces(arch: Arch, residuals: Residuals, opt: _Options, h: torch.Tensor, rows: dict[str, Any],
            tokenizer: Any) -> list[_Piece]:
    """Every piece of ``rows["logit"][stop] - rows["logit"][start]`` (``h``: the position's resid rows)."""
    device = h.device
    t = torch.tensor([opt.target], device=device)
    a = None if opt.against is None else torch.tensor([opt.against], device=device)
    u = read_direction(arch, t, a, device)[1][0]  # [d_model]
    sigma, first = rows["scale"][opt.stop].to(device), rows["scale"][opt.start].to(device)
    at = torch.tensor([opt.seq], device=device), torch.tensor([opt.position], device=device)
    pieces: list[_Piece] = []
    for block in range(opt.start, opt.stop):
        parts, kinds, layers, heads = block_pieces(arch, residuals, block, *at)
        values = (torch.cat([p.to(device) for p in parts], dim=1)[0] @ u / sigma).tolist()
        for kind, layer, head, value in zip(kinds, layers, heads, values):
            if kind != "mlp" or not opt.memories:
                pieces.append((kind, layer, head, -1, 0, value, ()))
                continue
            effects, neurons, triggers, rest, width = _memories(arch, residuals, block, opt, u, sigma,
                                                                tokenizer)
            pieces += [("memory", block, -1, n, width, e, lines)
                       for e, n, lines in zip(effects, neurons, triggers)]
            pieces.append(("mlp_rest", block, -1, -1, 0, rest, ()))
    pieces.append(("norm_scale", -1, -1, -1, 0, float(h[opt.start] @ u * (1 / sigma - 1 / first)), ()))
    if arch.final_softcap is not None:  # the cap's own change: the pieces sum to the logit the lens shows
        shown, raw = rows["logit"], rows["raw_logit"]
        cap = (shown[opt.stop] - shown[opt.start]) - (raw[opt.stop] - raw[opt.start])
        pieces.append(("softcap", -1, -1, -1, 0, float(cap), ()))
    return pieces


def _change_of(residuals: Residuals, arch: Arch, opt: _Options, tokenizer: Any) -> LensChange:
    """:func:`lens_change_of` of checked arguments."""
    h = residuals.resid[:, opt.seq, opt.position].float()  # [n_layer + 1, d_model]
    with torch.no_grad():
        rows = _rows(arch, h, opt)
        pieces = _pieces(arch, residuals, opt, h, rows, tokenizer)
    kind, layer, head, neuron, width, value, triggers = zip(*pieces)
    ids = torch.tensor([opt.target] + ([] if opt.against is None else [opt.against]))

    def long(values: tuple[int, ...]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    return LensChange(
        contributions=torch.tensor(value, dtype=torch.float32), kind=kind, layer=long(layer), head=long(head),
        neuron=long(neuron), d_expert=long(width), start=opt.start, stop=opt.stop,
        **{name: None if v is None else v.float().cpu() for name, v in rows.items()},
        input_ids=residuals.input_ids[opt.seq].cpu(), position=opt.position, target=opt.target,
        against=opt.against, n_layer=arch.n_layer, triggers=triggers,
        token_strings=token_strings(tokenizer, ids),
    )


def lens_change_of(
    residuals: Residuals, arch: Any, target: Any, *, layers: Any = None, against: Any = None,
    position: int | None = None, seq: int = 0, tokenizer: Any = None, memories: int = 5, index: Any = None,
) -> LensChange:
    """Why the lens changed, from captured residuals (no forward): see :func:`lens_change`.

    ``residuals`` must hold ``resid`` at every layer and ``attn_z``, ``mlp_out`` (and, with
    ``memories``, ``mlp_act``) of every block, as ``capture(model, inputs, sites=CHANGE_SITES)``
    records; ``arch``: the model or its adapter.
    """
    arch = adapter(arch)
    check_int(memories, "memories", low=0)
    _check_residuals(residuals, arch, memories)
    opt = _options(arch, residuals.attention_mask, target, layers=layers, against=against, position=position,
                   seq=seq, tokenizer=tokenizer, memories=memories, index=index)
    return _change_of(residuals, arch, opt, tokenizer)


def _capture_for(model: Any, inputs: Any, target: Any, lens: Any, tokenizer: Any, **options: Any):
    """``(arch, residuals, options)``: everything checked, then one capture of what the change reads."""
    arch = adapter(model)
    if as_lens(lens).kind != "logit":
        raise ValueError(f"lens={as_lens(lens).name!r}: the change is split exactly only for the logit lens "
                         "(a learned lens translates each layer by its own map, so the rows' difference is "
                         "not a sum of what the blocks wrote); pass lens=None")
    batch = as_batch(inputs, arch, tokenizer)
    opt = _options(arch, batch.attention_mask, target, tokenizer=tokenizer, **options)
    sites = CHANGE_SITES if opt.memories else CHANGE_SITES[:3]
    residuals = _capture(arch, batch, sites=sites, layers=tuple(range(arch.n_layer + 1)), dtype=torch.float32)
    return arch, residuals, opt


def lens_change(
    model: Any, inputs: Any, target: Any, *, layers: Any = None, against: Any = None,
    position: int | None = None, seq: int = 0, tokenizer: Any = None, memories: int = 5, index: Any = None,
    lens: Any = None,
) -> LensChange:
    """Why the logit lens changed between two rows: the change of ``target``'s logit, split into pieces.

    ``layers``: a block ``l`` (rows ``l -> l+1``), a pair of rows ``(l, l')`` with ``l < l'`` (rows
    are resid layers ``0..n_layer``; row ``n_layer`` is the model's output), or None for the whole
    depth ``0 -> n_layer``. ``target`` / ``against``: a token id or one token's text (with
    ``tokenizer=``); with ``against`` the logit difference, which is also the difference of the
    two tokens' log-probabilities. ``position``: an index of the (padded) ``pos`` axis of
    sequence ``seq``, None (default) for its last real token. ``memories``: how many key-value
    memories of largest effect each MLP is split into (0: the MLP is one piece); ``index``: a
    :class:`~reslens.kv_memory.TriggerIndex` whose top examples each memory piece then carries.
    ``lens``: only the logit lens (None) is split; a learned lens is refused. Pieces: see
    :mod:`reslens.lens.change`; they sum to the change to float32 rounding. Computed in float32
    from activations captured in float32. With a capture of your own, use :func:`lens_change_of`.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> change = lens_change(model, torch.tensor([[1, 2, 3]]), target=7, against=8, layers=1, memories=2)
    >>> change.kind
    ('head', 'head', 'attn_bias', 'memory', 'memory', 'mlp_rest', 'norm_scale')
    >>> abs(change.total - change.change) < 1e-5
    True
    """
    arch, residuals, opt = _capture_for(model, inputs, target, lens, tokenizer, layers=layers,
                                        against=against, position=position, seq=seq, memories=memories,
                                        index=index)
    return _change_of(residuals, arch, opt, tokenizer)


def lens_changes(
    model: Any, inputs: Any, target: Any, *, against: Any = None, position: int | None = None, seq: int = 0,
    tokenizer: Any = None, memories: int = 5, index: Any = None, lens: Any = None,
) -> tuple[LensChange, ...]:
    """Every step of the logit lens, ``l -> l+1`` for ``l = 0..n_layer-1``, from one capture.

    The options are :func:`lens_change`'s. Each step carries the whole row trajectory (``logit``,
    ``prob``), so ``changes[0].overtake_layer`` is the first row from which ``target`` stays ahead of
    ``against``, and ``changes[layer - 1]`` says which pieces put it there.
    """
    arch, residuals, opt = _capture_for(model, inputs, target, lens, tokenizer, layers=None, against=against,
                                        position=position, seq=seq, memories=memories, index=index)
    return tuple(_change_of(residuals, arch, replace(opt, start=block, stop=block + 1), tokenizer)
                 for block in range(arch.n_layer))
