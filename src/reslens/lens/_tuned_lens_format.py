"""The ``tuned-lens`` package's saved format (0.2.0: ``TunedLens.save``), read without unpickling objects.

A folder with ``config.json`` (``base_model_name_or_path``, ``d_model``, ``num_hidden_layers``,
``bias``, ``unembed_hash``, ``lens_type``) and ``params.pt``, the state dict of the layer translators
(``{i}.weight: [d_model, d_model]``, ``{i}.bias: [d_model]`` for ``i`` in ``0..num_hidden_layers-1``).
The config's key names copy HuggingFace's, which is why this module is the one place outside
``arch/`` that spells them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["read_folder", "unembed_hash"]


def unembed_hash(arch: Any) -> str:
    """The ``tuned-lens`` package's ``Unembed.unembedding_hash`` (``utils.tensor_hash``).

    SHA-256 of numpy's printed summary of the float32 ``W_U`` at one decimal: numpy prints only the
    corners of a large array (its first and last 3 rows and columns), so the hash reads 36 numbers at
    one decimal. A hash that differs says another model (a dtype change almost never moves one of those
    numbers across a rounding boundary); an equal one says little (a fine-tune keeps its base's
    corners). Cached per model while ``W_U`` is unchanged.
    """
    import numpy as np

    from reslens.arch import _digest

    w_u = arch.W_U

    def compute() -> str:
        # numpy's default print options, whatever the user set: the package hashed under them
        with np.printoptions(precision=1, threshold=1000, edgeitems=3, linewidth=75, suppress=False,
                             floatmode="maxprec", sign="-"):
            return hashlib.sha256(np.array_str(w_u.detach().cpu().float().numpy()).encode()).hexdigest()

    return _digest.cached(arch.model, "tuned-lens unembed_hash", [w_u], compute)


def read_folder(folder: Path, cls: type) -> Any:
    """A ``tuned-lens`` package folder (``config.json`` + ``params.pt``) as a :class:`TunedLens`."""
    config_file, params_file = folder / "config.json", folder / "params.pt"
    for f in (config_file, params_file):
        if not f.is_file():
            raise ValueError(
                f"{os.fspath(folder)!r} is a folder but not a tuned-lens lens: it has no {f.name} "
                "(a tuned-lens folder holds config.json and params.pt)"
            )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        n_layer, d_model = int(config["num_hidden_layers"]), int(config["d_model"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{os.fspath(config_file)!r} is not a tuned-lens config (needs num_hidden_layers and "
            f"d_model): {error}"
        ) from None
    if config.get("lens_type", "linear_tuned_lens") != "linear_tuned_lens":
        raise ValueError(
            f"{os.fspath(config_file)!r} has lens_type={config['lens_type']!r}; reslens reads "
            "'linear_tuned_lens'"
        )
    try:
        state = torch.load(params_file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for a bad file
        raise ValueError(
            f"cannot read {os.fspath(params_file)!r} as a tensors-only state dict: {error}"
        ) from None
    weight, bias = torch.zeros(n_layer, d_model, d_model), torch.zeros(n_layer, d_model)
    expected = {f"{i}.weight" for i in range(n_layer)} | (
        {f"{i}.bias" for i in range(n_layer)} if config.get("bias", True) else set()
    )
    if not isinstance(state, dict) or set(state) != expected:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{os.fspath(params_file)!r} holds {keys}; a tuned-lens state dict for "
            f"{n_layer} layers holds {sorted(expected)}"
        )
    for key, value in state.items():
        i, what = key.split(".")
        target = weight[int(i)] if what == "weight" else bias[int(i)]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{os.fspath(params_file)!r}: {key} has shape "
                f"{tuple(getattr(value, 'shape', ()))}; expected {tuple(target.shape)}"
            )
        target.copy_(value.float())
    made = {
        "source": f"tuned-lens package: {os.fspath(folder)}",
        "model": config.get("base_model_name_or_path"),
        "unembed_hash": config.get("unembed_hash"),
    }
    return cls(weight, bias, {k: v for k, v in made.items() if v})
