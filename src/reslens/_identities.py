"""The identities :func:`reslens.verify` checks: one function per row, each the worst error it finds.

Each check reads a :class:`Run` (the adapter, the inputs, the model's own outputs computed once) and
returns a :class:`Worst` (the worst error and where it is), or raises :class:`NotApplicable` where the
identity does not apply to the model (a bare body has no logits). Errors are scaled,
``max |got - want| / max |want|`` over one tensor (one layer of one input, real positions only),
except for probabilities, compared as they are. :func:`as_found` runs them and puts the model back.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from reslens._inputs import Batch, pad_ids, tokenize
from reslens.arch import Arch
from reslens.attribution import logit_attribution
from reslens.hooks import capture
from reslens.lens.result import logit_lens

__all__ = ["CHECKS", "NotApplicable", "Run", "Worst", "as_found", "build_run"]


class NotApplicable(Exception):
    """The identity does not apply to this model; the message says why."""


def _largest(*tensors: torch.Tensor) -> float:
    """The largest magnitude among ``tensors``."""
    return max(float(t.detach().float().abs().max()) if t.numel() else 0.0 for t in tensors)


def _error(got: torch.Tensor, want: torch.Tensor, *, scale: float | None = None) -> float:
    """``max |got - want|`` over ``scale`` (default: ``max |want|``) in float32; NaN if one is not finite."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}")
    if got.numel() == 0:
        return 0.0
    diff = float((got - want).abs().max())
    if not (math.isfinite(diff) and bool(torch.isfinite(want).all())):
        return math.nan
    scale = _largest(want) if scale is None else scale
    return diff / scale if scale > 0 else diff


