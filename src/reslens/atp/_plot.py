"""The figure of an :class:`~reslens.atp.AtPResult`: estimate vs exact effect, and the heads' estimates."""

from __future__ import annotations

from typing import Any

from reslens._figures import _pyplot

__all__ = ["plot_atp"]


def plot_atp(result: Any, *, ax: Any = None):
    """Estimate vs exact effect (left), and the heads' estimates, layer x head (right).

    Left: each checked component at (exact, estimate), flagged ones in red, the diagonal dashed.
    ``ax``: one axes (the scatter only) or two.
    """
    plt = _pyplot()
    heads = result.heads
    if ax is None:
        wide = heads is not None
        fig, axes = plt.subplots(1, 2 if wide else 1, figsize=(11 if wide else 5, 4.5))
        axes = list(axes) if heads is not None else [axes]
    else:
        axes = list(ax) if isinstance(ax, (list, tuple)) else [ax]
        fig = axes[0].figure
    left = axes[0]
    exact, est = result.checked_exact.numpy(), result.checked_estimate.numpy()
    colours = ["tab:red" if f else ("tab:blue" if t else "tab:grey")
               for f, t in zip(result.flags, result.checked_top.tolist())]
    left.scatter(exact, est, c=colours, s=18)
    if len(exact):
        lo, hi = min(exact.min(), est.min()), max(exact.max(), est.max())
        left.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    for label, x, y, flag in zip(result.labels, exact, est, result.flags):
        if flag:
            left.annotate(label, (x, y), fontsize=7)
    left.set_xlabel("exact patching effect")
    left.set_ylabel(f"estimate ({result.method})")
    left.set_title(f"Spearman {result.spearman():.3f} (blue: top, grey: sampled, red: flagged)", fontsize=9)
    if heads is not None and len(axes) > 1:
        right = axes[1]
        bound = float(heads.abs().max()) or 1.0
        image = right.imshow(heads.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
        right.set_xlabel("head")
        right.set_ylabel("layer")
        right.set_title(f"heads: estimated effect on {result.metric}", fontsize=9)
        fig.colorbar(image, ax=right)
    return fig
