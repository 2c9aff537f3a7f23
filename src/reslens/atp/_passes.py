"""The forwards and backwards of attribution patching: corrupted states, clean gradients, IG.

Components and the site whose gradient they read:

- ``heads``: ``attn_z`` (the output projection's input, head ``h`` in columns ``h * d_head ..``; one slice
  per query head, so grouped K/V needs nothing special);
- ``mlp``: ``mlp_out`` (what the MLP adds to the residual);
- ``memories``: ``mlp_raw`` (the value projection's output): memory ``i`` writes
  ``mlp_act[..., i] · W_out[i]`` there, so its gradient is ``grad(mlp_raw) · W_out[i]``; for a mixture of
  experts ``mlp_act`` holds
  every expert's routed coefficients and ``W_out`` every expert's value rows (memory ``e * d_expert + j``);
- ``resid``: ``resid`` (the input of block ``l``; ``n_layer``: of the final norm), per position.

A gradient pass makes ``resid`` layer 0 a leaf that requires grad (the weights' ``requires_grad`` is
switched off meanwhile and restored after, so no weight ever gets a ``.grad``), runs the body with
:func:`reslens.patch` edits that keep a handle on each site's tensor (returning it unchanged), computes
the metric on the logits and takes :func:`torch.autograd.grad` of it at those tensors: one forward and
one backward, and the logits are dropped before this returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from reslens.atp.metrics import wide
from reslens._inputs import Batch
from reslens.arch import Arch
from reslens.hooks import _capture, patch, trace

__all__ = ["KINDS", "States", "grad_keys", "corrupted_states", "clean_states", "gradient_pass",
           "no_weight_grads", "estimates"]

#: The component kinds attribution patching scores.
KINDS = ("heads", "mlp", "memories", "resid")
_SITE = {"heads": "attn_z", "mlp": "mlp_out", "memories": "mlp_raw", "resid": "resid"}


@dataclass
class States:
    """Site values of one run, ``[rows, pos, ·]`` each: ``sites[(site, layer)]``, ``mlp_act`` by block."""

    sites: dict[tuple[str, int], torch.Tensor]
    mlp_act: dict[int, torch.Tensor]
    final: torch.Tensor  # the final norm's output [rows, pos, d_model]


def grad_keys(arch: Arch, kinds: tuple[str, ...]) -> list[tuple[str, int]]:
    """The ``(site, layer)`` tensors whose gradients ``kinds`` need (``resid`` 0, the leaf, always first)."""
    keys = [("resid", 0)]
    for kind in kinds:
        layers = range(arch.n_layer + 1) if kind == "resid" else range(arch.n_layer)
        keys += [(_SITE[kind], layer) for layer in layers if (_SITE[kind], layer) != ("resid", 0)]
    return keys


def _forward_kwargs(batch: Batch) -> dict[str, Any]:
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                position_ids=batch.position_ids, use_cache=False)


def _capture_sites(kinds: tuple[str, ...]) -> tuple[str, ...]:
    sites = {"resid", "final"} | {_SITE[k] for k in kinds if k != "memories"}
    if "memories" in kinds:
        sites.add("mlp_act")
    return tuple(sorted(sites))


def _states_of(arch: Arch, res: Any, kinds: tuple[str, ...]) -> States:
    sites = {}
    for site in _capture_sites(kinds):
        if site in ("final", "mlp_act"):
            continue
        layers = range(arch.n_layer + 1) if site == "resid" else range(arch.n_layer)
        sites.update({(site, layer): res.get(site, layer) for layer in layers})
    acts = {layer: res.get("mlp_act", layer) for layer in range(arch.n_layer)} if "memories" in kinds else {}
    return States(sites, acts, res.final)


def corrupted_states(arch: Arch, batch: Batch, kinds: tuple[str, ...],
                     resid0_edit: Callable | None) -> States:
    """The corrupted run's sites (one forward, no grad).

    ``batch``: the corrupted batch, or the clean batch with ``resid0_edit`` adding noise to ``resid`` 0.
    """
    edits = {} if resid0_edit is None else {("resid", 0): resid0_edit}
    with patch(arch, edits):
        res = _capture(arch, batch, sites=_capture_sites(kinds), layers=tuple(range(arch.n_layer + 1)))
    return _states_of(arch, res, kinds)


def clean_states(arch: Arch, batch: Batch, kinds: tuple[str, ...]) -> States:
    """The clean run's sites (one forward, no grad)."""
    return corrupted_states(arch, batch, kinds, None)


