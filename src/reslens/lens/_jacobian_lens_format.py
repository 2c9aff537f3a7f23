"""The Jacobian-lens artifact of TransformerLens and ``anthropics/jacobian-lens``, tensors only.

One ``torch.save`` file (TransformerLens 4.3 ``JacobianLens.save``, the reference package's writer): a dict
``{"J": {layer: [d_model, d_model]}, "n_prompts": int, "source_layers": [int], "d_model": int}``
(float16 matrices by default) and, from TransformerLens, ``"metadata"`` (model name and revision, fit
options, ``target_layer``). A reference *fit checkpoint* holds ``"jacobian_sum"`` (the sum over prompts)
and ``"n_done"`` instead; its mean is the lens. Both are read with ``torch.load(weights_only=True)``.

Layers: the artifact's layer ``s`` is the output of block ``s``, which is reslens's ``resid`` layer
``s + 1``; the last block's output (``resid n_layer``) is the identity and is not stored, and neither is
the embedding (``resid 0``), which this format never fits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["read_artifact"]


def _payload(path: Path) -> dict:
    shown = os.fspath(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError, EOFError... for a bad file
        raise ValueError(f"cannot read {shown!r} as a tensors-only torch file: {error}") from None
    if not isinstance(payload, dict) or not ({"J", "jacobian_sum"} & set(payload)):
        held = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{shown!r} holds {held}; a Jacobian-lens artifact holds 'J' (TransformerLens's or the reference "
            "package's saved lens) or 'jacobian_sum' (a reference fit checkpoint)"
        )
    return payload


def _matrices(payload: dict, shown: str) -> tuple[dict[int, torch.Tensor], int]:
    """``({artifact layer: J float32}, n_prompts)`` of an artifact or a fit checkpoint."""
    checkpoint = "J" not in payload
    raw = payload["jacobian_sum" if checkpoint else "J"]
    n_prompts = int(payload.get("n_done", payload.get("n_prompts", 0)) if checkpoint
                    else payload.get("n_prompts", 0))
    if checkpoint and n_prompts <= 0:
        raise ValueError(f"{shown!r} is a fit checkpoint of n_done={n_prompts} prompts; its mean needs "
                         "n_done > 0")
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{shown!r}: its Jacobians are {type(raw).__name__} {raw!r:.60}; expected a "
                         "non-empty dict {layer: [d_model, d_model] tensor}")
    out = {}
    for key, value in raw.items():
        ok = isinstance(value, torch.Tensor) and value.ndim == 2 and value.dtype.is_floating_point
        if not ok or value.shape[0] != value.shape[1] or not isinstance(key, int) or isinstance(key, bool):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{shown!r}: layer {key!r} holds {got}; expected an int layer and a square "
                             "floating-point matrix [d_model, d_model]")
        out[key] = value.float() / n_prompts if checkpoint else value.float()
    widths = {m.shape[0] for m in out.values()}
    widths |= {int(payload["d_model"])} if "d_model" in payload else set()
    if len(widths) != 1:
        raise ValueError(f"{shown!r}: its matrices and d_model disagree on the width ({sorted(widths)})")
    return out, n_prompts


def _json_able(metadata: Any) -> dict[str, Any]:
    """The artifact's metadata entries that JSON can hold (a reslens lens keeps its config as JSON)."""
    if not isinstance(metadata, dict):
        return {}
    kept = {}
    for key, value in metadata.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        kept[str(key)] = value
    return kept


def read_artifact(path: Path, cls: type, arch: Any = None) -> Any:
    """A Jacobian-lens ``.pt`` file as ``cls`` (a :class:`~reslens.lens.JacobianLens`), checked on ``arch``.

    Without ``arch`` the model's depth is the artifact's ``target_layer + 1`` where its metadata says,
    else the deepest fitted block ``+ 2`` (a full fit's convention).
    """
    shown = os.fspath(path)
    payload = _payload(path)
    matrices, n_prompts = _matrices(payload, shown)
    metadata = _json_able(payload.get("metadata"))
    estimator = metadata.get("estimator", "jacobian_lens")
    if estimator != "jacobian_lens":
        raise ValueError(f"{shown!r} was fitted by the estimator {estimator!r}; reslens reads "
                         "'jacobian_lens'")
    d_model = next(iter(matrices.values())).shape[0]
    target = metadata.get("target_layer", payload.get("target_layer"))
    if arch is not None:
        n_layer = arch.n_layer
        if d_model != arch.d_model:
            raise ValueError(f"{shown!r} was fitted for d_model={d_model}; the model has "
                             f"d_model={arch.d_model}: this lens belongs to another model")
    else:
        n_layer = int(target) + 1 if target is not None else max(matrices) + 2
    outside = sorted(s for s in matrices if not 0 <= s <= n_layer - 2)
    if outside:
        raise ValueError(f"{shown!r} has Jacobians of block outputs {outside}, outside 0..{n_layer - 2} of a "
                         f"{n_layer}-layer model: this lens belongs to another model")
    if target is not None and int(target) != n_layer - 1:
        raise ValueError(f"{shown!r} maps to the output of block {target}; the {n_layer}-layer model's "
                         f"last block is {n_layer - 1}: this lens belongs to another model (or targets "
                         "another layer)")
    weight = torch.zeros(n_layer, d_model, d_model)
    for s, matrix in matrices.items():
        weight[s + 1] = matrix  # the output of block s is resid s + 1
    config = {"source": f"Jacobian-lens artifact: {shown}", "model": metadata.get("model_name"),
              "n_prompts": n_prompts, "layers": sorted(s + 1 for s in matrices), "reference": metadata}
    config = {k: v for k, v in config.items() if v not in (None, {})}
    return cls(weight, torch.zeros(n_layer, d_model), config)
