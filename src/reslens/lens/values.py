"""A lens is a value: how a layer's residual is translated before the model's own final norm and unembedding.

- :class:`LogitLens` (nostalgebraist 2020): no translation, ``W_U norm(h_l)``.
- :class:`TunedLens` (Belrose et al. 2023): one affine translator per layer in the residual form
  of the ``tuned-lens`` package, ``W_U norm(h_l + A_l h_l + b_l)`` (``A_l = 0``, ``b_l = 0`` is the
  logit lens, the initialisation).
- :class:`LinearShortcut` (Din et al. 2023): a least-squares map to the last residual,
  ``W_U norm(A_l h_l + b_l)``.
- :class:`JacobianLens` (Gurnee et al. 2026): the average Jacobian of the last residual with respect
  to layer ``l``'s, ``W_U norm(J_l h_l)``.
- :class:`~reslens.lens.Patchscope` (Ghandeharioun et al. 2024, in :mod:`reslens.lens.patchscopes`): the
  model's own final residual of a target prompt into which ``h_l`` is patched.

Every lens reads ``resid`` layers ``0..n_layer``; at the last layer, ``n_layer``, each one is the
identity (the residual is returned as it is), so its last row is exactly the model's logits.
Learned lenses save to one safetensors file (their config as JSON in its metadata) and
:func:`load_lens` also reads the ``tuned-lens`` package's own format (a folder with ``config.json``
and ``params.pt``) and the Jacobian-lens artifacts of TransformerLens and ``anthropics/jacobian-lens``
(one ``.pt`` file), without unpickling anything but tensors.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from reslens._inputs import caller_stacklevel
from reslens._saving import read_safetensors, write_safetensors
from reslens._text import html_table

__all__ = ["Lens", "LogitLens", "AffineLens", "TunedLens", "LinearShortcut", "JacobianLens", "load_lens",
           "as_lens"]


class Lens:
    """What every lens has: a ``kind``, a readable ``name`` and ``translate(layer, h)``."""

    kind: ClassVar[str] = "logit"
    name: ClassVar[str] = "logit lens"
    #: how the lens reads ``resid`` layer ``l`` (below the last)
    formula: ClassVar[str] = "W_U norm(h_l)"

    def translate(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The residual ``h: [..., d_model]`` at ``resid`` layer ``layer`` as the final norm reads it."""
        return h

    def translate_rows(self, items: Sequence[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """:meth:`translate` of each ``(layer, h)`` of ``items``, in order: one call for all of a lens's rows.

        The default translates one item at a time; a lens that runs the model (a patchscope) overrides
        it to run every row in one batched forward.
        """
        return [self.translate(layer, h) for layer, h in items]

    def check(self, arch: Any) -> None:
        """Refuse a model this lens was not made for (a ``ValueError`` saying what differs)."""

    @property
    def fingerprint(self) -> str:
        """What this lens is, as a string equal for equal lenses (data-parallel ranks compare it)."""
        return self.kind

    def _rows(self) -> list[tuple[str, Any]]:
        return [("kind", self.kind), ("reads resid layer l as", self.formula)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def _repr_html_(self) -> str:
        return html_table(f"{self!r}: the {self.name}", (), self._rows())


@dataclass(frozen=True)
class LogitLens(Lens):
    """The logit lens: each layer's residual read as if it were the last one."""


@dataclass(frozen=True, repr=False, eq=False)
class AffineLens(Lens):
    """One affine map per ``resid`` layer ``0..n_layer-1``; ``resid n_layer`` is read as it is.

    - ``weight: [n_layer, d_model, d_model]`` (``[out, in]``, as ``nn.Linear``), ``bias: [n_layer, d_model]``
    - ``config``: JSON-able facts about how it was made (model, tokens, recipe), kept when saved;
      ``config["model_fingerprint"]``: the :attr:`~reslens.arch.Arch.fingerprint` of the model it was
      fitted on, checked wherever the lens is used (:meth:`check`)
    """

    weight: torch.Tensor
    bias: torch.Tensor
    config: dict[str, Any] = field(default_factory=dict, compare=False)
    kind: ClassVar[str] = "affine"
    name: ClassVar[str] = "affine lens"
    #: whether the map is added to the residual (h + A h + b, the tuned lens) or replaces it (A h + b)
    residual: ClassVar[bool] = False
    formula: ClassVar[str] = "W_U norm(A_l h_l + b_l)"

    def __post_init__(self) -> None:
        for name in ("weight", "bias"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating-point tensor; got {type(t).__name__}")
        w, b = self.weight, self.bias
        if w.ndim != 3 or w.shape[1] != w.shape[2] or tuple(b.shape) != (w.shape[0], w.shape[1]):
            raise ValueError(
                f"weight must be [n_layer, d_model, d_model] and bias [n_layer, d_model]; got "
                f"{tuple(w.shape)} and {tuple(b.shape)}"
            )
        if w.shape[0] < 1:
            raise ValueError("weight holds no layer; a learned lens needs at least one translator")

    @property
    def n_layer(self) -> int:
        return self.weight.shape[0]

    @property
    def d_model(self) -> int:
        return self.weight.shape[1]

    def translate(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        if layer == self.n_layer:
            return h  # the last layer: exactly the model's own logits
        if not 0 <= layer < self.n_layer:
            raise ValueError(f"layer={layer} is outside this {self.name}'s resid layers 0..{self.n_layer}")
        w = self.weight[layer].to(device=h.device, dtype=h.dtype)
        b = self.bias[layer].to(device=h.device, dtype=h.dtype)
        mapped = torch.nn.functional.linear(h, w, b)
        return h + mapped if self.residual else mapped

    @property
    def caveats(self) -> list[str]:
        """What a reader should know from how this lens was trained (``config``); warned wherever it is used.

        Too few steps to tell whether the loss settled (under 8); a loss that rose (the last step's mean
        over layers more than 10% above the first's: each step's loss is taken before it trains on its
        windows, so training made the lens worse, e.g. a step too large for the model); a loss still
        falling fast at the end (the mean over layers fell more than 10% between the last two quarters of
        the steps); a held-out KL (``config["held_out"]``, from ``train_tuned_lens(held_out=...)``) worse
        than the logit lens's at some layer.
        """
        out = []
        history = [sum(step) / len(step) for step in self.config.get("loss", []) if step]
        if history and len(history) < 8:
            out.append(f"it trained {len(history)} steps, too few to tell whether its loss had settled")
        elif history:
            quarter = len(history) // 4
            before = sum(history[-2 * quarter : -quarter]) / quarter
            last = sum(history[-quarter:]) / quarter
            if before > 0 and (before - last) / before > 0.1:
                out.append(f"its training loss was still falling fast when it stopped (mean KL {before:.3g} "
                           f"-> {last:.3g} nats over the last two quarters of its steps): train it longer")
        if len(history) > 1 and history[-1] > 1.1 * history[0]:
            out.append(f"its training loss rose (mean KL {history[0]:.3g} -> {history[-1]:.3g} nats from its "
                       "first step to its last): training made it worse (a step too large for this model?); "
                       "score it on held-out text (held_out=) before reading it")
        held = self.config.get("held_out")
        if held:
            worse = [layer for layer, (ours, logit) in enumerate(zip(held["kl_lens"], held["kl_logit"]))
                     if ours > logit + 1e-6]
            if worse:
                out.append(f"its held-out KL is worse than the logit lens's at layers {worse}")
        return out

    def check(self, arch: Any) -> None:
        """Refuse another shape, and another model than the one this lens was fitted on (when it says).

        A lens fitted by reslens carries its model's :attr:`~reslens.arch.Arch.fingerprint` in
        ``config["model_fingerprint"]``; a ``tuned-lens`` package folder, the package's hash of the
        unembedding (``config["unembed_hash"]``). A lens built by hand without either is taken as it is.
        """
        if (self.n_layer, self.d_model) != (arch.n_layer, arch.d_model):
            raise ValueError(
                f"this {self.name} was made for {self.n_layer} layers of d_model {self.d_model}; "
                f"the model has {arch.n_layer} layers of d_model {arch.d_model}"
            )
        for caveat in self.caveats:
            warnings.warn(f"this {self.name}: {caveat}", UserWarning, stacklevel=caller_stacklevel())
        made, package = self.config.get("model_fingerprint"), self.config.get("unembed_hash")
        if made:
            if made != arch.fingerprint:
                self._refuse(arch, f"fingerprint {made[:12]}", f"fingerprint {arch.fingerprint[:12]}")
        elif package:
            from reslens.lens._tuned_lens_format import unembed_hash

            ours = unembed_hash(arch)
            if ours != package:
                what = "the tuned-lens package's hash of the unembedding"
                self._refuse(arch, f"{what} {package[:12]}", f"{ours[:12]}")

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the kind and the translators' bytes (``weight``, ``bias``)."""
        from reslens.arch._digest import digest

        return digest([self.weight, self.bias], prefix=f"{self.kind}|")

    def _refuse(self, arch: Any, made: str, used: str) -> None:
        source = self.config.get("source")
        raise ValueError(
            f"this {self.name}{f' ({source})' if source else ''} was fitted on "
            f"{self.config.get('model') or 'another model'} ({made}); it is used with "
            f"{arch.checkpoint_name or type(arch.model).__name__} ({used}): a learned lens reads only the "
            "model it was fitted on. Fit one on this model (reslens.lenses.fit_shortcut, "
            "train_tuned_lens), or load this lens's model"
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (atomically): ``weight``, ``bias`` and the config as JSON metadata."""
        meta = {"format": f"reslens.{type(self).__name__}/1", "config": json.dumps(self.config)}
        write_safetensors(path, {"weight": self.weight, "bias": self.bias}, meta)

    def _rows(self) -> list[tuple[str, Any]]:
        made = [(k, v if isinstance(v, (int, float)) else str(v)[:80]) for k, v in self.config.items()]
        return [*super()._rows(), ("n_layer", self.n_layer), ("d_model", self.d_model), *made]

    def __repr__(self) -> str:
        made = ", ".join(f"{k}={v}" for k, v in self.config.items() if k in ("model", "n_tokens", "steps"))
        return (
            f"{type(self).__name__}(n_layer={self.n_layer}, d_model={self.d_model}"
            + (f", {made}" if made else "")
            + ")"
        )


@dataclass(frozen=True, repr=False, eq=False)
class TunedLens(AffineLens):
    """The tuned lens (Belrose et al. 2023): ``W_U norm(h + A_l h + b_l)``, as the ``tuned-lens`` package."""

    kind: ClassVar[str] = "tuned"
    name: ClassVar[str] = "tuned lens"
    residual: ClassVar[bool] = True
    formula: ClassVar[str] = "W_U norm(h_l + A_l h_l + b_l)"

    @classmethod
    def identity(cls, n_layer: int, d_model: int, config: dict[str, Any] | None = None) -> TunedLens:
        """The initialisation: every translator zero, i.e. the logit lens."""
        return cls(torch.zeros(n_layer, d_model, d_model), torch.zeros(n_layer, d_model), dict(config or {}))


@dataclass(frozen=True, repr=False, eq=False)
class LinearShortcut(AffineLens):
    """The linear shortcut (Din et al. 2023): ``W_U norm(A_l h + b_l)``, fitted to the last residual."""

    kind: ClassVar[str] = "shortcut"
    name: ClassVar[str] = "linear shortcut"


@dataclass(frozen=True, repr=False, eq=False)
class JacobianLens(AffineLens):
    """The Jacobian lens (Gurnee et al. 2026): ``W_U norm(J_l h_l)``, ``J_l = weight[l]`` (``bias`` is zero).

    ``J_l``: the average Jacobian of the last residual with respect to ``resid`` layer ``l``
    (:func:`~reslens.lens.fit_jacobian_lens` says exactly which average). ``config["layers"]``, when
    present, lists the ``resid`` layers it holds a Jacobian for: a reference artifact
    (:func:`~reslens.lens.load_jacobian_lens`) fits the blocks' outputs only, so it has none for
    ``resid 0`` (the embedding), and reading that layer is refused rather than read as zero.
    """

    kind: ClassVar[str] = "jacobian"
    name: ClassVar[str] = "Jacobian lens"
    formula: ClassVar[str] = "W_U norm(J_l h_l)"

    def translate(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        held = self.config.get("layers")
        if held is not None and layer != self.n_layer and 0 <= layer < self.n_layer and layer not in held:
            raise ValueError(
                f"layer={layer}: this Jacobian lens holds no Jacobian for resid layer {layer} (it holds "
                f"resid layers {held[0]}..{held[-1]} and the output; a reference artifact fits the blocks' "
                f"outputs, not the embedding); read it with layers=range({held[0]}, {self.n_layer + 1})"
            )
        return super().translate(layer, h)


_CLASSES = {cls.__name__: cls for cls in (TunedLens, LinearShortcut, JacobianLens)}


def as_lens(lens: Any) -> Lens:
    """``None`` or ``"logit"`` -> :class:`LogitLens`; a :class:`Lens` as it is; anything else refused."""
    if lens is None or lens == "logit":
        return LogitLens()
    if isinstance(lens, Lens):
        return lens
    raise TypeError(
        "lens must be None (the logit lens), 'logit', or a reslens lens (TunedLens, LinearShortcut, "
        f"JacobianLens; see reslens.lens.load_lens); got {type(lens).__name__}"
    )


def load_lens(path: str | os.PathLike, *, model: Any = None) -> AffineLens:
    """Read a learned lens: a reslens file, a ``tuned-lens`` folder, or a Jacobian-lens ``.pt`` artifact.

    A reslens file is what :meth:`AffineLens.save` writes. The ``tuned-lens`` format is a folder with
    ``config.json`` and ``params.pt`` (a state dict ``{i}.weight``, ``{i}.bias``); a Jacobian-lens
    artifact is the file TransformerLens or ``anthropics/jacobian-lens`` saves
    (:func:`~reslens.lens.load_jacobian_lens`). Both are read with ``torch.load(weights_only=True)``:
    only tensors are unpickled, never code (:mod:`reslens.lens._tuned_lens_format`,
    :mod:`reslens.lens._jacobian_lens_format`). With ``model=``, the
    lens is checked against it as every use checks it (:meth:`AffineLens.check`: layers, width, and
    the model it was fitted on: the fingerprint a reslens file records, or a ``tuned-lens`` folder's
    hash of the unembedding); a ``ValueError`` names both models.
    """
    shown = os.fspath(path)
    p = Path(shown).expanduser()
    arch = None
    if model is not None:
        from reslens.arch import adapter

        arch = adapter(model)
    if p.is_dir():
        from reslens.lens._tuned_lens_format import read_folder

        lens = read_folder(p, TunedLens)
    elif zipfile.is_zipfile(p):  # torch.save's format: a Jacobian-lens artifact
        from reslens.lens._jacobian_lens_format import read_artifact

        lens = read_artifact(p, JacobianLens, arch)
    else:
        tensors, meta = read_safetensors(p, None, what="reslens lens")
        fmt = meta.get("format", "")
        cls = _CLASSES.get(fmt.removeprefix("reslens.").removesuffix("/1"))
        if cls is None or not fmt.endswith("/1"):
            raise ValueError(
                f"{shown!r} is not a reslens lens file (its format is {fmt!r}; expected one of "
                f"{', '.join(f'reslens.{n}/1' for n in _CLASSES)})"
            )
        if set(tensors) != {"weight", "bias"}:
            raise ValueError(f"{shown!r} holds {sorted(tensors)}; a lens file holds 'weight' and 'bias'")
        try:
            lens = cls(tensors["weight"], tensors["bias"], json.loads(meta.get("config", "{}")))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{shown!r} holds an inconsistent {cls.__name__}: {error}") from None
    if arch is not None:
        try:
            lens.check(arch)
        except ValueError as error:
            raise ValueError(f"{shown}: {error}") from None
    return lens
