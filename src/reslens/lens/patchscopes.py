r"""Patchscopes (Ghandeharioun et al. 2024): a hidden state read by the model itself, through a target prompt.

A residual ``h`` of a source prompt at ``resid`` layer ``l`` is written into a *target prompt* at one
position and ``resid`` layer ``T(l)`` (default ``T(l) = l``), and the model's next-token prediction at
the target prompt's last token is what ``h`` "says". The paper's token-identity prompt
``"cat -> cat\n1135 -> 1135\nhello -> hello\n?"``, patched and read at ``"?"``, asks the model to repeat
the token it is shown (:data:`PROMPTS` has it and attribute prompts in the paper's style; any text or
ids work). Two ways in:

- :class:`Patchscope`, a lens: ``logit_lens(..., lens=Patchscope(model))`` reads every layer and position
  of a text through it, every row in one batched forward (:mod:`reslens.lens._scope_forward`), with the
  logit lens's metrics, table and figures. Its translation of ``h`` at layer ``l`` is the target prompt's
  final residual (the final norm's input) at its last token, so its logits are exactly the patched run's;
  at ``resid n_layer`` it is ``h`` itself, so its last row is the model's own output, as every lens's.
- :func:`patchscope`: one source position, every (source layer, target layer) cell asked for (the
  diagonal, a grid, or a map), in one batched forward -> :class:`PatchscopeResult` (top-k per cell).

The target prompt is read as the model reads text (:func:`reslens._prompts.text_ids`: the start tokens its
tokenizer puts first, e.g. Gemma's ``<bos>``, then the text's tokens).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from reslens._checks import check_int, check_layers
from reslens._inputs import Batch
from reslens._prompts import check_prompt_ids, prompt_ids, token_span
from reslens._saving import Saveable
from reslens._text import html_table, pandas, show
from reslens._tokens import token_strings
from reslens.arch import Arch, adapter
from reslens.hooks import _capture
from reslens.lens._scope_forward import TargetRun
from reslens.lens.values import Lens

__all__ = ["PROMPTS", "Patchscope", "PatchscopeResult", "patchscope"]

#: target prompts by name: ``(text, the text whose last token is patched)``; the prediction is read at the
#: prompt's last token. ``token_identity`` is the paper's (patched and read at ``"?"``, so its demonstrations
#: also invite ``" ->"`` next); ``token_identity_arrow`` reads after ``" ->"`` instead, where a repeated token
#: comes. The attribute prompts follow the paper's Section 4.3 style (a placeholder ``x`` then the start of
#: the attribute), worded for next-token reading
PROMPTS: dict[str, tuple[str, str]] = {
    "token_identity": ("cat -> cat\n1135 -> 1135\nhello -> hello\n?", "?"),
    "token_identity_arrow": ("cat -> cat\n1135 -> 1135\nhello -> hello\n? ->", "?"),
    "city": ("Q: In which city is x?\nA: It is in the city of", "x"),
    "country": ("Q: In which country is x?\nA: It is in the country of", "x"),
    "description": ("Syria: Country in the Middle East\nLeonardo DiCaprio: American actor\nx:", "x"),
}


def _position(value: Any, n: int, text: str | None, tokenizer: Any, name: str) -> int:
    """A position of a prompt of ``n`` tokens: an int (negatives from the end) or text of the prompt.

    Text is found at its last occurrence in ``text``; its last token is the position.
    """
    if isinstance(value, str):
        if text is None:
            raise TypeError(f"{name}={value!r} is text, but the prompt was given as ids; give an int index")
        at = text.rfind(value)
        if not value or at < 0:
            raise ValueError(f"{name}={value!r} does not occur in the prompt {text!r}; give text of the "
                             "prompt (its last occurrence's last token is used) or an int index")
        return token_span(tokenizer, text, at, at + len(value))[1] - 1
    return check_int(value, name, low=-n, high=n - 1) % n


def _prompt(arch: Arch, prompt: Any, tokenizer: Any, name: str) -> tuple[torch.Tensor, str | None]:
    """One prompt as ids ``[n]`` (text by the tokenizer's convention, with its start tokens) and its text."""
    if isinstance(prompt, str) and tokenizer is None:
        raise TypeError(f"{name} is text, so tokenizer= is required (or give its token ids)")
    try:
        if isinstance(prompt, str):
            return torch.tensor(prompt_ids(arch, tokenizer, prompt), device=arch.device), prompt
        return check_prompt_ids(arch, prompt), None
    except (TypeError, ValueError) as error:
        raise type(error)(f"{name}: {error}; give text (with tokenizer=), token ids, or for a target a "
                          f"name of PROMPTS ({', '.join(PROMPTS)})") from None


def _target_map(target_layer: Any, n_layer: int) -> dict[int, int]:
    """``target_layer`` as ``{source layer: target layer}`` (both ``0..n_layer``; a mapping as given)."""
    def layer(value: Any, what: str) -> int:
        return check_int(value, what, low=-(n_layer + 1), high=n_layer) % (n_layer + 1)

    sources = range(n_layer + 1)
    if target_layer == "same":
        return {s: s for s in sources}
    if isinstance(target_layer, int) and not isinstance(target_layer, bool):
        return dict.fromkeys(sources, layer(target_layer, "target_layer"))
    if isinstance(target_layer, Mapping):
        return {layer(s, "target_layer (a source layer)"): layer(t, f"target_layer[{s}]")
                for s, t in target_layer.items()}
    if callable(target_layer):
        return {s: layer(target_layer(s), f"target_layer({s})") for s in sources}
    raise TypeError("target_layer must be 'same', an int layer, a mapping {source layer: target layer} or a "
                    f"callable source layer -> target layer; got {type(target_layer).__name__}")


class Patchscope(Lens):
    """A patchscope as a lens: ``h`` at ``resid`` layer ``l`` read through a target prompt.

    ``target``: a name of :data:`PROMPTS` (default ``"token_identity"``), a ``(text, placeholder)`` pair,
    text (with ``tokenizer=``) or ids ``[n]``. ``position``: where ``h`` is written, an int (negatives
    from the end) or text of the target prompt (its last occurrence's last token); default the named
    prompt's placeholder, else the last token. The prediction is read at the prompt's last token (tokens
    between the two run, tokens after it never matter). ``target_layer``: ``"same"`` (``T(l) = l``), an
    int, a mapping ``{source layer: target layer}`` or a callable. ``batch_size``: rows per forward (a
    row is one source vector: one position of one layer). Bound to ``model``: used with another model's
    residuals it refuses (:meth:`check`).

    >>> import torch, reslens
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> scope = Patchscope(model, torch.tensor([5, 6, 7]))
    >>> reslens.lens.logit_lens(model, torch.tensor([[1, 2, 3]]), lens=scope).lens_name
    'patchscope (ids)'
    """

    kind: ClassVar[str] = "patchscope"
    formula: ClassVar[str] = "W_U norm(the target prompt's last resid, h_l written into its resid T(l))"

    def __init__(self, model: Any, target: Any = "token_identity", *, position: Any = None,
                 target_layer: Any = "same", tokenizer: Any = None, batch_size: int = 4096) -> None:
        arch = adapter(model)
        label, placeholder = "ids", None
        if isinstance(target, str) and target in PROMPTS:
            label, (target, placeholder) = target, PROMPTS[target]
        elif isinstance(target, tuple) and len(target) == 2 and all(isinstance(t, str) for t in target):
            target, placeholder = target
            label = repr(target if len(target) <= 24 else target[:23] + "…")
        elif isinstance(target, str):
            label = repr(target if len(target) <= 24 else target[:23] + "…")
        self.target_ids, self.target_text = _prompt(arch, target, tokenizer, "target")
        n = self.target_ids.shape[0]
        given = placeholder if position is None else position
        self.position = _position(-1 if given is None else given, n, self.target_text, tokenizer, "position")
        self.target_layers = _target_map(target_layer, arch.n_layer)
        self.batch_size = check_int(batch_size, "batch_size", low=1)
        self.name = f"patchscope ({label})"
        self._arch, self._run = arch, None

    def target_layer(self, layer: int) -> int:
        """The target prompt's ``resid`` layer a source vector of ``resid`` layer ``layer`` is written to."""
        if layer not in self.target_layers:
            raise ValueError(f"target_layer has no entry for source layer {layer} (it maps "
                             f"{sorted(self.target_layers)}); map every layer the lens reads")
        return self.target_layers[layer]

    def translate(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The target prompt's final residual ``[..., d_model]`` at its last token, with ``h`` in."""
        return self.translate_rows([(layer, h)])[0]

    def translate_rows(self, items: Sequence[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """:meth:`translate` of every item, all rows in one batched forward (``batch_size`` rows a time)."""
        arch, out = self._arch, [None] * len(items)
        rows, joins, shapes = [], [], []
        for i, (layer, h) in enumerate(items):
            check_int(layer, "layer", low=0, high=arch.n_layer)
            if not isinstance(h, torch.Tensor) or h.shape[-1] != arch.d_model:
                got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                raise ValueError(f"h must be a tensor [..., {arch.d_model}] (the model's d_model); got {got}")
            if layer == arch.n_layer:
                out[i] = h  # the model's own output: every lens's last row
                continue
            flat = h.reshape(-1, arch.d_model)
            rows.append(flat)
            joins += [self.target_layer(layer)] * flat.shape[0]
            shapes.append((i, h))
        if rows:
            final = self._forward(joins, torch.cat(rows).to(arch.device, arch.dtype))
            for (i, h), part in zip(shapes, final.split([r.shape[0] for r in rows])):
                out[i] = part.reshape(h.shape).to(h.dtype)
        return out

    def _forward(self, joins: list[int], h: torch.Tensor) -> torch.Tensor:
        """Final residuals ``[rows, d_model]`` of rows ``h`` written into ``resid`` layers ``joins``."""
        if self._run is None:
            self._run = TargetRun(self._arch, self.target_ids, self.position)
        order = sorted(range(len(joins)), key=joins.__getitem__)
        index = torch.tensor(order, dtype=torch.long, device=h.device)
        sorted_joins, h = [joins[i] for i in order], h[index]
        out = torch.empty_like(h)
        for start in range(0, len(order), self.batch_size):
            part = slice(start, start + self.batch_size)
            out[index[part]] = self._run.run(sorted_joins[part], h[part]).to(out.dtype)
        return out

    def check(self, arch: Any) -> None:
        """Refuse another model than the one this runs (another :attr:`~reslens.arch.Arch.fingerprint`)."""
        own = self._arch
        if arch.model is own.model:
            return
        if (arch.n_layer, arch.d_model) != (own.n_layer, own.d_model) or arch.fingerprint != own.fingerprint:
            name = arch.checkpoint_name or type(arch.model).__name__
            raise ValueError(
                f"this {self.name} runs {own.checkpoint_name or type(own.model).__name__} (fingerprint "
                f"{own.fingerprint[:12]}); it is used with {name} "
                f"(fingerprint {arch.fingerprint[:12]}): a patchscope reads residuals of the model it runs. "
                "Make one for this model: Patchscope(model, ...)"
            )

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the model's fingerprint, the target ids, the position and the target layers."""
        text = (f"{self.kind}|{self._arch.fingerprint}|{self.target_ids.tolist()}|{self.position}|"
                f"{sorted(self.target_layers.items())}")
        return hashlib.sha256(text.encode()).hexdigest()

    def _rows(self) -> list[tuple[str, Any]]:
        same = all(s == t for s, t in self.target_layers.items())
        return [*super()._rows(), ("target prompt", self.target_text or str(self.target_ids.tolist())),
                ("patched position", self.position), ("read at", self.target_ids.shape[0] - 1),
                ("target layers", "same as the source" if same else str(self.target_layers))]

    def __repr__(self) -> str:
        return (f"Patchscope({self.name.removeprefix('patchscope (')[:-1]}, position={self.position}, "
                f"{self.target_ids.shape[0]} target tokens)")


@dataclass(frozen=True, repr=False)
class PatchscopeResult(Saveable):
    """Top-k next-token predictions of a patchscope at one source position, one per cell.

    Cell ``c`` writes the source's ``resid`` layer ``source_layer[c]`` into the target prompt's ``resid``
    layer ``target_layer[c]``. ``C`` = cells, ``k`` = top-k.

    - ``source_layer``, ``target_layer``: ``[C]`` int64; ``top_ids: [C, k]`` int64, ``top_probs: [C, k]``
      float32 (the patched run's next-token distribution at the target prompt's last token)
    - ``source_ids: [n_source]``, ``source_position``; ``target_ids: [n_target]``, ``target_position``
      (where the source vector is written)
    - ``output_id``: the model's own top-1 at the source position (what the source prompt predicts next)
    - ``token_strings``: id -> decoded string (None without a tokenizer); ``lens_name``: the patchscope's name
    """

    source_layer: torch.Tensor
    target_layer: torch.Tensor
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    source_ids: torch.Tensor
    source_position: int
    target_ids: torch.Tensor
    target_position: int
    output_id: int
    token_strings: dict[int, str] | None = field(default=None, compare=False)
    lens_name: str = "patchscope"

    def __post_init__(self) -> None:
        n = self.source_layer.shape[0]
        if tuple(self.target_layer.shape) != (n,) or self.top_ids.shape != self.top_probs.shape or (
                self.top_ids.ndim != 2 or self.top_ids.shape[0] != n):
            raise ValueError(f"source_layer and target_layer must be [C] and top_ids/top_probs [C, k]; got "
                             f"{tuple(self.source_layer.shape)}, {tuple(self.target_layer.shape)}, "
                             f"{tuple(self.top_ids.shape)}, {tuple(self.top_probs.shape)}")

    def token(self, token_id: int) -> str:
        """The string of ``token_id`` (its number when run without a tokenizer)."""
        if self.token_strings is None:
            return str(int(token_id))
        return self.token_strings.get(int(token_id), str(int(token_id)))

    def cell(self, source_layer: int, target_layer: int | None = None) -> int:
        """The index of the cell reading ``source_layer`` (into ``target_layer``; None = its only one)."""
        hits = [c for c, (s, t) in enumerate(zip(self.source_layer.tolist(), self.target_layer.tolist()))
                if s == source_layer and (target_layer is None or t == target_layer)]
        if len(hits) != 1:
            pairs = zip(self.source_layer.tolist(), self.target_layer.tolist())
            cells = ", ".join(f"{s}->{t}" for s, t in pairs)
            what = "no cell" if not hits else f"{len(hits)} cells (give target_layer=)"
            raise ValueError(f"{what} for source_layer={source_layer}, target_layer={target_layer}; "
                             f"cells: {cells}")
        return hits[0]

    def top(self, source_layer: int, target_layer: int | None = None) -> list[tuple[str, float]]:
        """``[(token, probability)]``, the top-k of one cell (see :meth:`cell`)."""
        c = self.cell(source_layer, target_layer)
        return [(self.token(i), p) for i, p in zip(self.top_ids[c].tolist(), self.top_probs[c].tolist())]

    def describe(self) -> str:
        """What was read, e.g. ``"source token ' Tower' at position 3 (the model predicts ' is' next)"``."""
        source = int(self.source_ids[self.source_position])
        return (f"source token {self.token(source)!r} at position {self.source_position} "
                f"(the model predicts {self.token(self.output_id)!r} next)")

    def table(self) -> str:
        """One line per cell: source layer, target layer and the top-k tokens with their probabilities."""
        lines = [f"{self.lens_name}: {self.describe()}",
                 f"{'source':>6} {'target':>6}  top-{self.top_ids.shape[1]}"]
        for c, (s, t) in enumerate(zip(self.source_layer.tolist(), self.target_layer.tolist())):
            tops = "  ".join(f"{show(self.token(i))} {p:.2f}"
                             for i, p in zip(self.top_ids[c].tolist(), self.top_probs[c].tolist()))
            lines.append(f"{s:>6} {t:>6}  {tops}")
        return "\n".join(lines)

    def to_frame(self):
        """Long-form ``pandas.DataFrame``: ``source_layer, target_layer, rank, token_id, token, prob``."""
        pd = pandas()
        n, k = self.top_ids.shape
        ids = self.top_ids.flatten().tolist()
        return pd.DataFrame({
            "source_layer": self.source_layer.repeat_interleave(k).numpy(),
            "target_layer": self.target_layer.repeat_interleave(k).numpy(),
            "rank": torch.arange(k).repeat(n).numpy(), "token_id": ids,
            "token": [self.token(i) for i in ids], "prob": self.top_probs.flatten().numpy(),
        })

    def _repr_html_(self) -> str:
        rows = [(s, t, *(f"{show(self.token(i))} ({p:.2f})" for i, p in zip(ids, probs)))
                for s, t, ids, probs in zip(self.source_layer.tolist(), self.target_layer.tolist(),
                                            self.top_ids.tolist(), self.top_probs.tolist())]
        header = ("source", "target", *(f"top {r + 1}" for r in range(self.top_ids.shape[1])))
        return html_table(f"{self.lens_name}: {self.describe()}", header, rows)

    def __repr__(self) -> str:
        return (f"PatchscopeResult({self.source_layer.shape[0]} cells, source position "
                f"{self.source_position}, top_k={self.top_ids.shape[1]})")


def _cells(layers: tuple[int, ...], target_layers: Any, n_layer: int) -> list[tuple[int, int]]:
    """``(source, target)`` cells: one per source (``"same"``, an int, a mapping, a callable) or all pairs."""
    if isinstance(target_layers, (Sequence, range)) and not isinstance(target_layers, str):
        targets = check_layers(target_layers, n_layer, what=f"a {n_layer}-layer model's residual stream",
                               name="target_layers")
        return [(s, t) for s in layers for t in targets]
    mapped = _target_map(target_layers, n_layer)
    missing = [s for s in layers if s not in mapped]
    if missing:
        raise ValueError(f"target_layers maps no target layer for source layers {missing}")
    return [(s, mapped[s]) for s in layers]


def patchscope(model: Any, inputs: Any, position: Any = -1, *, layers: Any = None,
               target_layers: Any = "same", target: Any = "token_identity", target_position: Any = None,
               tokenizer: Any = None, top_k: int = 5, batch_size: int = 4096) -> PatchscopeResult:
    """What a source prompt's residual at ``position`` holds, per (source, target layer), in one forward.

    ``inputs``: one source prompt, text (with ``tokenizer=``) or ids ``[pos]``; ``position``: an int
    (negatives from the end) or text of the prompt (its last occurrence's last token, e.g. ``" Tower"``).
    ``layers``: the source ``resid`` layers (default all, ``0..n_layer``). ``target_layers``: ``"same"``
    (each source layer into the same layer: the diagonal), an int, a mapping or a callable (one target per
    source), or a sequence of layers (every source × target pair). ``target``, ``target_position``:
    the target prompt and where the vector is written (:class:`Patchscope`'s ``target`` and ``position``).

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> out = patchscope(model, torch.tensor([1, 2, 3]), target=torch.tensor([4, 5]), target_layers=[0, 2])
    >>> out.source_layer.tolist(), out.target_layer.tolist(), tuple(out.top_ids.shape)
    ([0, 0, 1, 1, 2, 2], [0, 2, 0, 2, 0, 2], (6, 5))
    """
    arch = adapter(model)
    scope = Patchscope(arch, target, position=target_position, tokenizer=tokenizer, batch_size=batch_size)
    ids, text = _prompt(arch, inputs, tokenizer, "inputs")
    source_position = _position(position, ids.shape[0], text, tokenizer, "position")
    kept = check_layers(layers, arch.n_layer, what=f"a {arch.n_layer}-layer model's residual stream")
    cells = _cells(kept, target_layers, arch.n_layer)
    check_int(top_k, "top_k", low=1, high=arch.d_vocab)
    read = tuple(sorted({*kept, arch.n_layer}))
    res = _capture(arch, Batch.from_ids(ids[None]), sites=("resid",), layers=read)
    h = torch.stack([res.get("resid", s)[0, source_position] for s, _ in cells]).to(arch.device, arch.dtype)
    with torch.no_grad():
        probs = arch.logits(scope._forward([t for _, t in cells], h)).float().softmax(-1)
        top = probs.topk(top_k, dim=-1)
        output = arch.logits(res.get("resid", arch.n_layer)[0, source_position]).float()
    return PatchscopeResult(
        source_layer=torch.tensor([s for s, _ in cells]), target_layer=torch.tensor([t for _, t in cells]),
        top_ids=top.indices.cpu(), top_probs=top.values.cpu(), source_ids=ids.cpu(),
        source_position=source_position, target_ids=scope.target_ids.cpu(), target_position=scope.position,
        output_id=int(output.argmax()), lens_name=scope.name,
        token_strings=token_strings(tokenizer, top.indices, ids, scope.target_ids, output.argmax()[None]),
    )