@contextlib.contextmanager
def no_weight_grads(model: Any) -> Iterator[None]:
    """Switch every parameter's ``requires_grad`` off inside the block; restored after, also on errors."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@dataclass
class GradPass:
    """One gradient pass: the metric's value, the gradients, and (``keep``) the clean run's states."""

    value: float
    grads: dict[tuple[str, int], torch.Tensor]
    states: States | None
    metric: Any  # the metric as used (bound to this run's logits where it binds)


class _Gate(torch.autograd.Function):
    """Identity forward; backward scales the gradient by ``gates[layer]`` (GradDrop's switch)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gates: list[float], layer: int) -> torch.Tensor:
        ctx.gates, ctx.layer = gates, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad * ctx.gates[ctx.layer], None, None


def gradient_pass(arch: Arch, batch: Batch, keys: list[tuple[str, int]], metric: Any, *,
                  kinds: tuple[str, ...], shift: torch.Tensor | None = None, keep: bool = True,
                  on_drop: Callable | None = None) -> GradPass:
    """One forward with grad and one backward of ``metric`` at the ``keys`` tensors.

    ``shift [rows, pos, d_model]``: added to ``resid`` layer 0 (a point on the integrated-gradients path).
    ``keep``: also return this run's states (its sites, ``mlp_act`` and final hidden) and bind the metric
    to its logits. ``on_drop(layer, grads, states)`` (with ``keep``): GradDrop; after the plain backward,
    one more per block with the gradient into that block's attention and MLP outputs set to zero.
    """
    held: dict[tuple[str, int], torch.Tensor] = {}
    gates = [1.0] * arch.n_layer

    def hold(key: tuple[str, int], grab: bool) -> Callable:
        def fn(x: torch.Tensor) -> torch.Tensor:
            if key == ("resid", 0):
                x = x.detach() + (0 if shift is None else shift.to(x.dtype))
                x.requires_grad_(True)
            if on_drop is not None and key[0] in ("attn_out", "mlp_out"):
                x = _Gate.apply(x, gates, key[1])
            if grab:
                held[key] = x
            return x

        return fn

    grab = list(dict.fromkeys([*keys, *_resid_keys(arch)] if keep else keys))
    gated = [(s, b) for b in range(arch.n_layer) for s in ("attn_out", "mlp_out")] if on_drop else []
    edits = {key: hold(key, key in grab) for key in dict.fromkeys([*grab, *gated])}
    sites = ("mlp_act",) if keep and "memories" in kinds else ()
    with no_weight_grads(arch.model), torch.enable_grad():
        recorder = trace(arch, sites=sites) if sites else None
        with recorder or contextlib.nullcontext(), patch(arch, edits):
            final = arch.body(**_forward_kwargs(batch)).last_hidden_state
        logits = wide(arch.unembed(final))  # [rows, pos, d_vocab], dropped before returning
        if keep and hasattr(metric, "bind"):
            metric = metric.bind(logits)
        value = metric(logits)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"metric must return a scalar tensor; got {got}")
        if not value.requires_grad:
            raise ValueError("metric returned a tensor that does not depend on the logits (no gradient)")
        del logits
        states = None
        if keep:
            acts = {}
            if "memories" in kinds:
                res = recorder.residuals
                acts = {layer: res.get("mlp_act", layer) for layer in range(arch.n_layer)}
            states = States({key: t.detach() for key, t in held.items()}, acts, final.detach())
        tensors = [held[key] for key in keys]
        out = _grads(value, keys, tensors, retain=on_drop is not None)
        for layer in range(arch.n_layer) if on_drop is not None else ():
            gates[:] = [float(b != layer) for b in range(arch.n_layer)]
            on_drop(layer, _grads(value, keys, tensors, retain=layer < arch.n_layer - 1), states)
    return GradPass(float(value.detach()), out, states, metric)


def _grads(value: torch.Tensor, keys: list, tensors: list, *, retain: bool) -> dict:
    grads = torch.autograd.grad(value, tensors, allow_unused=True, retain_graph=retain)
    return {key: torch.zeros_like(t) if g is None else g.detach() for key, t, g in zip(keys, tensors, grads)}


def _resid_keys(arch: Arch) -> list[tuple[str, int]]:
    return [("resid", layer) for layer in range(arch.n_layer + 1)]


def estimates(arch: Arch, kinds: tuple[str, ...], grads: dict[tuple[str, int], torch.Tensor],
              clean: States, corrupt: States) -> dict[str, torch.Tensor]:
    """``grad · (corrupt - clean)`` summed per component (on the CPU).

    heads ``[n_layer, n_head]``, mlp ``[n_layer]``, memories ``[n_layer, d_mlp]``,
    resid ``[n_layer + 1, pos]``.
    """
    out = {}
    n = arch.n_layer

    def delta(site: str, layer: int) -> torch.Tensor:
        return wide(corrupt.sites[(site, layer)]) - wide(clean.sites[(site, layer)])

    if "heads" in kinds:
        rows = []
        for layer in range(n):
            prod = wide(grads[("attn_z", layer)]) * delta("attn_z", layer)  # [rows, pos, n_head * d_head]
            rows.append(prod.view(*prod.shape[:2], arch.n_head, arch.d_head).sum((0, 1, 3)))
        out["heads"] = torch.stack(rows)
    if "mlp" in kinds:
        out["mlp"] = torch.stack([(wide(grads[("mlp_out", layer)]) * delta("mlp_out", layer)).sum()
                                  for layer in range(n)])
    if "memories" in kinds:
        rows = []
        for layer in range(n):
            w_out = wide(arch.mlp_weights(layer).W_out.detach())  # [d_mlp, d_model]
            d_act = wide(corrupt.mlp_act[layer]) - wide(clean.mlp_act[layer])  # [rows, pos, d_mlp]
            g_raw = wide(grads[("mlp_raw", layer)]).to(w_out.device)  # a mixture of experts': [tokens, d]
            g = g_raw.view(*d_act.shape[:2], -1) @ w_out.T  # [rows, pos, d_mlp]
            rows.append((g * d_act.to(g.device)).sum((0, 1)))
        out["memories"] = torch.stack(rows)
    if "resid" in kinds:
        out["resid"] = torch.stack([(wide(grads[("resid", layer)]) * delta("resid", layer)).sum((0, 2))
                                    for layer in range(n + 1)])
    return {k: v.detach().cpu() for k, v in out.items()}
