"""ROME's rank-one edit: ``compute_u``, ``compute_v`` and ``execute_rome`` as :class:`RankOneEdit`.

Follows ROME's reference code (``rome_main.py``, ``compute_u.py``, ``compute_v.py``): the key
``k*`` (mean MLP key at the subject's last token over context templates) and ``C^-1 k*``
(:func:`_compute_u`), the MLP output ``v*`` that makes the prompt continue with the new answer
(:func:`_compute_v`), and the update in the weight's stored orientation (``arch.rank_one_delta``),
applied and restored explicitly by :class:`RankOneEdit`.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from reslens._checks import check_block, check_finite, check_float, check_int
from reslens._inputs import pad_ids
from reslens._prompts import (
    answer_ids,
    check_prompt_ids,
    check_span,
    prompt_ids,
    subject_span,
    text_ids,
    token_span,
    warn_unlikely_answer,
)
from reslens._text import html_table
from reslens.arch import Arch, adapter
from reslens.hooks import capture, patch
from reslens.rome.second_moment import SecondMoment

__all__ = ["RankOneEdit", "rank_one_edit", "rank_one_edit_ids"]

#: A context of the edit: its token ids and the index of the subject's last token in them.
Context = tuple[list[int], int]

# --- the edit -------------------------------------------------------------------------------

#: ``(id(anchor), name) -> (weak reference to the anchor, weak references to the edits applied, oldest
#: first)``, where ``(anchor, name)`` is the weight's :attr:`~reslens.arch._offload.StoredParam.anchor` (the
#: weight itself, or the module accelerate offloads it from); only weights with an edit applied have an
#: entry, and nothing here keeps a weight or an edit alive.
_APPLIED: dict[tuple[int, str], tuple[weakref.ref, list[weakref.ref]]] = {}


def _applied_to(anchor: tuple[Any, str]) -> list[RankOneEdit]:
    """The live edits applied to the weight of ``anchor``, oldest first."""
    entry = _APPLIED.get((id(anchor[0]), anchor[1]))
    if entry is None or entry[0]() is not anchor[0]:
        return []
    return [e for e in (ref() for ref in entry[1]) if e is not None and e.applied]


def _register(anchor: tuple[Any, str], edit: RankOneEdit, applied: bool) -> None:
    """Record that ``edit`` was applied to (``applied``) or restored from the weight of ``anchor``."""
    slot = (id(anchor[0]), anchor[1])
    entry = _APPLIED.get(slot)
    if entry is None or entry[0]() is not anchor[0]:
        entry = _APPLIED[slot] = (weakref.ref(anchor[0]), [])
    refs = [ref for ref in entry[1] if ref() is not None and ref() is not edit and ref().applied]
    if applied:
        refs.append(weakref.ref(edit))
    entry[1][:] = refs
    if not refs:
        del _APPLIED[slot]


class RankOneEdit:
    """A rank-one update of block ``layer``'s MLP output projection: key ``k`` gains ``(k . u) v``.

    ``W' = W + arch.rank_one_delta(u, v)`` (the outer product in the weight's stored orientation).
    Nothing changes until :meth:`apply` (or ``with edit:``); :meth:`restore` copies the original
    tensor back bit-exactly, and only if the weight still holds exactly what this edit wrote:
    edits of one weight restore in the reverse order of apply (``with a: with b:`` does that).

    - ``u: [d_mlp]`` (= ``C^-1 k* / (C^-1 k*) . k``), ``v: [d_model]`` (= ``v* - W k - b``, the
      change of the MLP output at the edited prompt's key ``k``)
    - ``key: [d_mlp]`` k* (mean key over the context templates), ``value: [d_model]`` v*
    - under an MLP output norm (Gemma 2/3, OLMo 2) ``v*``, ``v`` are the value projection's output
      before it (site ``mlp_raw``); the prompt's ``mlp_out`` becomes ``arch.out_norm("mlp", layer)(v*)``
    - ``nll``: the new answer's mean negative log-likelihood at each optimisation step

    On a model dispatched by accelerate, a layer that stays on a device is edited in place as
    above. A layer accelerate offloads (``"disk"`` entries of the ``device_map``, ``"cpu"`` ones under
    a GPU main device, ``cpu_offload``) has a meta-device placeholder as :attr:`weight` and its
    values in accelerate's weights map: the edited tensor goes into that map's in-memory entries
    (which accelerate reads before its files, so the next forward loads it; the offload folder and
    the checkpoint are never written, and the edit costs one copy of the weight in CPU memory while
    applied), and :meth:`restore` puts back the entry that was there (for a layer on disk: none, so
    the untouched file is read again), bit-exactly.
    A weights map reslens cannot write raises ``ValueError`` naming the weight.
    """

    def __init__(self, model: Any, layer: int, u: torch.Tensor, v: torch.Tensor, *, key: torch.Tensor,
                 value: torch.Tensor, nll: Sequence[float] = (), new_answer_ids: Sequence[int] = (),
                 prompt: str | None = None, subject: str | None = None, new_answer: str | None = None,
                 templates: int = 1) -> None:
        self.arch = adapter(model)
        self.layer = check_block(layer, self.arch.n_layer)
        self.u, self.v, self.key, self.value = u, v, key, value
        self.nll, self.new_answer_ids = tuple(nll), tuple(new_answer_ids)
        self.prompt, self.subject, self.new_answer, self.templates = prompt, subject, new_answer, templates
        self._original: torch.Tensor | None = None
        self._written: torch.Tensor | None = None
        self._undo: Any = None

    @property
    def steps(self) -> int:
        """Optimisation steps taken for ``v*``."""
        return len(self.nll)

    @property
    def info(self) -> dict:
        """The edit's description as a dict (for older code; the attributes say the same)."""
        out: dict = {"nll": list(self.nll), "steps": self.steps}
        if self.prompt is not None:
            out.update(prompt=self.prompt, subject=self.subject, new_answer=self.new_answer,
                       templates=self.templates)
        else:
            out["new_answer_ids"] = list(self.new_answer_ids)
        return out

    @property
    def weight(self) -> torch.nn.Parameter:
        """The weight this edit changes: ``arch.mlp_out_param(layer)`` (a meta placeholder if offloaded)."""
        return self.arch.mlp_out_param(self.layer)

    @property
    def delta(self) -> torch.Tensor:
        """``arch.rank_one_delta(u, v)``: the update in the weight's orientation."""
        return self.arch.rank_one_delta(self.u, self.v)

    @property
    def applied(self) -> bool:
        """Whether the edit is in the model now."""
        return self._original is not None

    def apply(self) -> RankOneEdit:
        """Write the edit into the model (keeps a clone of the original weight and of what it wrote)."""
        if self.applied:
            raise RuntimeError("this edit is already applied; call restore() first")
        stored = self.arch.mlp_out_store(self.layer)
        with torch.no_grad():
            original = stored.values().clone()
            written = (original.float() + self.delta.to(original.device).float()).to(original.dtype)
            self._undo = stored.replace(written)
        self._original, self._written = original, written
        _register(stored.anchor, self, applied=True)
        return self

    def restore(self, *, force: bool = False) -> None:
        """Put the original weight back, bit-exactly.

        Refused (``RuntimeError``) when the weight no longer holds what this edit wrote: another
        edit applied later must be restored first, or something else changed the weight
        (``force=True`` restores anyway, discarding that change).
        """
        if not self.applied:
            raise RuntimeError("this edit is not applied; nothing to restore")
        stored = self.arch.mlp_out_store(self.layer)
        if not force and not torch.equal(stored.values(), self._written):
            stack = _applied_to(stored.anchor)
            later = stack[stack.index(self) + 1 :] if self in stack else []
            if later:
                raise RuntimeError(f"cannot restore {self!r}: {later[-1]!r} was applied to the same weight "
                                   "after it and is still applied; restore that one first (edits restore in "
                                   "the reverse order of apply)")
            raise RuntimeError(f"cannot restore {self!r}: the weight changed since this edit was applied, so "
                               "restoring would discard that change; restore(force=True) does it anyway")
        stored.put_back(self._undo, self._original)
        self._original = self._written = self._undo = None
        _register(stored.anchor, self, applied=False)

    def __enter__(self) -> RankOneEdit:
        return self.apply()

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def __repr__(self) -> str:
        what = f", {self.prompt!r} -> {self.new_answer!r}" if self.prompt is not None else ""
        nll = f", nll {self.nll[0]} -> {self.nll[-1]}" if self.nll else ""
        return (f"RankOneEdit(layer={self.layer}, applied={self.applied}{what}, "
                f"|u|={float(self.u.norm()):.3g}, |v|={float(self.v.norm()):.3g}{nll})")

    def _repr_html_(self) -> str:
        rows = [("layer", self.layer), ("applied", self.applied), ("|u|", float(self.u.norm())),
                ("|v|", float(self.v.norm())), ("steps", self.steps)]
        if self.prompt is not None:
            rows[1:1] = [("prompt", self.prompt), ("subject", self.subject), ("new answer", self.new_answer)]
        if self.nll:
            rows.append(("nll", f"{self.nll[0]} -> {self.nll[-1]}"))
        return html_table("RankOneEdit", ("", "value"), rows)


# --- compute_u, compute_v -------------------------------------------------------------------


def _keys(arch: Arch, layer: int, contexts: Sequence[Context]) -> tuple[torch.Tensor, torch.Tensor]:
    """MLP keys ``[n, d_mlp]`` and outputs ``[n, d_model]`` (float32) at each context's subject token."""
    keys, outs = [], []
    for ids, idx in contexts:
        ids = torch.tensor([ids], device=arch.device)
        res = capture(arch, ids, sites=("mlp_act", "mlp_out"), layers=layer)
        keys.append(res.mlp_act[0, 0, idx].float())
        outs.append(res.mlp_out[0, 0, idx].float())
    keys_, outs_ = torch.stack(keys), torch.stack(outs)
    if arch.out_norm("mlp", layer) is not None:  # the edit reaches the value projection's output, pre-norm
        weights = arch.mlp_weights(layer)
        outs_ = keys_ @ weights.W_out.detach().float().to(keys_.device)
        if weights.b_out is not None:
            outs_ = outs_ + weights.b_out.detach().float().to(keys_.device)
    return keys_, outs_


def _compute_u(mom2: torch.Tensor, k_star: torch.Tensor, ridge: float) -> torch.Tensor:
    """ROME's ``compute_u`` before normalising: ``C^-1 k*``, ``C`` + ``ridge x mean(diag C)`` (float64)."""
    C = mom2.to(device=k_star.device, dtype=torch.float64)
    C = C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=k_star.device)
    try:
        return torch.linalg.solve(C, k_star.double()).float()
    except torch.linalg.LinAlgError:
        raise ValueError("the second moment is singular, so C^-1 k* does not exist; pass ridge > 0 "
                         "(e.g. ridge=1e-5) or statistics over more tokens") from None


