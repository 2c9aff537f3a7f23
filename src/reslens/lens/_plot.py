"""The lens figures (the layers x positions grid of one sequence, per-layer curves) and the text table.

:func:`lens_table` is the classic logit-lens table as text. In the grid a long input is split into
stacked panels of equal widths (at most ``per_row`` positions) that share one colour scale, so the figure
keeps a page's proportions and its cell text stays legible when the figure is shrunk; :func:`plot_lenses`
puts several lenses of one text in one figure, one unwrapped panel each, on one colour scale.
"""

from __future__ import annotations

from typing import Any

from reslens._checks import check_int
from reslens._figures import _check_seq, _figure, _pyplot, _text_colour
from reslens._text import blue
from reslens._text import cell_text as _cell_text

__all__ = ["LENS_PLOT_METRICS", "lens_table", "lens_html", "plot_lens", "plot_lenses", "plot_lens_stats",
           "plot_lens_comparison", "plot_lens_change"]

LENS_PLOT_METRICS = ("prob", "rank", "entropy", "kl")
_LABELS = {
    "prob": "top-1 probability",
    "rank": "rank of the actual next token + 1",
    "entropy": "entropy (nats)",
    "kl": "KL(final ‖ layer) (nats)",
}


def _values(result: Any, metric: str, seq: int, real: Any):
    """``[R, P']`` numpy values of ``metric`` at the positions ``real`` of sequence ``seq``."""
    chosen = {
        "prob": lambda: result.top_probs[..., 0],
        "rank": lambda: result.target_rank.float() + 1,
        "entropy": lambda: result.entropy,
        "kl": lambda: result.kl_final_layer,
    }[metric]()
    return chosen[:, seq, real].cpu().numpy()


