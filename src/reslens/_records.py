"""Saving results that hold typed records (dataclasses of tensors inside a result).

Records such as ``LensStats.mean`` or ``PCAExperiment.baseline`` are stored as ``field.subfield``
through the same safetensors files as :class:`~reslens._saving.Saveable`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any

import torch

from reslens._saving import Saveable, read_safetensors, write_safetensors

__all__ = ["RecordSaveable"]


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value, key = getattr(obj, f.name), prefix + f.name
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            _flatten(value, key + ".", tensors, meta)
        else:
            meta[key] = json.dumps(value)


def _build(cls: type, prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, hint = prefix + f.name, hints.get(f.name, f.type)
        if key in tensors:
            kwargs[f.name] = tensors[key]
        elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, key + ".", tensors, meta)
        elif key in meta:
            value = json.loads(meta[key])
            kwargs[f.name] = tuple(value) if isinstance(value, list) and "tuple" in str(hint) else value
    return cls(**kwargs)


class RecordSaveable(Saveable):
    """:class:`~reslens._saving.Saveable` for results whose fields may be records (dataclasses)."""

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file (atomically; the folder is created); read it back with ``load``."""
        tensors: dict[str, torch.Tensor] = {}
        meta = {"format": f"reslens.{type(self).__name__}/1"}
        _flatten(self, "", tensors, meta)
        write_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu"):
        """Read a file written by ``save``."""
        tensors, meta = read_safetensors(path, f"reslens.{cls.__name__}/1", device=device,
                                         what=f"reslens {cls.__name__}")
        try:
            return _build(cls, "", tensors, meta)
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"{os.fspath(path)!r} holds an inconsistent {cls.__name__}: {error}") from None