class _Rewrite(NamedTuple):
    """The padded batch of ``compute_v``: rewriting rows (with answer targets), then KL rows."""

    input_ids: torch.Tensor  # [rows, pos]
    at: torch.Tensor         # [rows, pos, 1]: 1 at each row's subject token (where delta is added)
    t_row: torch.Tensor      # [targets]: row, position and id of each answer token predicted
    t_pos: torch.Tensor
    t_id: torch.Tensor
    kl_rows: torch.Tensor    # [kl]: rows and positions of the KL term
    kl_pos: torch.Tensor
    n_rewrite: int


def _rewrite_batch(arch: Arch, key_contexts: Sequence[Context], answer: list[int],
                   kl_contexts: Sequence[Context]) -> _Rewrite:
    rows, lookup, targets = [], [], []
    for ids, idx in key_contexts:
        rows.append(list(ids) + answer[:-1])
        lookup.append(idx)
        targets.append([(len(ids) - 1 + j, a) for j, a in enumerate(answer)])
    for ids, idx in kl_contexts:
        rows.append(list(ids))
        lookup.append(idx)
    device = arch.device
    input_ids = pad_ids(rows).input_ids.to(device)  # right padding: causal, so real positions are unaffected
    at = torch.zeros(input_ids.shape[0], input_ids.shape[1], 1, device=device)
    at[torch.arange(len(lookup)), torch.tensor(lookup)] = 1.0
    n_rewrite = len(key_contexts)
    return _Rewrite(
        input_ids, at,
        torch.tensor([r for r, tg in enumerate(targets) for _ in tg], device=device),
        torch.tensor([p for tg in targets for p, _ in tg], device=device),
        torch.tensor([a for tg in targets for _, a in tg], device=device),
        torch.arange(n_rewrite, len(rows), device=device),
        torch.tensor(lookup[n_rewrite:], device=device, dtype=torch.long),
        n_rewrite,
    )