def _at(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``t[mask]`` wherever the two are (a dispatched model returns tensors on several devices)."""
    return t[mask.to(t.device)]


class Worst:
    """The worst error seen and where (NaN, a non-finite comparison, is the worst of all)."""

    def __init__(self) -> None:
        self.error, self.where = 0.0, ""

    def add(self, error: float, where: str) -> None:
        if math.isnan(self.error):
            return
        if math.isnan(error) or error > self.error:
            self.error, self.where = error, where


@dataclass
class Run:
    """One verification's adapter and inputs, and what is computed once for several checks.

    ``inputs``: ``(label, batch)`` every check of one batch runs on; ``groups``: ``(label, rows alone,
    {side: the rows padded together})`` for the padding checks.
    """

    arch: Arch
    inputs: list[tuple[str, Batch]]
    groups: list[tuple[str, list[Batch], dict[str, Batch]]]
    _cache: dict[str, Any] = field(default_factory=dict)

    def output(self, label: str, batch: Batch) -> Any:
        """The model's own forward of ``batch``: hidden states, and logits where it has an LM head."""
        if label not in self._cache:
            arch, batch = self.arch, batch.to(self.arch.device)
            runner = arch.model if arch.lm_head is not None else arch.body
            self._cache[label] = runner(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                position_ids=batch.position_ids, use_cache=False, output_hidden_states=True)
        return self._cache[label]

    def logits(self, label: str, batch: Batch) -> torch.Tensor:
        """The model's logits of ``batch`` ``[batch, pos, d_vocab]``."""
        if self.arch.lm_head is None:
            raise NotApplicable("a bare body (no LM head) has no logits to compare with")
        return self.output(label, batch).logits

    def alone(self, label: str, batches: list[Batch], sites: tuple[str, ...]) -> list[Any]:
        """Captures of ``batches`` (one row each), run once for both padding sides."""
        key = f"alone: {label}"
        if key not in self._cache:
            self._cache[key] = [capture(self.arch, batch, sites=sites) for batch in batches]
        return self._cache[key]


def _random_rows(arch: Arch, tokenizer: Any, lengths: Sequence[int], seed: int) -> list[list[int]]:
    """Random token ids of ``lengths``, no special token among them (none is read as a pad)."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(arch.config, name, None)
        special |= set(value if isinstance(value, (list, tuple)) else [value])
    pool = torch.tensor([i for i in range(arch.d_vocab) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    return [pool[torch.randint(len(pool), (n,), generator=gen)].tolist() for n in lengths]


def build_run(arch: Arch, tokenizer: Any, texts: Sequence[str], n_tokens: int, seed: int) -> Run:
    """The inputs: random ids, and a left-padded pair of rows (``texts`` with a tokenizer, else random ids).

    The padding checks pad that pair on either side and run each row alone.
    """
    ids = Batch.from_ids(torch.tensor(_random_rows(arch, tokenizer, (n_tokens, n_tokens), seed)))
    if tokenizer is not None:
        alone = [tokenize(tokenizer, text) for text in texts]
        padded = {side: tokenize(tokenizer, list(texts), padding_side=side) for side in ("left", "right")}
        inputs = [("ids", ids), ("text", alone[0]), ("padded texts", padded["left"])]
        return Run(arch, inputs, [("texts", alone, padded)])
    pair = _random_rows(arch, tokenizer, (n_tokens, n_tokens - 5), seed + 1)
    pad = getattr(arch.config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and 0 <= pad < arch.d_vocab else 0
    padded = {side: pad_ids(pair, pad_id=pad, padding_side=side) for side in ("left", "right")}
    inputs = [("ids", ids), ("padded ids", padded["left"])]
    return Run(arch, inputs, [("ids", [Batch.from_ids(torch.tensor([row])) for row in pair], padded)])


# --- 1-3: capture against the model, and the residual's pieces ------------------------------------


def hidden_states(run: Run) -> Worst:
    """``capture``'s ``resid[l]`` is HuggingFace's ``hidden_states[l]``; the last one is ``final``.

    (Where a family's last hidden state is the raw residual instead, ``resid[n_layer]`` may match it.)
    """
    worst, n = Worst(), run.arch.n_layer
    for label, batch in run.inputs:
        res = capture(run.arch, batch, sites=("resid", "final"))
        hidden = run.output(label, batch).hidden_states
        if len(hidden) != n + 1:
            raise ValueError(f"the model returned {len(hidden)} hidden states; {n} layers give {n + 1}")
        real = res.attention_mask
        for layer in range(n):
            worst.add(_error(res.resid[layer][real], _at(hidden[layer], real)), f"{label}, resid {layer}")
        last = _at(hidden[n], real)
        worst.add(min(_error(res.final[real], last), _error(res.resid[n][real], last)),
                  f"{label}, the last hidden state")
    return worst


def _sums(run: Run, sites: tuple[str, ...], terms: Callable[[Any, int], tuple]) -> Worst:
    """The worst of ``got = sum(parts)`` against ``want`` (``terms(res, layer) -> (parts, want)``), per block.

    Summed in float32 and scaled by the largest term, partial sum or result (the model rounds each
    partial sum to its dtype).
    """
    worst = Worst()
    for label, batch in run.inputs:
        res = capture(run.arch, batch, sites=sites)
        real = res.attention_mask
        for layer in range(run.arch.n_layer):
            parts, want = terms(res, layer)
            parts = [p[layer][real].float() for p in parts]
            partial = [sum(parts[: i + 1]) for i in range(len(parts))]
            want = want[real]
            scale = _largest(*parts, *partial, want)
            worst.add(_error(partial[-1], want, scale=scale), f"{label}, block {layer}")
    return worst


def resid_mid(run: Run) -> Worst:
    """``resid_mid[l] = resid[l] + attn_out[l]``."""
    return _sums(run, ("resid", "resid_mid", "attn_out"),
                 lambda res, layer: ((res.resid, res.attn_out), res.resid_mid[layer]))


def resid_next(run: Run) -> Worst:
    """``resid[l+1] = resid[l] + attn_out[l] + mlp_out[l]`` (in every block layout: parallel, sandwich)."""
    return _sums(run, ("resid", "attn_out", "mlp_out"),
                 lambda res, layer: ((res.resid, res.attn_out, res.mlp_out), res.resid[layer + 1]))


def _sublayer(run: Run, sites: tuple[str, str], rebuild: Callable[[int, torch.Tensor], Any]) -> Worst:
    """The worst of ``rebuild(layer, capture[sites[0]])`` against ``capture[sites[1]]``, per block.

    ``rebuild`` gets the site as captured (``[batch, pos, ...]``); real positions are compared.
    """
    worst = Worst()
    for label, batch in run.inputs:
        res = capture(run.arch, batch, sites=sites)
        real = res.attention_mask
        for layer in range(run.arch.n_layer):
            given, want = (getattr(res, site)[layer] for site in sites)
            worst.add(_error(_at(rebuild(layer, given), real), want[real]), f"{label}, block {layer}")
    return worst


def attn_output(run: Run) -> Worst:
    """``attn_out = arch.attn_output(l, attn_z)``: the heads' sum (through the output norm, if any)."""
    return _sublayer(run, ("attn_z", "attn_out"), run.arch.attn_output)


def mlp_output(run: Run) -> Worst:
    """``mlp_out = arch.mlp_output(l, mlp_act)``: the memories' sum (through the output norm, if any)."""
    return _sublayer(run, ("mlp_act", "mlp_out"), run.arch.mlp_output)


# --- 4: patterns against eager attention -----------------------------------------------------------


def _configs(model: torch.nn.Module) -> list[Any]:
    """Every config object of ``model``: its modules' and their sub-configs, each once."""
    found: dict[int, Any] = {}
    todo = [getattr(m, "config", None) for m in model.modules()]
    while todo:
        config = todo.pop()
        if config is None or id(config) in found:
            continue
        found[id(config)] = config
        todo += [getattr(config, key, None) for key in (getattr(config, "sub_configs", None) or {})]
    return list(found.values())


@contextmanager
def _eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """HuggingFace's eager attention (``set_attn_implementation``) inside; every config as found after.

    Each config is put back attribute by attribute, so whichever implementation each (sub-)model used
    comes back, also when the forward inside raises.
    """
    configs = _configs(model)
    saved = [dict(vars(config)) for config in configs]
    try:
        model.set_attn_implementation("eager")
        yield
    finally:
        for config, before in zip(configs, saved):
            state = vars(config)
            for key in set(state) - set(before):
                del state[key]
            state.update(before)


def attn_pattern(run: Run) -> Worst:
    """The recomputed ``attn_pattern`` equals the eager attention weights (rows of real queries)."""
    arch, worst = run.arch, Worst()
    patterns = [capture(arch, batch, sites=("attn_pattern",)).attn_pattern for _, batch in run.inputs]
    with _eager_attention(arch.model):
        expected = []
        for _, batch in run.inputs:
            batch = batch.to(arch.device)
            out = arch.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                            position_ids=batch.position_ids, use_cache=False, output_attentions=True)
            expected.append(out.attentions)
    for (label, batch), got, want in zip(run.inputs, patterns, expected):
        if want is None or len(want) != arch.n_layer:
            raise ValueError("the model returned no attention weights for every layer under eager attention")
        real = batch.attention_mask.cpu()
        for layer in range(arch.n_layer):
            # [batch, head, query, key] -> [real query, head, key]; padded queries' rows are arbitrary in HF
            g, w = (t.transpose(1, 2).cpu()[real] for t in (got[layer], want[layer]))
            worst.add(_error(g, w, scale=1.0), f"{label}, block {layer}")
    return worst


# --- 5-7: the lens, padding, logit attribution -----------------------------------------------------


def lens_logits(run: Run) -> Worst:
    """The lens's last row, ``arch.logits(resid[n_layer])``, equals the model's logits."""
    arch, worst = run.arch, Worst()
    for label, batch in run.inputs:
        want, real = run.logits(label, batch), batch.attention_mask
        resid = capture(arch, batch, sites=("resid",), layers=(arch.n_layer,)).resid[0]
        worst.add(_error(_at(arch.logits(resid), real), _at(want, real)), label)
    return worst


def lens_probs(run: Run) -> Worst:
    """``logit_lens``'s last row: its top-5 probabilities equal the model's (as they are, not scaled)."""
    arch, worst = run.arch, Worst()
    for label, batch in run.inputs:
        want, real = run.logits(label, batch), batch.attention_mask
        lens = logit_lens(arch, batch, layers=(arch.n_layer,), top_k=5, targets=None)
        top = want.float().softmax(-1).topk(lens.top_k, dim=-1).values
        worst.add(_error(_at(lens.top_probs[-1], real), _at(top, real), scale=1.0), label)
    return worst


_PADDING_SITES = ("resid", "attn_out", "mlp_out", "attn_pattern")


def padding(run: Run, side: str) -> Worst:
    """Each row of a ``side``-padded batch has the numbers of running it alone, at its real positions."""
    arch, worst = run.arch, Worst()
    sites = _PADDING_SITES + (("logits",) if arch.lm_head is not None else ())
    for label, alone, padded in run.groups:
        res = capture(arch, padded[side], sites=sites)
        for row, solo in enumerate(run.alone(label, alone, sites)):
            real = res.attention_mask[row]
            if "logits" in sites:
                worst.add(_error(res.logits[row][real], solo.logits[0]), f"{label} row {row}, logits")
            for site in _PADDING_SITES:
                got, want = getattr(res, site)[:, row], getattr(solo, site)[:, 0]
                for layer in range(got.shape[0]):
                    g = got[layer][:, real][:, :, real] if site == "attn_pattern" else got[layer][real]
                    worst.add(_error(g, want[layer]), f"{label} row {row}, {site} {layer}")
    return worst


def dla_sum(run: Run) -> Worst:
    """Direct logit attribution of the top-1 token at each row's last token sums to its logit.

    Scaled by the largest logit magnitude at that position.
    """
    arch, worst = run.arch, Worst()
    for label, batch in run.inputs:
        logits = run.logits(label, batch)
        last = batch.attention_mask.long().cumsum(-1).argmax(-1).to(logits.device)  # last real position
        final = logits[torch.arange(len(batch), device=logits.device), last]  # [batch, d_vocab]
        dla = logit_attribution(arch, batch, target=final.argmax(-1).tolist())
        for row in range(len(batch)):
            scale = float(final[row].float().abs().max())
            error = abs(float(dla.sum()[row]) - float(dla.logit[row])) / (scale or 1.0)
            worst.add(error, f"{label} row {row}")
    return worst


#: Each row's check, in the order they run.
CHECKS: dict[str, Callable[[Run], Worst]] = {
    "hidden_states": hidden_states,
    "resid_mid": resid_mid,
    "resid_next": resid_next,
    "attn_output": attn_output,
    "mlp_output": mlp_output,
    "attn_pattern": attn_pattern,
    "lens_logits": lens_logits,
    "lens_probs": lens_probs,
    "padding_left": functools.partial(padding, side="left"),
    "padding_right": functools.partial(padding, side="right"),
    "dla_sum": dla_sum,
}

#: every hook dictionary of a module
_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
          "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
          "_backward_pre_hooks", "_backward_hooks")


@contextmanager
def as_found(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; every module as found after, also on errors.

    Each module's ``training`` flag comes back; hooks and plain attributes added inside are taken off
    (HuggingFace installs its output-recording hooks at the first ``output_hidden_states`` forward and
    marks the model; both go, so it installs them again when the user asks).
    """
    saved = [(m, m.training, set(vars(m)), {name: set(getattr(m, name, {})) for name in _HOOKS})
             for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training, attributes, hooks in saved:
            module.training = training
            for key in set(vars(module)) - attributes:
                delattr(module, key)
            for name, before in hooks.items():
                current = getattr(module, name, {})
                for key in set(current) - before:
                    del current[key]
