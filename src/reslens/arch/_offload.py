"""Models dispatched by accelerate: the real values of offloaded weights, and edits that reach them.

A model loaded with ``device_map=...`` (or given to ``accelerate.dispatch_model`` / ``cpu_offload`` /
``disk_offload``) keeps the parameters of each offloaded module on the meta device outside that
module's forward. Their values live in the ``weights_map`` of the ``AlignDevicesHook`` accelerate
attached (``module._hf_hook``, on the module itself or, with ``place_submodules``, on an ancestor),
keyed by the parameter's name under that module: CPU memory, or files on disk read on demand (an
``OffloadedWeightsLoader``, which may read the checkpoint's own safetensors files). Only this module
knows that; accelerate is imported only when a model carries its hooks.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["Source", "source", "real", "execution_device", "loaded", "release", "StoredParam"]

#: ``model -> {id(module): qualified name}``, rebuilt when a name no longer resolves to its module
_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_MISSING = object()


def _name(model: nn.Module, module: nn.Module) -> str:
    names = _NAMES.get(model)
    name = None if names is None else names.get(id(module))
    if name is None or _get(model, name) is not module:
        names = _NAMES[model] = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        name = names.get(id(module))
        if name is None:
            raise ValueError(f"{type(module).__name__} is not a submodule of this {type(model).__name__}")
    return name


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _offload_hooks(module: nn.Module) -> list[Any]:
    """The offloading ``AlignDevicesHook`` s on ``module`` itself (inside a ``SequentialHook`` too)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = getattr(hook, "hooks", (hook,))
    return [h for h in hooks if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None]


class Source:
    """Where accelerate keeps an offloaded tensor: ``hook.weights_map[key]``, loaded by ``hook`` on ``owner``.

    ``where``: the tensor's qualified name in the model, for messages.
    """

    def __init__(self, hook: Any, owner: nn.Module, key: str, where: str) -> None:
        self.hook, self.owner, self.key, self.where = hook, owner, key, where

    @property
    def device(self) -> torch.device:
        """The device the model computes with this tensor on (the hook's execution device)."""
        device = self.hook.execution_device
        return torch.device("cpu") if device is None else torch.device(device)


def source(model: nn.Module, module: nn.Module, name: str) -> Source | None:
    """The accelerate hook holding tensor ``name`` of ``module`` (a submodule of ``model``), or ``None``."""
    path = _name(model, module)
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):
        owner = module if depth == len(parts) else _get(model, ".".join(parts[:depth]))
        for hook in _offload_hooks(owner) if owner is not None else ():
            if depth == len(parts) or getattr(hook, "place_submodules", False):
                key = ".".join([*parts[depth:], name])
                return Source(hook, owner, key, ".".join(p for p in (path, name) if p))
    return None


def _no_values(model: nn.Module, module: nn.Module, name: str) -> ValueError:
    where = ".".join(p for p in (_name(model, module), name) if p)
    return ValueError(f"{where} is on the meta device and no accelerate hook holds its values; load the "
                      "model's weights (from_pretrained, with a device_map if it does not fit, or "
                      "accelerate's load_checkpoint_and_dispatch)")


def real(model: nn.Module, module: nn.Module, name: str) -> torch.Tensor | None:
    """Tensor ``name`` of ``module`` with its values: the module's own tensor unless it is on the meta device.

    An offloaded tensor (meta outside its module's forward) is read from accelerate's weights map,
    where it is stored (a fresh tensor for weights on disk; the stored tensor itself for weights in
    CPU memory), cast to the parameter's dtype as accelerate does before each forward. A meta tensor
    no hook holds (a model built on the meta device and never loaded) is refused (``ValueError``).
    """
    t = getattr(module, name)
    if t is None or t.device.type != "meta":
        return t
    found = source(model, module, name)
    if found is None:
        raise _no_values(model, module, name)
    value = found.hook.weights_map[found.key]
    return value.to(t.dtype) if value.dtype.is_floating_point and value.dtype != t.dtype else value


def execution_device(model: nn.Module, module: nn.Module, name: str) -> torch.device:
    """The device ``module`` computes on: its tensor's device, or its accelerate hook's execution device."""
    t = getattr(module, name)
    if t.device.type != "meta":
        return t.device
    found = source(model, module, name)
    if found is None:
        raise _no_values(model, module, name)
    return found.device


def _managed(hook: Any, owner: nn.Module) -> list[torch.Tensor]:
    """The tensors ``hook`` loads and offloads (parameters, and buffers with ``offload_buffers``)."""
    recurse = getattr(hook, "place_submodules", False)
    tensors = list(owner.parameters(recurse=recurse))
    if getattr(hook, "offload_buffers", False):
        tensors += list(owner.buffers(recurse=recurse))
    return tensors