def _compute_v(arch: Arch, layer: int, batch: _Rewrite, n_answer: int, out0: torch.Tensor, *, steps: int,
               lr: float, weight_decay: float, kl_factor: float,
               clamp_norm: float) -> tuple[torch.Tensor, list[float]]:
    """ROME's ``compute_v``: ``delta`` added to ``mlp_out`` at the subject's token, and the nll per step.

    Added before the MLP's output norm where the family has one (Gemma 2/3, OLMo 2: ``mlp_raw``), since
    the rank-one edit changes the value projection, whose output that norm then rescales.

    Adam on ``nll + weight_decay |delta| / |out0|^2 + kl_factor KL``, clamped to
    ``clamp_norm x |out0|``; stops early when the nll is below 0.05.
    """
    delta = torch.zeros(arch.d_model, device=arch.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    max_norm = clamp_norm * out0.norm()
    at = batch.at
    site = "mlp_out" if arch.out_norm("mlp", layer) is None else "mlp_raw"  # where a weight edit reaches
    edits = {(site, layer): lambda t: t + at.to(t.dtype) * delta.to(t.dtype)}
    init_kl = None
    losses: list[float] = []
    for _ in range(steps):
        with torch.enable_grad(), patch(arch, edits):
            hidden = arch.final_hidden(batch.input_ids)
            logp = arch.unembed(hidden[batch.t_row, batch.t_pos]).float().log_softmax(-1)  # [targets, vocab]
            nll = -logp.gather(1, batch.t_id[:, None]).sum() / batch.n_rewrite / n_answer
            loss = nll + weight_decay * delta.norm() / out0.norm() ** 2
            if len(batch.kl_rows):
                kl_logp = arch.unembed(hidden[batch.kl_rows, batch.kl_pos]).float().log_softmax(-1)
                if init_kl is None:
                    init_kl = kl_logp.detach()
                kl = torch.nn.functional.kl_div(init_kl, kl_logp, log_target=True, reduction="batchmean")
                loss = loss + kl_factor * kl
            (grad,) = torch.autograd.grad(loss, [delta])  # never touches the model's .grad
        losses.append(nll.item())
        if losses[-1] < 5e-2:
            break
        if not losses[1:] and not bool(grad.any()):
            raise ValueError(
                f"an edit of layer={layer} cannot change the prediction: the gradient of the answer's loss "
                "with respect to the MLP output at the subject's last token is exactly zero (in the last "
                "block, or wherever no later position reads the subject, its MLP output never reaches the "
                "answer's positions); choose an earlier layer"
            )
        delta.grad = grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return delta.detach(), losses


def _edit(arch: Arch, layer: int, key_contexts: Sequence[Context], answer: list[int],
          kl_contexts: Sequence[Context], mom2: torch.Tensor, *, ridge: float, describe: dict,
          **optimiser: Any) -> RankOneEdit:
    """``compute_u`` + ``compute_v`` + ``execute_rome`` on token contexts (context 0: the bare prompt)."""
    keys, outs = _keys(arch, layer, key_contexts)
    k_star = keys.mean(0)
    k0, out0 = keys[0], outs[0]  # the bare prompt: ROME's cur_input / cur_output and target_init
    u = _compute_u(mom2, k_star, ridge)
    batch = _rewrite_batch(arch, key_contexts, answer, kl_contexts)
    delta, losses = _compute_v(arch, layer, batch, len(answer), out0, **optimiser)
    # execute_rome: right vector = (v* - cur_output) / (cur_input . u)
    u = u / torch.dot(k0, u)
    if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(delta).all())):
        raise ValueError("the edit is not finite (the key is orthogonal to C^-1 k*, or the model's outputs "
                         "overflow); try ridge > 0, another layer, or the model in float32")
    return RankOneEdit(arch, layer, u, delta, key=k_star, value=out0 + delta,
                       nll=[round(x, 4) for x in losses], **describe)


