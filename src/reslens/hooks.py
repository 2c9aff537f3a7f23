"""Exact activation capture from an unmodified HuggingFace model: the only module that registers hooks.

``capture`` runs the forward pass itself and returns :class:`~reslens.residuals.Residuals`;
``trace`` is a context manager that records a forward the caller runs; ``patch`` is a context
manager that replaces sites during the forwards the caller runs (interventions: coefficient
edits, causal-tracing noise and restoration). Hook points come from the family adapter
(:mod:`reslens.arch`). All remove every hook they added on exit (also on exceptions) in
reverse order, and never change weights, the ``training`` flag or ``requires_grad``.

Concurrency: a recorder or patch acts only in the thread that entered it, so one model can
serve forwards from several threads while one of them traces or patches (each thread's
``capture`` records its own forward; another thread's plain forward is never patched or
stopped). Weight edits (:mod:`reslens.rome`) are not thread-local: they change the model for
every thread.

Dispatched models (accelerate's ``device_map``, layers on several devices, in CPU memory or on
disk): the hooks are plain PyTorch hooks beside accelerate's own (which wrap ``forward``), so they
see each module's inputs and outputs where accelerate runs it; captured tensors are gathered on
``arch.device`` (where the embedding runs) unless ``device=`` says otherwise, and patch functions
receive their tensors there too.

Order: a :func:`patch` entered inside a :func:`trace` (or the other way round) is always
recorded as patched: entering a patch moves the active traces' hooks of that model behind
its own, so a recorded run never contradicts itself (``resid[l+1] = resid[l] + attn_out[l] +
mlp_out[l]`` holds for the patched values).
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch

from reslens._checks import check_bool, check_device, check_dtype, check_edits, check_layers, check_sites
from reslens._hooking import (_SiteBuffer, _StopForward, _ThreadHooks, cache_length, every_position,
                              takes_start)
from reslens._inputs import Batch, as_batch
from reslens.arch import adapter
from reslens.residuals import BLOCK_SITES, SITES, Residuals

__all__ = [
    "SITES",
    "BLOCK_SITES",
    "PATCH_SITES",
    "Trace",
    "Patch",
    "capture",
    "trace",
    "patch",
]

#: Sites :func:`patch` can replace: ``resid`` layer ``l`` is the input of block ``l`` (of
#: the final norm for ``l = n_layer``); the others are per block, as in :func:`capture`.
PATCH_SITES = ("resid", "attn_out", "mlp_out", "mlp_act", "mlp_raw", "attn_z")

#: Active traces by model: a patch entered later moves their hooks behind its own.
_ACTIVE_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _check_blocks(sites: tuple[str, ...], layers: tuple[int, ...], n_layer: int) -> None:
    """Per-block sites need at least one block (a layer below ``n_layer``) among ``layers``."""
    if all(layer >= n_layer for layer in layers) and any(site in BLOCK_SITES for site in sites):
        raise ValueError(
            f"layers={list(layers)} selects no block for the per-block sites "
            f"{[s for s in sites if s in BLOCK_SITES]}; blocks are 0..{n_layer - 1}"
        )


class Trace(_ThreadHooks):
    """Hooks that record the sites of a forward pass; use via :func:`capture` or :func:`trace`.

    After a forward, :attr:`residuals` holds the captured :class:`Residuals` (of the last
    forward if several ran inside the context: a warning says so when a second one starts).
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
    ) -> None:
        arch = adapter(model)
        n_layer = arch.n_layer
        sites = check_sites(sites, SITES)
        layers = check_layers(layers, n_layer, what=f"a {n_layer}-layer model's residual stream")
        _check_blocks(sites, layers, n_layer)
        checked = (check_dtype(dtype), check_device(device), check_bool(detach, "detach"))
        self._setup(arch, sites, layers, *checked)

    @classmethod
    def _checked(cls, arch: Any, sites: tuple, layers: tuple, *args: Any,
                 stop_when_done: bool = False) -> Trace:
        """A trace of arguments checked as :meth:`__init__` checks them (``args``: dtype, device, detach)."""
        _check_blocks(sites, layers, arch.n_layer)
        recorder = cls.__new__(cls)
        recorder._setup(arch, sites, layers, *args, stop_when_done=stop_when_done)
        return recorder

    def _setup(self, arch: Any, sites: tuple, layers: tuple, dtype: torch.dtype | None,
               device: torch.device | None, detach: bool, *, stop_when_done: bool = False) -> None:
        super().__init__()
        self.arch, self.sites, self.layers = arch, sites, layers
        self.blocks = tuple(layer for layer in layers if layer < arch.n_layer)
        self.dtype, self.device, self.detach = dtype, device, detach
        self._gather = self.device or self.arch.device  # one device, however the model is dispatched
        self._stop_when_done = stop_when_done  # run by capture, which stops the forward when done
        self._result: Residuals | None = None
        self._forwards = 0
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
                self._gather,
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
        on = self._gather
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

    def _hook_points(self) -> list[tuple[Any, str, Any]]:
        """(module, 'pre' | 'post', callback) for every site and kept layer."""
        a = self.arch
        hidden = a.hidden_of
        points = []
        if "resid" in self.sites:
            for i, layer in enumerate(self.layers):
                module = a.final_norm_module if layer == a.n_layer else a.blocks[layer]
                points.append(
                    (module, "pre", lambda args, kwargs, i=i: self._store("resid", i, hidden(args, kwargs)))
                )
        for i, block in enumerate(self.blocks):
            for site in self.sites:
                if site in ("resid", "final", "logits"):
                    continue
                if site == "resid_mid" and a.layout.parallel:
                    points += self._parallel_mid(i, block)
                    continue
                spec = a.site_hook(site, block)
                points.append((spec.module, spec.kind, self._site_callback(site, i, spec)))
        if "final" in self.sites or ("logits" in self.sites and a.lm_head is None):
            points.append((a.final_norm_module, "post", self._on_final))
        if "logits" in self.sites and a.lm_head is not None:
            points.append((a.lm_head, "post", lambda out: self._store(
                "logits", 0, a.softcap_logits(every_position(out, self._inputs)))))
        return points

    def _site_callback(self, site: str, i: int, spec: Any) -> Any:
        def store(payload: Any) -> None:
            t = spec.pattern(payload, self._inputs[1])
            if t.ndim == 2:  # read from flattened tokens (the experts of a mixture of experts)
                t = t.view(*self._batch_shape(), t.shape[-1])
            self._store(site, i, t)

        if spec.kind == "pre":
            return lambda args, kwargs: store((args, kwargs))
        return store

    def _batch_shape(self) -> tuple[int, int]:
        input_ids, attention_mask, _ = self._inputs
        return tuple((input_ids if input_ids is not None else attention_mask).shape)

    def _parallel_mid(self, i: int, block: int) -> list[tuple[Any, str, Any]]:
        """``resid_mid`` of a parallel block (GPT-NeoX): ``resid + attn_out``, which no module computes.

        Both sublayers read the block's input, so this is the residual with the attention's output added
        and the MLP's not yet: what a sequential block would give its MLP (this one's MLP never reads it).
        """
        held: dict[str, torch.Tensor] = {}
        attn = self.arch.site_hook("attn_out", block)

        def on_attn(out: Any) -> None:
            self._store("resid_mid", i, held.pop("resid") + attn.pattern(out, None))

        return [(self.arch.blocks[block], "pre",
                 lambda args, kwargs: held.__setitem__("resid", self.arch.hidden_of(args, kwargs))),
                (attn.module, attn.kind, on_attn)]

    def _on_final(self, out: torch.Tensor) -> None:
        if "logits" in self.sites and self.arch.lm_head is None:
            logits = self.arch.unembed(out)  # [batch, pos, d_vocab]
            if "final" in self.sites:
                self._buffers["final"].write(0, out)
                self._remaining -= 1
            self._store("logits", 0, logits)
        else:
            self._store("final", 0, out)

    def _on_forward_start(self, args: tuple, kwargs: dict) -> None:
        inputs = self.arch.forward_inputs(args, kwargs)
        if cache_length(inputs.cache) > 0:
            raise ValueError(
                "reslens records whole forward passes; this one continues a KV cache "
                "(pass the full sequence with use_cache=False)"
            )
        attention_mask = inputs.attention_mask
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError(
                f"reslens needs a 2-D attention_mask [batch, pos]; got shape {tuple(attention_mask.shape)}"
            )
        self._forwards += 1
        if self._forwards == 2 and not self._stop_when_done:
            warnings.warn(
                "a second forward pass started inside this trace; trace keeps only the last one "
                "(use one trace per forward, or reslens.capture)",
                stacklevel=4,
            )
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
        self._reset(inputs.input_ids, attention_mask, inputs.position_ids)

    def _register(self) -> None:
        self._add_pre(self.arch.body, self._on_forward_start)
        for module, kind, callback in self._hook_points():
            if kind == "pre":
                self._add_pre(module, lambda args, kwargs, cb=callback: cb(args, kwargs))
            else:
                self._add_post(module, lambda out, cb=callback: cb(out))

    def _rehook(self) -> None:
        """Register this trace's hooks again, behind every hook added since (see :class:`Patch`)."""
        self._remove()
        self._register()

    def __enter__(self) -> Trace:
        if self._handles:
            raise RuntimeError("this trace is already active")
        if self.arch.model.training:
            warnings.warn(
                "the model is in training mode, so dropout makes captured activations random; "
                "call model.eval()",
                stacklevel=4 if self._stop_when_done else 3,  # capture's caller, or the with statement's
            )
        self._thread = threading.get_ident()
        try:
            self._register()
        except BaseException:
            self._remove()
            raise
        _ACTIVE_TRACES.setdefault(self.arch.model, []).append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()
        active = _ACTIVE_TRACES.get(self.arch.model, [])
        if self in active:
            active.remove(self)


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
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
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

    ``inputs``: ids ``[batch, pos]``, a :class:`~reslens.Batch`, a tokenizer output, or text with
    ``tokenizer=``. ``model``: a HuggingFace model of a supported family, or its adapter.
    Positions come from the attention mask, so padded sequences get the numbers of running
    alone. ``layers`` (0..n_layer, negatives from the end) limits the residual layers and
    blocks kept; the forward stops as soon as everything asked for is recorded (the LM head
    only runs when ``logits`` are asked for). ``dtype``/``device`` say how captured tensors
    are stored (``device=None``: the model's :attr:`~reslens.arch.Arch.device`, which gathers a
    model dispatched over several devices); ``detach=False`` keeps them in the autograd graph.

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> res = capture(model, torch.tensor([[1, 2, 3, 4]]), sites=("resid", "mlp_act"))
    >>> tuple(res.resid.shape), tuple(res.mlp_act.shape), res.layers
    ((3, 1, 4, 16), (2, 1, 4, 64), (0, 1, 2))
    """
    recorder = Trace(model, sites, layers=layers, dtype=dtype, device=device, detach=detach)
    recorder._stop_when_done = True
    return _record(recorder, as_batch(inputs, recorder.arch, tokenizer))


def _capture(arch: Any, batch: Batch, *, sites: tuple[str, ...], layers: tuple[int, ...],
             dtype: Any = None, device: Any = None, detach: bool = True) -> Residuals:
    """:func:`capture` of arguments a public function has checked, checking nothing again.

    ``arch``: an adapter; ``batch``: from :func:`~reslens._inputs.as_batch` (checked against the model, on
    its device); ``sites`` known and unrepeated, ``layers`` sorted and unique, ``dtype``/``device`` as
    ``check_dtype``/``check_device`` give them.
    """
    return _record(Trace._checked(arch, sites, layers, dtype, device, detach, stop_when_done=True), batch)


def _record(recorder: Trace, batch: Batch) -> Residuals:
    """Run the model on a checked ``batch`` inside ``recorder``, stopping once it has every site."""
    arch, detach = recorder.arch, recorder.detach
    runner = arch.model if "logits" in recorder.sites and arch.lm_head is not None else arch.body
    with recorder, torch.no_grad() if detach else nullcontext():
        try:
            runner(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask.long(),
                position_ids=batch.position_ids,
                use_cache=False,
            )
        except _StopForward:
            arch.release_offloaded()  # accelerate offloads a whole module only when its forward returns
    res = recorder.residuals
    if bool(batch.special_mask.any()):
        res = replace(res, special_mask=batch.special_mask.to(res.attention_mask.device))
    return res


class Patch(_ThreadHooks):
    """Hooks that replace sites during forwards; use via :func:`patch`."""

    def __init__(self, model: Any, edits: Any) -> None:
        super().__init__()
        self.arch = adapter(model)
        self._device = self.arch.device
        self.edits: dict[tuple[str, int], Any] = check_edits(edits, PATCH_SITES, self.arch.n_layer)
        if any(site == "mlp_act" for site, _ in self.edits):
            self.arch.require("patch_mlp_act")
        self._with_start = {key for key, fn in self.edits.items() if takes_start(fn)}
        self._start = 0  # the whole-sequence position of this forward's first token

    def _on_forward_start(self, args: tuple, kwargs: dict) -> None:
        self._start = cache_length(self.arch.forward_inputs(args, kwargs).cache)
        blind = [key for key in self.edits if key not in self._with_start]
        if self._start > 0 and blind:
            raise ValueError(
                f"this forward continues a KV cache of {self._start} tokens (as model.generate() runs "
                f"with use_cache=True), so the edits of {blind} would see only the new tokens, the "
                "first at pos 0; give each function a parameter `start` (it then gets the position "
                "of its tensor's first entry in the whole sequence) or run with use_cache=False"
            )

    def _on_forward_end(self, out: Any) -> None:
        self._start = 0  # a block run alone (outside a body forward) starts at its own first position

    def _apply(self, site: str, layer: int, t: torch.Tensor) -> torch.Tensor:
        x = t.to(self._device)  # a dispatched model's layer may run elsewhere: the function sees arch.device
        fn = self.edits[(site, layer)]
        out = fn(x, start=self._start) if (site, layer) in self._with_start else fn(x)
        if out is None:  # edited in place
            return t if x is t else x.to(t.device)
        if not isinstance(out, torch.Tensor) or out.shape != t.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"the edit of ({site!r}, {layer}) returned {got}; expected a tensor {tuple(t.shape)}"
            )
        return out.to(device=t.device, dtype=t.dtype)

    def _register(self, site: str, layer: int) -> None:
        a = self.arch

        def replace_input(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return a.with_hidden(args, kwargs, self._apply(site, layer, a.hidden_of(args, kwargs)))

        def replace_output(out: Any) -> Any:
            if isinstance(out, tuple):
                return (self._apply(site, layer, out[0]), *out[1:])
            return self._apply(site, layer, out)

        if site == "resid":
            self._add_pre(a.final_norm_module if layer == a.n_layer else a.blocks[layer], replace_input)
            return
        if site == "mlp_raw":  # the value projection's output, before any output norm (a weight edit's reach)
            self._add_post(a.mlp_out_proj(layer), replace_output)
            return
        spec = a.site_hook(site, layer)  # attn_out, mlp_out: post; mlp_act, attn_z: pre
        if spec.kind == "pre":
            self._add_pre(spec.module, replace_input)
        else:
            self._add_post(spec.module, replace_output)

    def __enter__(self) -> Patch:
        if self._handles:
            raise RuntimeError("this patch is already active")
        self._thread = threading.get_ident()
        try:
            self._add_pre(self.arch.body, self._on_forward_start)
            self._add_post(self.arch.body, self._on_forward_end, always_call=True)
            for site, layer in self.edits:
                self._register(site, layer)
        except BaseException:
            self._remove()
            raise
        for active in list(_ACTIVE_TRACES.get(self.arch.model, [])):
            if active._thread == self._thread:
                active._rehook()  # record after this patch's edits
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()


def patch(model: Any, edits: Mapping[tuple[str, int], Any]) -> Patch:
    """Replace sites during the forwards run inside the context; hooks go away on exit.

    ``edits`` maps ``(site, layer)`` to a function that receives the site's tensor
    ``[batch, pos, d_model]`` (``[batch, pos, d_mlp]`` for ``mlp_act``) as this forward
    computed it and returns the tensor to use instead (or ``None`` after editing it in
    place). Sites: ``resid`` (layer ``l`` = the input of block ``l``, ``n_layer`` = the input
    of the final norm; layer 0 is the embedding), ``attn_out``, ``mlp_out``, ``mlp_act``, ``attn_z``
    (every head's output ``[batch, pos, n_head * d_head]``, head ``h`` in columns ``h * d_head ..``:
    the attention output projection's input; :mod:`reslens.heads.ablation` builds its edits), and
    ``mlp_raw``: the MLP value projection's output, before the output norm of families that have one
    (Gemma 2/3, OLMo 2; ``mlp_out`` elsewhere, a mixture of experts' weighted sum), which is what a
    weight edit of that projection reaches.
    A function with a parameter ``start`` is called ``fn(t, start=s)``, ``s`` the position of
    ``t[:, 0]`` in the whole sequence: 0, or the tokens a KV cache holds when the forward continues
    one (``model.generate()``, whose steps see only the new token). A forward that continues a
    cache is refused while any function lacks ``start``. Gradients flow through the functions,
    so they may add trainable tensors. A trace active on the model records the patched values,
    whichever was entered first. Only forwards of the thread that entered the patch are changed.

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, hidden_size=16, n_head=2, vocab_size=50)).eval()
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> with patch(model, {("mlp_out", 1): torch.zeros_like}):
    ...     res = capture(model, ids, sites="mlp_out")
    >>> float(res.mlp_out[1].abs().max())
    0.0
    """
    return Patch(model, edits)