def _panel(ax: Any, result: Any, values: Any, seq: int, cols: Any, scale: dict, cmap: str) -> Any:
    """One panel: the cells of positions ``cols`` (indices into ``values``' columns), ticks both sides."""
    import numpy as np

    image = ax.imshow(values, aspect="auto", origin="lower", cmap=cmap, **scale)
    top1 = result.top_ids[:, seq, cols, 0].cpu()
    n_rows, n_pos = values.shape
    for r in range(n_rows):
        for c in range(n_pos):
            token = int(top1[r, c])
            text = _cell_text(result.token(token), 8) if token >= 0 else "NaN"
            colour = _text_colour(image, values[r, c]) if np.isfinite(values[r, c]) else "black"
            ax.text(c, r, text, ha="center", va="center", fontsize=7, color=colour)
    labels = list(result.row_labels)  # integer layers; the embedding and the output said in words
    if result.site_of_row[0] == "resid" and result.layer_of_row[0] == 0:
        labels[0] = "0 embedding"
    labels[-1] = f"{labels[-1]} output"
    ax.set_yticks(range(n_rows), labels)
    ax.set_ylabel("layer")
    inputs = [_cell_text(result.token(int(i)), 10) for i in result.input_ids[seq, cols].tolist()]
    ax.set_xticks(range(n_pos), inputs, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("input token")
    if result.targets is not None:
        top = ax.secondary_xaxis("top")
        targets = [_cell_text(result.token(int(i)), 10) for i in result.targets[seq, cols].tolist()]
        top.set_xticks(range(n_pos), targets, rotation=60, ha="left", fontsize=8)
        top.set_xlabel("actual next token")
    return image


def _embedding_row(result: Any) -> int | None:
    """The lens row that reads the embedding (``resid`` at layer 0), or None."""
    rows = zip(result.site_of_row, result.layer_of_row)
    return next((r for r, (site, layer) in enumerate(rows) if site == "resid" and layer == 0), None)


def _scale(metric: str, values: list, embedding: list) -> tuple[dict, str, str, str]:
    """One colour scale over every array in ``values``: ``(norm or limits, colour map, bar label, extend)``.

    KL's scale is set by the rows after the embedding: the embedding row (``embedding[i]`` of
    ``values[i]``; 100+ nats on a trained model, against a few elsewhere) would otherwise make every
    other row one colour. Where it reaches beyond them, the scale is clipped at their largest value and
    the bar's label says so.
    """
    import numpy as np
    from matplotlib.colors import LogNorm

    finite = [v[np.isfinite(v)] for v in values]
    vmax = max((float(f.max()) for f in finite if f.size), default=2.0)
    label, extend = _LABELS[metric], "neither"
    if metric == "kl":
        rest = [np.delete(v, e, axis=0) if e is not None else v for v, e in zip(values, embedding)]
        rest = [r[np.isfinite(r)] for r in rest]
        top = max((float(r.max()) for r in rest if r.size), default=vmax)
        if vmax > 1.05 * top and top > 0:
            label = f"KL(final ‖ layer), nats; clipped at {top:.3g} (embedding row up to {vmax:.3g})"
            vmax, extend = top, "max"
    scale = {"rank": dict(norm=LogNorm(vmin=1, vmax=max(2.0, vmax))), "prob": dict(vmin=0, vmax=1)}.get(
        metric, dict(vmin=0, vmax=max(vmax, 1e-6)))
    cmap = "Blues" if metric == "prob" else "Blues_r" if metric == "rank" else "viridis_r"
    return scale, cmap, label, extend


def _check_plot(result: Any, metric: str, seq: int, max_positions: Any) -> None:
    if metric not in LENS_PLOT_METRICS:
        raise ValueError(f"metric must be one of {', '.join(LENS_PLOT_METRICS)}; got {metric!r}")
    _check_seq(result, seq)
    check_int(max_positions, "max_positions", low=1)
    if metric == "rank" and result.target_rank is None:
        raise ValueError("metric='rank' needs targets; this lens ran with targets=None")


def plot_lens(result, metric: str = "prob", seq: int = 0, *, ax=None, max_positions: int = 40,
              per_row: int = 24):
    """Layers x positions heatmap of a :class:`~reslens.lens.LensResult` with each cell's top-1 token.

    ``prob``: the layer's top-1 probability; ``rank``: rank of the actual next token (log
    colour scale); ``entropy``: nats; ``kl``: KL(final || layer) in nats. The last
    ``max_positions`` real positions are shown, at most ``per_row`` per panel: a longer input is
    wrapped into stacked panels of equal widths sharing one colour scale (with ``ax=``, everything
    goes on that one axes). Non-finite cells are blank and say ``NaN``. Returns the matplotlib figure.
    """
    _check_plot(result, metric, seq, max_positions)
    check_int(per_row, "per_row", low=1)
    real = result.attention_mask[seq].nonzero().flatten()[-max_positions:]
    values = _values(result, metric, seq, real)  # [R, P']
    n_rows, n_pos = values.shape
    scale, cmap, label, extend = _scale(metric, [values], [_embedding_row(result)])
    n_panels = 1 if ax is not None else -(-n_pos // per_row)
    width = -(-n_pos // n_panels)  # balanced: 23 positions in one panel, 38 in two of 19 at per_row=24
    starts = list(range(0, n_pos, width))
    if ax is None:
        size = (max(6, 0.85 * width + 2.5), len(starts) * max(3, 0.42 * n_rows + 2.2))
        fig, axes = _pyplot().subplots(len(starts), 1, squeeze=False, figsize=size, layout="constrained")
        axes = list(axes[:, 0])
    else:
        fig, axes = ax.figure, [ax]
    for panel, start in zip(axes, starts):
        stop = min(start + width, n_pos)
        image = _panel(panel, result, values[:, start:stop], seq, real[start:stop], scale, cmap)
        panel.set_xlim(-0.5, width - 0.5)
    fig.colorbar(image, ax=axes, label=label, fraction=0.03, pad=0.02, extend=extend)
    shown = f"positions {int(real[0])}..{int(real[-1])}" if len(starts) > 1 else "text = top-1 token"
    axes[0].set_title(f"{result.lens_name}: {_LABELS[metric]} ({shown}; text = top-1 token)"
                      if len(starts) > 1 else f"{result.lens_name}: {_LABELS[metric]} ({shown})", fontsize=10)
    return fig


def plot_lenses(results, metric: str = "prob", seq: int = 0, *, max_positions: int = 40):
    """Several lenses of one text in one figure: one panel per lens, stacked, with ONE colour scale.

    ``results``: :class:`~reslens.lens.LensResult` of the same inputs (e.g. the logit lens and a learned
    lens); each panel shows the last ``max_positions`` real positions of sequence ``seq`` in one row (no
    wrapping; the figure's width follows the number of positions), titled with its lens's name. The
    colour scale (and the one colour bar) spans every panel, so a colour means one value in all of them.
    Returns the matplotlib figure.
    """
    import torch

    results = list(results) if isinstance(results, (list, tuple)) else results
    if not isinstance(results, list) or not results:
        raise TypeError(f"results must be a non-empty list of LensResult; got {type(results).__name__}")
    first = results[0]
    for k, result in enumerate(results):
        _check_plot(result, metric, seq, max_positions)
        if k and (result.input_ids.shape != first.input_ids.shape
                  or not torch.equal(result.input_ids[seq].cpu(), first.input_ids[seq].cpu())):
            raise ValueError(f"results[{k}] reads other inputs than results[0]; give lenses of one text")
    real = first.attention_mask[seq].nonzero().flatten()[-max_positions:]
    values = [_values(result, metric, seq, real) for result in results]  # each [R, P']
    scale, cmap, label, extend = _scale(metric, values, [_embedding_row(result) for result in results])
    n_pos = len(real)
    heights = [max(3.0, 0.3 * v.shape[0] + 1.9) for v in values]
    size = (max(6, 0.8 * n_pos + 2.8), sum(heights))
    fig, axes = _pyplot().subplots(len(results), 1, squeeze=False, figsize=size, layout="constrained",
                                   gridspec_kw={"height_ratios": heights})
    axes = list(axes[:, 0])
    for panel, result, value in zip(axes, results, values):
        image = _panel(panel, result, value, seq, real, scale, cmap)
        panel.set_title(f"{result.lens_name} (text = top-1 token)", fontsize=10)
    fig.colorbar(image, ax=axes, label=label, fraction=0.03, pad=0.02, extend=extend)
    return fig


def plot_lens_stats(stats, *, ax=None):
    """Per-layer curves of a :class:`~reslens.lens.LensStats` on one axes (``ax`` or a new one).

    Fractions on the left axis (agreement with the final top-1, p(final top-1 token), input-token
    top-1), nats on a twin right axis (mean KL(final || layer), mean entropy). Returns the figure.
    """
    fig, left = _figure(ax, (8, 4))
    right = left.twinx()
    layers = list(stats.layers)
    left.plot(layers, stats.top1_agreement.numpy(), "o-", label="top-1 = final top-1")
    left.plot(layers, stats.mean.final_top1_prob.numpy(), "s-", label="p(final top-1 token)")
    left.plot(layers, stats.input_token_top1.numpy(), "^-", label="top-1 = input token")
    right.plot(layers, stats.mean.kl_final_layer.numpy(), "o--", color="tab:red", label="KL(final ‖ layer)")
    right.plot(layers, stats.mean.entropy.numpy(), "s--", color="tab:purple", label="entropy")
    left.set_xlabel("layer")
    left.set_ylabel("fraction / probability")
    left.set_ylim(0, 1)
    right.set_ylabel("nats (dashed)")
    _clip_embedding_kl(right, layers, stats.mean.kl_final_layer.numpy(), stats.mean.entropy.numpy())
    lines = left.get_lines() + right.get_lines()
    left.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")
    left.set_title(f"{stats.lens_name} over {stats.n_tokens} tokens", fontsize=10)
    fig.tight_layout()
    return fig

def _clip_embedding_kl(ax: Any, layers: list, kl: Any, entropy: Any) -> None:
    """Keep the nats axis on the layers after the embedding when the embedding's KL dwarfs them.

    The embedding's mean KL (100+ nats on a trained model, against a few elsewhere) is then drawn at
    the top edge, marked with its value, and the axis label says the scale is clipped.
    """
    import numpy as np

    if not layers or layers[0] != 0 or len(layers) < 2:
        return
    rest = np.concatenate([kl[1:], entropy])
    top = float(np.nanmax(rest)) if np.isfinite(rest).any() else 0.0
    limit = 1.15 * top
    if not (top > 0 and float(kl[0]) > limit):
        return
    ax.set_ylim(0, limit)
    ax.plot([layers[0]], [limit], "^", color="tab:red", clip_on=False)
    ax.annotate(f"embedding KL {float(kl[0]):.3g}", (layers[0], limit), xytext=(6, -12),
                textcoords="offset points", fontsize=7, color="tab:red")
    ax.set_ylabel(f"nats (dashed); clipped at {limit:.3g}, the embedding's KL is off the scale")


def plot_lens_comparison(comparison, *, ax=None):
    """Per layer, a line per lens: KL, cross-entropy, top-1 agreement, calibration and the causal check.

    ``comparison``: a :class:`~reslens.lens.LensComparison`. Panels: KL(final || lens) on a log scale
    (the embedding row's KL is often orders of magnitude above the rest, so a linear axis would flatten
    every other layer; values below 1e-4 are drawn at 1e-4, and the output row, 0 for every lens, is left
    out), the cross-entropy with the next token (log scale too: the embedding row of a tied-embedding model
    can be 25× the rest), the top-1 agreement with the output, the expected
    calibration error, and (when measured) the causal check: mean change of the output's log-probability
    of the token, solid for the lens's edit and dotted for the norm-matched random edit. With ``ax=``,
    the KL panel alone is drawn on that axes. Returns the figure.
    """
    c = comparison
    panels = [("kl_final_layer", "KL(final ‖ lens), nats (log)"),
              ("cross_entropy", "cross-entropy with the next token, nats (log)"),
              ("top1_agreement", "top-1 agreement with the output"),
              ("calibration", "calibration error (ECE, 10 bins)"),
              ("causal_lens", "causal: Δ log p_out(t) (dotted: random edit)")]
    panels = [(n, t) for n, t in panels if getattr(c, n, None) is not None
              and not bool(getattr(c, n).isnan().all())]
    if ax is None:
        fig, axes = _pyplot().subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), layout="constrained")
        axes = list(axes) if len(panels) > 1 else [axes]
    else:
        fig, axes, panels = ax.figure, [ax], panels[:1]
    layers = list(c.layers)
    for panel, (name, title) in zip(axes, panels):
        for k, label in enumerate(c.lenses):
            values = getattr(c, name)[k].float()
            if name == "kl_final_layer":
                panel.plot(layers[:-1], values.clamp(min=1e-4).numpy()[:-1], "o-", color=f"C{k}", label=label,
                           markersize=3)
                continue
            panel.plot(layers, values.numpy(), "o-", color=f"C{k}", label=label, markersize=3)
            if name == "causal_lens":
                panel.plot(layers, c.causal_random[k].numpy(), ":", color=f"C{k}")
        panel.set_title(title, fontsize=9)
        panel.set_xlabel("layer (0 = embedding, last = output)", fontsize=8)
        panel.xaxis.get_major_locator().set_params(integer=True)
        if name in ("kl_final_layer", "cross_entropy"):
            panel.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{len(c.lenses)} lenses on {c.n_tokens} held-out tokens"
                 + (f" of {c.model}" if getattr(c, "model", "") else ""), fontsize=10)
    return fig