def _edit_args(arch: Arch, layer: Any, steps: Any, lr: Any, weight_decay: Any, kl_factor: Any,
               clamp_norm: Any, ridge: Any) -> tuple[int, float, dict]:
    """``(layer, ridge, optimiser settings)`` checked; a model that cannot take the edit is refused first."""
    arch.require("rank_one_edit")  # a mixture of experts: one value projection per expert
    optimiser = dict(
        steps=check_int(steps, "steps", low=1),
        lr=check_float(lr, "lr", low=0.0),
        weight_decay=check_float(weight_decay, "weight_decay", low=0.0),
        kl_factor=check_float(kl_factor, "kl_factor", low=0.0),
        clamp_norm=check_float(clamp_norm, "clamp_norm", low=0.0),
    )
    return check_block(layer, arch.n_layer), check_float(ridge, "ridge", low=0.0), optimiser


def _second_moment(arch: Arch, layer: int, second_moment: Any) -> torch.Tensor:
    """The ``[d_mlp, d_mlp]`` matrix of ``second_moment`` (a :class:`SecondMoment` or a tensor), checked."""
    if isinstance(second_moment, SecondMoment):
        if second_moment.layer != layer:
            raise ValueError(f"second_moment holds the keys of layer {second_moment.layer}; "
                             f"the edit is at layer {layer}")
        # offloaded weights are new tensors at every read, so there the content hash decides
        if (second_moment.key is not None and not second_moment.key.same(arch, layer)
                and not (arch.offloaded and second_moment.matches(arch))):
            warnings.warn(f"second_moment was computed from other weights than the ones that shape layer "
                          f"{layer}'s keys now (another model, or an edit applied since); ROME reuses such "
                          "statistics across sequential edits, but recompute them for another model",
                          stacklevel=3)
        mom2 = second_moment.mom2
    elif isinstance(second_moment, torch.Tensor):
        mom2 = second_moment
    else:
        raise TypeError(f"second_moment must be a SecondMoment (SecondMoment.compute) or a [d_mlp, d_mlp] "
                        f"tensor; got {type(second_moment).__name__}")
    if tuple(mom2.shape) != (arch.d_mlp, arch.d_mlp):
        raise ValueError(f"second_moment must be [{arch.d_mlp}, {arch.d_mlp}] (SecondMoment.compute); "
                         f"got {tuple(mom2.shape)}")
    return check_finite(mom2, "second_moment")


