"""Saving results to safetensors (no pickle) and reading them back, with one file discipline.

Every file reslens writes goes through :func:`atomic_write`: the parent folder is created,
the file is written to a temporary name beside it and renamed into place, so an interrupted
save never leaves a half-written file under the user's name, and it gets the usual
permissions (``0o666`` less the umask). Every read goes through :func:`read_safetensors`,
which turns a missing, truncated, foreign or text file into a ``ValueError`` naming the path.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import typing
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Saveable", "atomic_write", "read_safetensors", "write_safetensors"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on any error removed.

    A file or folder that exists where the parent folder should be is an error naming it.
    """
    target = Path(os.fspath(path))
    if target.is_dir():
        raise ValueError(f"cannot save to {os.fspath(path)!r}: it is a folder; give a file name")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(
            f"cannot save to {os.fspath(path)!r}: a part of {str(parent)!r} is a file, not a folder"
        ) from None
    except PermissionError:
        raise ValueError(
            f"cannot save to {os.fspath(path)!r}: no permission to create {str(parent)!r}"
        ) from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    except PermissionError:
        raise ValueError(f"cannot save to {os.fspath(path)!r}: {str(parent)!r} is not writable") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write ``tensors`` (CPU, contiguous copies) and string ``metadata`` atomically to ``path``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    seen: set[int] = set()
    for key, value in tensors.items():  # safetensors refuses tensors that share memory: copy the repeats
        storage = value.untyped_storage().data_ptr()
        if storage in seen and value.numel():
            tensors[key] = value.clone()
        seen.add(storage)
    with atomic_write(path) as tmp:
        save_file(tensors, os.fspath(tmp), metadata=metadata)


def read_safetensors(
    path: str | os.PathLike,
    fmt: str | None = None,
    *,
    device: str | torch.device = "cpu",
    what: str = "reslens",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; ``fmt`` = the ``format`` its metadata must hold.

    Every failure is a ``ValueError`` naming ``path`` and what is wrong with it.
    """
    from safetensors import SafetensorError, safe_open

    shown = os.fspath(path)
    p = Path(shown)
    if not p.exists():
        raise ValueError(f"cannot load {shown!r}: no such file")
    if p.is_dir():
        raise ValueError(f"cannot load {shown!r}: it is a folder, not a {what} file")
    try:
        with safe_open(shown, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if fmt is not None and meta.get("format") != fmt:
                raise ValueError(
                    f"{shown!r} is not a {what} file (its format is {meta.get('format')!r}; expected {fmt!r})"
                )
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, UnicodeDecodeError) as error:
        raise ValueError(
            f"cannot load {shown!r}: not a readable safetensors file, or truncated ({error})"
        ) from None
    return tensors, meta


def _int_keyed(annotation: Any) -> bool:
    """Whether a field's annotation is ``dict[int, ...]`` (possibly ``| None``)."""
    if isinstance(annotation, str):
        return annotation.replace(" ", "").startswith(("dict[int,", "dict[int,str]|None"))
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is dict and typing.get_args(arg)[:1] == (int,):
            return True
    return False


class Saveable:
    """``save``/``load`` through safetensors (no pickle) for the result dataclasses.

    Tensors go in the file (complex ones as real and imaginary parts), other fields in its metadata
    as JSON (tuples come back as tuples, ``dict[int, ...]`` fields with int keys). A field holding a
    record (a dataclass, such as ``LensStats.mean``) is stored as ``field.subfield``, recursively.
    """

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file (atomically; the folder is created); read it back with ``load``."""
        tensors: dict[str, torch.Tensor] = {}
        meta = {"format": f"reslens.{type(self).__name__}/1"}
        _flatten(self, "", tensors, meta)
        write_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu"):
        """Read a file written by ``save``."""
        tensors, meta = read_safetensors(
            path, f"reslens.{cls.__name__}/1", device=device, what=f"reslens {cls.__name__}"
        )
        try:
            return _build(cls, "", tensors, meta, os.fspath(path))
        except (TypeError, ValueError, KeyError) as error:
            if str(error).startswith(repr(os.fspath(path))):
                raise
            raise ValueError(f"{os.fspath(path)!r} holds an inconsistent {cls.__name__}: {error}") from None


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Put ``obj``'s fields under ``prefix``: tensors in ``tensors``, records recursively, the rest JSON."""
    for f in fields(obj):
        if not f.init:
            continue
        value, key = getattr(obj, f.name), prefix + f.name
        if isinstance(value, torch.Tensor):
            if value.is_complex():
                tensors[f"{key}.real"], tensors[f"{key}.imag"] = value.real, value.imag
            else:
                tensors[key] = value
        elif is_dataclass(value) and not isinstance(value, type):
            _flatten(value, key + ".", tensors, meta)
        else:
            meta[key] = json.dumps(value)


def _build(cls: type, prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str) -> Any:
    """``cls`` rebuilt from what :func:`_flatten` stored under ``prefix``."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for fl in fields(cls):
        if not fl.init:
            continue
        key, hint = prefix + fl.name, hints.get(fl.name, fl.type)
        if key in tensors:
            kwargs[fl.name] = tensors[key]
        elif f"{key}.real" in tensors:
            kwargs[fl.name] = torch.complex(tensors[f"{key}.real"], tensors[f"{key}.imag"])
        elif _record_type(hint) is not None and (meta.get(key) != "null"):
            kwargs[fl.name] = _build(_record_type(hint), key + ".", tensors, meta, path)
        elif key in meta:
            try:
                value = json.loads(meta[key])
            except json.JSONDecodeError as error:
                raise ValueError(f"{path!r}: its metadata field {key!r} is not valid JSON ({error}): "
                                 f"{meta[key][:80]!r}") from None
            if isinstance(value, dict) and _int_keyed(hint):
                value = {int(k): v for k, v in value.items()}
            elif isinstance(value, list) and "tuple" in str(hint):
                value = _tuples(value)
            kwargs[fl.name] = value
    return cls(**kwargs)


def _record_type(hint: Any) -> type | None:
    """The dataclass a field's annotation names (``X`` or ``X | None``), or None."""
    for arg in (hint, *typing.get_args(hint)):
        if isinstance(arg, type) and is_dataclass(arg):
            return arg
    return None


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