def _whole_module_hook(model: nn.Module, module: nn.Module) -> tuple[Any, nn.Module] | None:
    """The hook loading ``module`` with a whole ancestor (or itself), ``place_submodules``; else ``None``."""
    path = _name(model, module)
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):
        owner = module if depth == len(parts) else _get(model, ".".join(parts[:depth]))
        for hook in _offload_hooks(owner) if owner is not None else ():
            if getattr(hook, "place_submodules", False):
                return hook, owner
    return None


@contextlib.contextmanager
def loaded(model: nn.Module, module: nn.Module) -> Iterator[None]:
    """Inside: the weights of ``module`` loaded, where a hook loads them only with a whole (ancestor) module.

    For calling submodules directly (a partial forward) when accelerate attached one offloading
    hook to a whole module (``place_submodules``). Modules with their own hooks load themselves;
    weights already loaded (inside that module's forward) are left alone.
    """
    found = _whole_module_hook(model, module)
    if found is None or not any(t.device.type == "meta" for t in _managed(*found)):
        yield
        return
    hook, owner = found
    hook.pre_forward(owner)
    try:
        yield
    finally:
        hook.post_forward(owner, None)


def release(model: nn.Module) -> None:
    """Offload again the weights a forward stopped midway left loaded.

    ``capture`` stops the forward by an exception as soon as everything is recorded. A hook that
    loads a whole module (``place_submodules``) and was inside that module's forward then never ran
    its ``post_forward``; hooks of single modules run theirs before reslens' hooks can stop anything.
    """
    for module in model.modules():
        for hook in _offload_hooks(module):
            if getattr(hook, "place_submodules", False) and any(
                t.device.type != "meta" for t in _managed(hook, module)
            ):
                hook.post_forward(module, None)


def _storage(found: Source) -> tuple[dict, str]:
    """The mutable dict (and key in it) an edit of ``found`` writes: its in-memory entry, never a file."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    mapping, key = found.hook.weights_map, found.key
    while isinstance(mapping, PrefixedDataset):
        mapping, key = mapping.dataset, mapping.prefix + key
    if isinstance(mapping, OffloadedWeightsLoader):
        return mapping.state_dict, key  # read before the files: an entry here overrides the disk copy
    if isinstance(mapping, dict):
        return mapping, key
    raise ValueError(f"cannot edit {found.where}: accelerate keeps its values in a {type(mapping).__name__}, "
                     "which reslens cannot write; load the model without offloading that layer (a device_map "
                     "that puts it on a device)")


class StoredParam:
    """One parameter as a weight edit sees it, offloaded by accelerate or not.

    - not offloaded: :meth:`values` is the parameter itself and :meth:`replace` copies into it in place
    - offloaded (to CPU memory or disk): :meth:`values` is the tensor in accelerate's weights map and
      :meth:`replace` puts the new tensor in the map's in-memory entries
      (``OffloadedWeightsLoader.state_dict``, which accelerate reads before the files), so the next
      forward loads it; files on disk are never written. :meth:`put_back` restores the entry that was
      there (or removes the new one), so the original is exactly what accelerate read before

    ``anchor``: a stable object and name identifying the parameter (the parameter object itself changes
    each forward while offloaded).
    """

    def __init__(self, model: nn.Module, module: nn.Module, name: str) -> None:
        self.module, self.name = module, name
        self.param = getattr(module, name)
        self.source = source(model, module, name)

    @property
    def offloaded(self) -> bool:
        return self.source is not None

    @property
    def anchor(self) -> tuple[Any, str]:
        return (self.source.owner, self.source.key) if self.source is not None else (self.param, "")

    def values(self) -> torch.Tensor:
        if self.source is None:
            return self.param.detach()
        return self.source.hook.weights_map[self.source.key]

    def replace(self, value: torch.Tensor) -> Any:
        """Write ``value``; returns what :meth:`put_back` needs to undo it."""
        if self.source is None:
            with torch.no_grad():
                self.param.copy_(value)
            return None
        store, key = _storage(self.source)
        previous = store.get(key, _MISSING)
        store[key] = value.detach().clone()
        return previous

    def put_back(self, token: Any, original: torch.Tensor) -> None:
        """Undo :meth:`replace` (``token``: its return value; ``original``: the values before it)."""
        if self.source is None:
            with torch.no_grad():
                self.param.copy_(original)
            return
        store, key = _storage(self.source)
        if token is _MISSING:
            store.pop(key, None)
        else:
            store[key] = token