def rank_one_edit_ids(model: Any, input_ids: Any, subject_span: tuple[int, int],
                      new_answer_ids: Sequence[int], layer: int, *,
                      second_moment: SecondMoment | torch.Tensor, prefixes: Sequence[Sequence[int]] = (),
                      kl_ids: Sequence[int] | None = None,
                      steps: int = 20, lr: float = 0.5, weight_decay: float = 0.5, kl_factor: float = 0.0625,
                      clamp_norm: float = 4.0, ridge: float = 1e-5) -> RankOneEdit:
    """ROME's edit on token ids (no tokenizer needed): see :func:`rank_one_edit`.

    The key and rewriting contexts are the prompt alone and ``prefix + prompt`` for each of
    ``prefixes`` (id lists). ``kl_ids``: optional ids of ROME's essence prompt
    (``"{subject} is a"``) starting with the subject's ``end - start`` tokens; its KL term is
    taken at the subject's last token. ``second_moment``: a :class:`SecondMoment` of ``layer``
    (or its ``[d_mlp, d_mlp]`` matrix).
    """
    arch = adapter(model)
    layer, ridge, optimiser = _edit_args(arch, layer, steps, lr, weight_decay, kl_factor, clamp_norm, ridge)
    ids = check_prompt_ids(arch, input_ids).tolist()
    start, end = check_span(subject_span, len(ids))
    answer = [check_int(a, "new_answer_ids") for a in new_answer_ids]
    if not answer or not all(0 <= a < arch.d_vocab for a in answer):
        raise ValueError(f"new_answer_ids must be non-empty token ids in 0..{arch.d_vocab - 1}; "
                         f"got {list(new_answer_ids)}")
    mom2 = _second_moment(arch, layer, second_moment)
    contexts = [(ids, end - 1)] + [(list(p) + ids, len(p) + end - 1) for p in prefixes]
    for ctx, _ in contexts:
        if len(ctx) + len(answer) - 1 > arch.n_ctx:
            raise ValueError(f"a context of {len(ctx)} tokens plus the answer exceeds the model's context "
                             f"(n_ctx={arch.n_ctx})")
    kl = [] if kl_ids is None else [(list(kl_ids), end - start - 1)]
    return _edit(arch, layer, contexts, answer, kl, mom2, ridge=ridge, describe={"new_answer_ids": answer},
                 **optimiser)


