"""Saving result dataclasses to safetensors (no pickle) and reading them back."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from typing import Any

import torch

__all__ = ["Saveable"]


class Saveable:
    """``save``/``load`` through safetensors (no pickle) for the result dataclasses: tensors
    go in the file (complex ones as real and imaginary parts), other fields in its metadata."""

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file; read it back with ``load``."""
        from safetensors.torch import save_file

        tensors, meta = {}, {"format": f"reslens.{type(self).__name__}/1"}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                if value.is_complex():
                    tensors[f"{f.name}.real"] = value.real.detach().contiguous().cpu()
                    tensors[f"{f.name}.imag"] = value.imag.detach().contiguous().cpu()
                else:
                    tensors[f.name] = value.detach().contiguous().cpu()
            else:
                meta[f.name] = json.dumps(value)
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a file written by ``save``."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != f"reslens.{cls.__name__}/1":
                raise ValueError(f"{os.fspath(path)!r} is not a reslens {cls.__name__} file (format={meta.get('format')!r})")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        kwargs: dict[str, Any] = {}
        for fl in fields(cls):
            if fl.name in tensors:
                kwargs[fl.name] = tensors[fl.name]
            elif f"{fl.name}.real" in tensors:
                kwargs[fl.name] = torch.complex(tensors[f"{fl.name}.real"], tensors[f"{fl.name}.imag"])
            elif fl.name in meta:
                kwargs[fl.name] = json.loads(meta[fl.name])
        if isinstance(kwargs.get("token_strings"), dict):
            kwargs["token_strings"] = {int(k): v for k, v in kwargs["token_strings"].items()}
        return cls(**kwargs)
