"""The lens wing: each layer's residual read as the model's output, by any lens, on a text or a data set.

Imports run one way inside the package, bottom to top:

- :mod:`~reslens.lens._metrics`: the per-row reductions every lens result shares (no other wing module)
- :mod:`~reslens.lens._plot`: the figures and the text table of the results (no other wing module; read by
  :mod:`reslens.plot` too)
- :mod:`~reslens.lens.values`: a lens as a value — :class:`LogitLens`, :class:`TunedLens` (Belrose et
  al. 2023), :class:`LinearShortcut` (Din et al. 2023), :class:`JacobianLens` (Gurnee et al. 2026);
  :func:`load_lens` (reslens files, the ``tuned-lens`` package's folders and the Jacobian-lens artifacts
  of TransformerLens, through :mod:`~reslens.lens._tuned_lens_format` and
  :mod:`~reslens.lens._jacobian_lens_format`)
- :mod:`~reslens.lens.patchscopes`: :class:`Patchscope` (Ghandeharioun et al. 2024), a lens that runs the
  model on a target prompt (every row in one batched forward, :mod:`~reslens.lens._scope_forward`), and
  :func:`patchscope` -> :class:`PatchscopeResult` (one position, every source × target layer cell);
  :data:`PROMPTS` (the token-identity prompt, attribute prompts)
- :mod:`~reslens.lens.result`: one text — :func:`logit_lens`, :func:`lens_of` -> :class:`LensResult`
- :mod:`~reslens.lens.change`: why the lens changed between two rows — :func:`lens_change`,
  :func:`lens_changes`, :func:`lens_change_of` -> :class:`LensChange` (the change of a logit split into
  what the blocks in between wrote, on :mod:`reslens._dla`, which direct logit attribution shares)
- :mod:`~reslens.lens.stats`: a data set — :func:`lens_stats` -> :class:`LensStats`
- :mod:`~reslens.lens.shortcut`, :mod:`~reslens.lens.tuned`, :mod:`~reslens.lens.jacobian`: fitting the
  learned lenses on a corpus (and :func:`load_jacobian_lens`, the reference artifacts)
- :mod:`~reslens.lens.compare`: :func:`compare_lenses` -> :class:`LensComparison` on held-out text

Every public name is reachable from here (``from reslens.lens import logit_lens, lens_stats, TunedLens``)
and loads on first use, so importing the package is cheap. The wing's former module names
``reslens.lens_stats`` and ``reslens.lenses`` are this package under another name (registered below),
so ``from reslens.lens_stats import lens_stats`` and ``from reslens.lenses import fit_shortcut`` keep
working without a module of their own.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

#: public name -> the wing module that defines it (imported on first access)
_LAZY = {
    **dict.fromkeys(("LensResult", "lens_of", "logit_lens", "METRICS"), "result"),
    **dict.fromkeys(("LensChange", "lens_change", "lens_changes", "lens_change_of", "CHANGE_KINDS"),
                    "change"),
    **dict.fromkeys(("lens_table", "plot_lens_change"), "_plot"),
    **dict.fromkeys(("LensStats", "MetricStats", "lens_stats", "QUANTILES"), "stats"),
    **dict.fromkeys(
        ("Lens", "LogitLens", "AffineLens", "TunedLens", "LinearShortcut", "JacobianLens", "as_lens",
         "load_lens"), "values"
    ),
    **dict.fromkeys(("fit_shortcut", "ShortcutMoments"), "shortcut"),
    "train_tuned_lens": "tuned",
    **dict.fromkeys(("Patchscope", "PatchscopeResult", "patchscope", "PROMPTS"), "patchscopes"),
    **dict.fromkeys(("fit_jacobian_lens", "load_jacobian_lens", "JacobianSums"), "jacobian"),
    **dict.fromkeys(("compare_lenses", "LensComparison"), "compare"),
}

__all__ = sorted(_LAZY)

#: the wing's former module names, now this package
for _alias in ("lens_stats", "lenses"):
    sys.modules.setdefault(f"reslens.{_alias}", sys.modules[__name__])
    setattr(sys.modules["reslens"], _alias, sys.modules[__name__])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"reslens.lens.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reslens.lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