def _sample_prefixes(arch: Arch, start_id: int, shapes: Sequence[tuple[int, int]],
                     seed: int) -> list[list[int]]:
    """ROME's context templates: ``n`` continuations of ``length`` tokens sampled top-5 after ``start_id``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for length, n in shapes:
        seqs = torch.full((n, 1), start_id, dtype=torch.long, device=arch.device)
        with torch.no_grad():
            for _ in range(length):
                top = arch.unembed(arch.final_hidden(seqs)[:, -1]).float().topk(5, dim=-1)
                pick = torch.multinomial(top.values.softmax(-1).cpu(), 1, generator=gen).to(arch.device)
                seqs = torch.cat([seqs, top.indices.gather(1, pick)], 1)
        out.extend(seqs[:, 1:].tolist())
    return out


def _templates(arch: Arch, tokenizer: Any, context_templates: Any, template_shapes: Any,
               seed: int) -> list[str]:
    """ROME's context templates, ``"{}"`` first: given, or ``"<sampled text>. {}"`` per sampled prefix."""
    if context_templates is None:
        shapes = [tuple(check_int(x, "template_shapes", low=1) for x in shape) for shape in template_shapes]
        if not all(len(shape) == 2 for shape in shapes):
            raise ValueError(f"template_shapes must be (length, n) pairs; got {template_shapes!r}")
        start_id = arch.start_token(tokenizer)
        prefixes = _sample_prefixes(arch, 0 if start_id is None else start_id, shapes, seed)
        return ["{}"] + [tokenizer.decode(p).replace("{", " ").replace("}", " ") + ". {}" for p in prefixes]
    templates = list(context_templates)
    if not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise ValueError("context_templates must be format strings with exactly one '{}' "
                         "(e.g. 'It is said that {}')")
    return ["{}"] + [t for t in templates if t != "{}"]


def _contexts(arch: Arch, tokenizer: Any, templates: Sequence[str], prompt: str, subject: str,
              n_answer: int) -> list[Context]:
    """``(ids, subject's last token)`` of each template filled with the prompt."""
    contexts = []
    for template in templates:
        text = template.format(prompt)
        ids = text_ids(tokenizer, text)  # after the tokenizer's start tokens (e.g. a BOS), if it puts any
        at = text.find(subject, template.index("{}"))  # the subject inside the prompt part
        if at < 0:
            raise ValueError(f"subject={subject!r} does not occur in prompt={prompt!r}")
        contexts.append((ids, token_span(tokenizer, text, at, at + len(subject))[1] - 1))
        if len(ids) + n_answer - 1 > arch.n_ctx:
            raise ValueError(f"context {text!r} plus the answer exceeds the model's context "
                             f"(n_ctx={arch.n_ctx})")
    return contexts