def lens_table(result: Any, seq: int = 0, *, width: int = 100, cell: int = 9) -> str:
    """The classic logit-lens table of a :class:`~reslens.lens.LensResult` (see its ``table``)."""
    check_int(seq, "seq", low=0, high=result.input_ids.shape[0] - 1)
    check_int(cell, "cell", low=3)
    real = result.attention_mask[seq].nonzero().flatten().tolist()
    title = f"{result.lens_name}: top-1 token per layer"[:width]
    labels = ["next"] + [f"L{label}" if label.isdigit() else label.replace("resid_mid ", "mid ")
                         for label in result.row_labels][::-1] + ["input"]
    label_w = max(len(label) for label in labels) + 1
    per_window = max(1, (width - label_w) // cell)
    top1 = result.top_ids[..., 0].cpu()  # [R, B, P]

    def cells(tokens: list[str]) -> str:
        return "".join(f"{_cell_text(t, cell - 1):<{cell}}" for t in tokens)

    blocks = []
    for start in range(0, len(real), per_window):
        cols = real[start : start + per_window]
        lines = [f"{'':<{label_w}}" + "".join(f"{f'[{p}]':<{cell}}" for p in cols)]
        nxt = [result.token(int(result.targets[seq, p])) if result.targets is not None else "" for p in cols]
        lines.append(f"{'next':<{label_w}}" + cells(nxt))
        lines.append("-" * (label_w + cell * len(cols)))
        for r in reversed(range(len(result.site_of_row))):
            label = labels[len(result.site_of_row) - r]
            tops = [int(top1[r, seq, p]) for p in cols]
            lines.append(f"{label:<{label_w}}" + cells([result.token(t) if t >= 0 else "NaN" for t in tops]))
        lines.append("-" * (label_w + cell * len(cols)))
        ins = [result.token(int(result.input_ids[seq, p])) for p in cols]
        lines.append(f"{'input':<{label_w}}" + cells(ins))
        blocks.append("\n".join(line.rstrip() for line in lines))
    return title + "\n\n" + "\n\n".join(blocks)


def _short_model_name(name: str) -> str:
    """A recorded model name as a caption says it: a local path by its last part (``smollm2``)."""
    if not name:
        return "a model not recorded"
    return name.rstrip("/").rsplit("/", 1)[-1] if name.startswith(("/", "~", ".")) else name


def lens_html(result: Any, max_positions: int = 40) -> str:
    """A :class:`~reslens.lens.LensResult`'s notebook view: a coloured grid of sequence 0, deepest row on top.

    A caption names the lens and the model and says how to read the grid; each cell's background is
    the layer's top-1 probability, its text the top-1 token (hover: the probability).
    """
    import html

    real = result.attention_mask[0].nonzero().flatten()[:max_positions].tolist()
    top1, prob = result.top_ids[:, 0, :, 0].cpu(), result.top_probs[:, 0, :, 0].cpu()

    def row(label: str, cells: list[str]) -> str:
        return f"<tr><th style='text-align:right'>{html.escape(label)}</th>{''.join(cells)}</tr>"

    def plain(ids: list[int]) -> list[str]:
        return [f"<td><i>{html.escape(_cell_text(result.token(i), 10))}</i></td>" for i in ids]

    lines = []
    if result.targets is not None:
        lines.append(row("next", plain(result.targets[0, real].tolist())))
    for r in reversed(range(len(result.site_of_row))):
        cells = []
        for p in real:
            value, token = float(prob[r, p]), int(top1[r, p])
            back, text = blue(value)
            shown = html.escape(_cell_text(result.token(token), 10)) if token >= 0 else "NaN"
            cells.append(f"<td style='background:{back};color:{text}' title='p={value:.3f}'>{shown}</td>")
        lines.append(row(result.row_labels[r], cells))
    lines.append(row("input", plain(result.input_ids[0, real].tolist())))
    model = _short_model_name(getattr(result, "model_name", ""))
    n_real = int(result.attention_mask[0].sum())
    shown = f"{len(real)} of {n_real} positions" if len(real) < n_real else f"{n_real} positions"
    caption = (f"sequence 0, {shown}. Each cell: the top-1 token of that layer's prediction, on its "
               "probability (white 0 to dark blue 1); rows from the embedding (bottom) to the model's output "
               "(top)" + ("; 'next' is the actual next token" if result.targets is not None else "") + ".")
    return (f"<div><b>{html.escape(result.lens_name)} of {html.escape(model)}</b> "
            f"<span>{html.escape(caption)}</span> <small>{html.escape(repr(result))}</small>"
            f"<table style='font-family:monospace;font-size:11px'>{''.join(lines)}</table></div>")


def plot_lens_change(change: Any, k: int = 10, *, ax: Any = None):
    """A waterfall of a :class:`~reslens.lens.LensChange`: row ``start``'s value, pieces, row ``stop``'s.

    The ``k`` pieces of largest magnitude, largest first, each a bar from the running total (blue up,
    red down), then the other pieces as one bar, then the value at row ``stop`` (grey, from 0), which
    the running total reaches. On ``ax`` or a new figure; returns the figure.
    """
    check_int(k, "k", low=1)
    top = change.top(k)
    rest = len(change.kind) - len(top)
    steps = [*top, *([(f"other {rest} pieces", change.total - sum(v for _, v in top))] if rest else [])]
    start, stop = float(change.logit[change.start]), float(change.logit[change.stop])
    fig, ax = _figure(ax, (max(6.0, 0.45 * len(steps) + 2.5), 4.0))
    ax.bar(0, start, color="tab:gray")
    running = start
    for i, (_, value) in enumerate(steps, 1):
        ax.bar(i, value, bottom=running, color="tab:blue" if value >= 0 else "tab:red")
        running += value
    ax.bar(len(steps) + 1, stop, color="tab:gray")
    labels = [f"row {change.start}", *(label for label, _ in steps), f"row {change.stop}"]
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("logit difference" if change.against is not None else "logit")
    ax.set_title(f"{change.describe()}\nchange {change.change:+.3f}, pieces sum to {change.total:+.3f}",
                 fontsize=9)
    fig.tight_layout()
    return fig
