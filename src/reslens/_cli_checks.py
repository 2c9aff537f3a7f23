"""The ``reslens`` command's argument checks: everything that needs no model, run before any model loads.

:class:`UsageError` marks an argument problem; :func:`check_args` checks the options every subcommand
shares (positive integers, readable text files, writable outputs, an available device).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["UsageError", "check_args"]


#: integer options that must be positive, in every subcommand that has them
_POSITIVE = ("top_k", "top", "n", "max_length", "max_tokens", "samples", "width", "batch_size", "window",
             "max_new_tokens")
#: the tokens of context before each prediction the ``pca`` command samples (``pca_experiment``'s min_context)
PCA_CONTEXT = 8
#: integer options with a larger minimum, by subcommand: ``(least value, why)``
_AT_LEAST = {
    ("lens", "max_length"): (2, "tokens per window: a prediction needs a token before it"),
    ("pca", "max_length"): (PCA_CONTEXT + 1, f"tokens per window: each prediction has {PCA_CONTEXT} tokens "
                                             "of context before it"),
    ("heads", "seq_len"): (2, "random tokens per repeat"),
}
#: path options read as text files
_INPUT_FILES = ("file",)
#: path options written at the end (checked before the work starts)
_OUTPUT_FILES = ("out", "figure", "html")


class UsageError(ValueError):
    """An argument problem found before any model loads."""


def _check_text_file(path: Path, flag: str) -> None:
    if not path.exists():
        raise UsageError(f"--{flag} {path}: no such file")
    if path.is_dir():
        raise UsageError(f"--{flag} {path}: is a folder; give a plain-text file")
    with open(path, "rb") as handle:
        head = handle.read(8192)
    try:
        if b"\0" in head:
            raise UnicodeDecodeError("utf-8", head, 0, 1, "NUL byte")
        # a multi-byte character may be cut at the end of the first 8 kB: judge what comes before it
        (head if len(head) < 8192 else head[:8180]).decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise UsageError(f"--{flag} {path}: not a UTF-8 text file") from None


def _check_output(path: Path, flag: str) -> None:
    import os

    if path.is_dir():
        raise UsageError(f"--{flag} {path}: is a folder; give a file name such as {path / 'figure.png'}")
    parent = path.parent if str(path.parent) else Path(".")
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"--{flag} {path}: {existing} is not a writable folder")


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available on this machine (use --device cpu)")


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model, before the subcommand's work starts."""
    for name in _POSITIVE:
        value = getattr(args, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer; got {value}")
    for (command, name), (low, why) in _AT_LEAST.items():
        value = getattr(args, name, None) if args.command == command else None
        if isinstance(value, int) and value < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low} ({why}); got {value}")
    for name in _INPUT_FILES:
        if getattr(args, name, None) is not None:
            _check_text_file(getattr(args, name), name)
    for name in _OUTPUT_FILES:
        if isinstance(getattr(args, name, None), Path):
            _check_output(getattr(args, name), name)
    _check_device(getattr(args, "device", None))
