"""Text tables and matplotlib figures for reslens results (matplotlib is the ``plot`` extra)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reslens.lens import LensResult
    from reslens.lens import LensStats

__all__ = ["lens_table", "plot_lens", "plot_lens_stats", "plot_pca_experiment", "LENS_PLOT_METRICS"]

LENS_PLOT_METRICS = ("prob", "rank", "entropy", "kl")


def _cell_text(token: str, width: int) -> str:
    """A token as it fits in a table cell: newlines escaped, leading space dropped, cut to width."""
    text = token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    text = text[1:] if text.startswith(" ") and len(text) > 1 else text
    return text if len(text) <= width else text[: width - 1] + "…"


def _check_seq(result: Any, seq: int) -> None:
    n = result.input_ids.shape[0]
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < n:
        raise ValueError(f"seq={seq!r} is out of range for a batch of {n} (0..{n - 1})")


def lens_table(result: LensResult, seq: int = 0, *, width: int = 100, cell: int = 9) -> str:
    """The classic logit-lens table (see :meth:`LensResult.table`)."""
    _check_seq(result, seq)
    if cell < 3:
        raise ValueError(f"cell must be at least 3 characters; got {cell}")
    real = result.attention_mask[seq].nonzero().flatten().tolist()
    labels = ["next"] + [f"L{label}" if label.isdigit() else label.replace("resid_mid ", "mid ") for label in result.row_labels][::-1] + ["input"]
    label_w = max(len(label) for label in labels) + 1
    per_window = max(1, (width - label_w) // cell)
    top1 = result.top_ids[..., 0]  # [R, B, P]
    blocks = []
    for start in range(0, len(real), per_window):
        cols = real[start : start + per_window]
        lines = [f"{'':<{label_w}}" + "".join(f"{f'[{p}]':<{cell}}" for p in cols)]
        nxt = [result.token(int(result.targets[seq, p])) if result.targets is not None else "" for p in cols]
        lines.append(f"{'next':<{label_w}}" + "".join(f"{_cell_text(t, cell - 1):<{cell}}" for t in nxt))
        lines.append("-" * (label_w + cell * len(cols)))
        for r in reversed(range(len(result.site_of_row))):
            label = labels[len(result.site_of_row) - r]
            cells = [_cell_text(result.token(int(top1[r, seq, p])), cell - 1) for p in cols]
            lines.append(f"{label:<{label_w}}" + "".join(f"{c:<{cell}}" for c in cells))
        lines.append("-" * (label_w + cell * len(cols)))
        ins = [result.token(int(result.input_ids[seq, p])) for p in cols]
        lines.append(f"{'input':<{label_w}}" + "".join(f"{_cell_text(t, cell - 1):<{cell}}" for t in ins))
        blocks.append("\n".join(line.rstrip() for line in lines))
    return "\n\n".join(blocks)


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - the plot extra is optional
        raise ImportError("plotting needs matplotlib: pip install 'reslens[plot]'") from error
    return plt


def plot_lens(result: LensResult, metric: str = "prob", seq: int = 0, *, ax=None, max_positions: int = 40):
    """Layers x positions heatmap of ``metric`` with each cell's top-1 token written in it.

    ``prob``: the layer's top-1 probability; ``rank``: rank of the actual next token (log
    colour scale); ``entropy``: nats; ``kl``: KL(final || layer) in nats. The last
    ``max_positions`` real positions are shown. Returns the matplotlib figure.
    """
    import numpy as np

    if metric not in LENS_PLOT_METRICS:
        raise ValueError(f"metric must be one of {', '.join(LENS_PLOT_METRICS)}; got {metric!r}")
    _check_seq(result, seq)
    if metric == "rank" and result.target_rank is None:
        raise ValueError("metric='rank' needs targets; this lens ran with targets=None")
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    real = result.attention_mask[seq].nonzero().flatten()[-max_positions:]
    values = {
        "prob": result.top_probs[..., 0],
        "rank": result.target_rank.float() + 1 if result.target_rank is not None else None,
        "entropy": result.entropy,
        "kl": result.kl_final_layer,
    }[metric][:, seq, real].cpu().numpy()  # [R, P']
    label = {
        "prob": "top-1 probability",
        "rank": "rank of the actual next token + 1",
        "entropy": "entropy (nats)",
        "kl": "KL(final ‖ layer) (nats)",
    }[metric]
    top1 = result.top_ids[:, seq, real, 0]
    n_rows, n_pos = values.shape
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(6, 0.85 * n_pos + 1.5), max(3, 0.42 * n_rows + 1.6)))
    else:
        fig = ax.figure
    cmap = "Blues" if metric == "prob" else "Blues_r" if metric == "rank" else "viridis_r"
    norm = LogNorm(vmin=1, vmax=max(2.0, float(np.nanmax(values)))) if metric == "rank" else None
    scale = {"rank": dict(norm=norm), "prob": dict(vmin=0, vmax=1)}.get(metric, dict(vmin=0))
    image = ax.imshow(values, aspect="auto", origin="lower", cmap=cmap, **scale)
    for r in range(n_rows):
        for c in range(n_pos):
            rgba = image.cmap(image.norm(values[r, c]))
            dark = (0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]) < 0.5
            ax.text(c, r, _cell_text(result.token(int(top1[r, c])), 8), ha="center", va="center",
                    fontsize=7, color="white" if dark else "black")
    ax.set_yticks(range(n_rows), [f"{lab}" for lab in result.row_labels])
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_pos), [_cell_text(result.token(int(i)), 10) for i in result.input_ids[seq, real].tolist()],
                  rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("input token")
    if result.targets is not None:
        top = ax.secondary_xaxis("top")
        top.set_xticks(range(n_pos), [_cell_text(result.token(int(i)), 10) for i in result.targets[seq, real].tolist()],
                       rotation=60, ha="left", fontsize=8)
        top.set_xlabel("actual next token")
    fig.colorbar(image, ax=ax, label=label, fraction=0.03, pad=0.02)
    ax.set_title(f"logit lens: {label} (text = top-1 token)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_lens_stats(stats: LensStats, *, ax=None):
    """Per-layer curves of a data set's lens statistics: agreement with the final top-1,
    p(final top-1 token), input-token top-1 fraction, and mean KL(final || layer)."""
    plt = _pyplot()
    if ax is None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    else:
        fig, axes = ax.figure, (ax, ax.twinx())
    layers = list(stats.layers)
    left, right = axes
    left.plot(layers, stats.top1_agreement.numpy(), "o-", label="top-1 = final top-1")
    left.plot(layers, stats.final_token_prob.numpy(), "s-", label="p(final top-1 token)")
    left.plot(layers, stats.input_token_top1.numpy(), "^-", label="top-1 = input token")
    left.set_xlabel("layer")
    left.set_ylim(0, 1)
    left.legend(fontsize=8)
    left.set_title(f"{stats.n_positions} positions", fontsize=10)
    right.plot(layers, stats.mean["kl_final_layer"].numpy(), "o-", color="tab:red", label="KL(final ‖ layer)")
    right.plot(layers, stats.mean["entropy"].numpy(), "s-", color="tab:purple", label="entropy")
    right.set_xlabel("layer")
    right.set_ylabel("nats")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig



def plot_pca_experiment(experiment, *, ax=None, conditions=("baseline", "no_embedding", "unit_norm")):
    """Explained-variance ratio per principal component: mean line with a 10-90% band per condition."""
    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4))
    else:
        fig = ax.figure
    for name in conditions:
        evr = experiment.results[name]["explained_variance_ratio"]  # [n, K]
        k = range(1, evr.shape[1] + 1)
        low, high = evr.quantile(0.1, dim=0).numpy(), evr.quantile(0.9, dim=0).numpy()
        line, = ax.plot(k, evr.mean(0).numpy(), "o-", label=f"{name} (PC1 {evr[:, 0].mean():.0%})")
        ax.fill_between(k, low, high, color=line.get_color(), alpha=0.2)
    ax.set_xticks(list(k))
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    ax.set_ylim(0, 1)
    ax.set_title(f"PCA across layers of one prediction's residuals ({experiment.n} predictions)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