def rank_one_edit(model: Any, tokenizer: Any, prompt: str, subject: str, new_answer: str, layer: int, *,
                  second_moment: SecondMoment | None = None, stats_corpus: Any = None,
                  stats_tokens: int = 100_000, cache_dir: str | os.PathLike | None = None,
                  context_templates: Sequence[str] | None = None,
                  template_shapes: Sequence[tuple[int, int]] = ((10, 5),), steps: int = 20, lr: float = 0.5,
                  weight_decay: float = 0.5, kl_factor: float = 0.0625, clamp_norm: float = 4.0,
                  ridge: float = 1e-5, seed: int = 0, progress: bool = False) -> RankOneEdit:
    """ROME's rank-one edit of block ``layer``'s MLP output projection, returned unapplied.

    1. ``C = E[k k^T]``: ``second_moment`` (a :class:`SecondMoment` of ``layer``), or computed
       from ``stats_corpus`` (``stats_tokens`` tokens, kept in ``cache_dir`` if given; ROME: 100k
       Wikipedia samples). Exactly one of the two.
    2. ``k*`` = mean MLP key at the subject's last token over the context templates (``"{}"``
       plus, as ROME, text sampled top-5 from the model after its document start
       (``arch.start_token``), ``n`` templates of ``length`` tokens per ``(length, n)`` of
       ``template_shapes``, each ``"<text>. {}"``; the default ``((10, 5),)`` is ROME's first
       release, its later hyper-parameters use ``((5, 10), (10, 10))``; or ``context_templates``
       given as format strings with one ``{}``).
    3. ``v*`` = ``mlp_out`` at the bare prompt + ``delta``, ``delta`` optimised by Adam for
       ``steps`` steps (``lr``) to make the templated prompts continue with ``new_answer``,
       with ROME's weight decay, KL term on ``"{subject} is a"`` and norm clamp (hyper-parameters:
       ROME's GPT-2 XL ones).
    4. ``W' = W + u (v* - W k - b)^T`` (in the weight's stored orientation) with
       ``u = C^-1 k* / ((C^-1 k*) . k)``, ``k`` = the bare prompt's key (ROME's code; the paper
       writes ``k*`` in the denominator), so the bare prompt's MLP output becomes exactly ``v*``
       (under an MLP output norm, Gemma 2/3 and OLMo 2: the value projection's output before it,
       site ``mlp_raw``, where ``delta`` is optimised). A mixture of experts is refused (``ValueError``
       with the reason, ``arch.limits``) before any statistics or forward.
       ``ridge`` adds ``ridge x mean(diag C)`` to ``C`` before solving (0 = ROME).

    Returns a :class:`RankOneEdit`; use ``with edit:`` or ``edit.apply()`` / ``edit.restore()``.
    """
    arch = adapter(model)
    layer, ridge, optimiser = _edit_args(arch, layer, steps, lr, weight_decay, kl_factor, clamp_norm, ridge)
    if (second_moment is None) == (stats_corpus is None):
        raise TypeError("rank_one_edit needs exactly one of second_moment= (a SecondMoment) and "
                        "stats_corpus=")
    if not isinstance(new_answer, str) or not new_answer:
        raise TypeError(f"new_answer must be a non-empty string (e.g. ' Paris', with its leading space); "
                        f"got {new_answer!r}")
    prompt_ids(arch, tokenizer, prompt)
    subject_span(tokenizer, prompt, subject)
    answer = answer_ids(tokenizer, new_answer, name="new_answer")
    warn_unlikely_answer(arch, tokenizer, prompt, text_ids(tokenizer, prompt), new_answer, answer[0],
                         name="new_answer", known=False)
    templates = _templates(arch, tokenizer, context_templates, template_shapes, check_int(seed, "seed"))
    contexts = _contexts(arch, tokenizer, templates, prompt, subject, len(answer))
    kl_text = f"{subject} is a"
    kl = [(text_ids(tokenizer, kl_text), subject_span(tokenizer, kl_text, subject)[1] - 1)]
    if second_moment is None:
        second_moment = SecondMoment.compute(arch, layer, stats_corpus, tokenizer=tokenizer,
                                             max_tokens=stats_tokens, cache_dir=cache_dir, progress=progress)
    mom2 = _second_moment(arch, layer, second_moment)
    describe = dict(prompt=prompt, subject=subject, new_answer=new_answer, templates=len(contexts))
    return _edit(arch, layer, contexts, answer, kl, mom2, ridge=ridge, describe=describe, **optimiser)
