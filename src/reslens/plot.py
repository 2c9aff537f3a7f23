"""Text tables and matplotlib figures for reslens results (matplotlib is the ``plot`` extra)."""

from __future__ import annotations

from typing import Any

from reslens._text import cell_text as _cell_text

__all__ = ["lens_table", "plot_lens", "plot_lens_stats", "plot_pca_experiment", "LENS_PLOT_METRICS",
           "plot_head_scores", "plot_head_score_panels", "plot_composition", "plot_logit_attribution",
           "plot_logit_attribution_bars",
           "plot_agreement", "plot_deletion_neurons", "plot_trace", "plot_trace_summary"]

LENS_PLOT_METRICS = ("prob", "rank", "entropy", "kl")


def _check_seq(result: Any, seq: int) -> None:
    n = result.input_ids.shape[0]
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < n:
        raise ValueError(f"seq={seq!r} is out of range for a batch of {n} (0..{n - 1})")


def lens_table(result, seq: int = 0, *, width: int = 100, cell: int = 9) -> str:
    """The classic logit-lens table: :meth:`reslens.lens.LensResult.table` (kept here for old imports)."""
    return result.table(seq=seq, width=width, cell=cell)


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - the plot extra is optional
        raise ImportError("plotting needs matplotlib: pip install 'reslens[plot]'") from error
    return plt


def _figure(ax: Any, size: tuple[float, float]):
    """``(fig, ax)``: a new figure of ``size`` inches, or ``ax`` and its figure (drawn the same way)."""
    if ax is None:
        return _pyplot().subplots(figsize=size)
    return ax.figure, ax


def _text_colour(image: Any, value: float) -> str:
    """White on dark cells of ``image`` (a matplotlib ``AxesImage``), black on light ones."""
    rgba = image.cmap(image.norm(value))
    return "white" if (0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]) < 0.5 else "black"


def plot_lens(result, metric: str = "prob", seq: int = 0, *, ax=None, max_positions: int = 40):
    """Layers x positions heatmap of a :class:`~reslens.lens.LensResult` with each cell's top-1 token.

    ``prob``: the layer's top-1 probability; ``rank``: rank of the actual next token (log
    colour scale); ``entropy``: nats; ``kl``: KL(final || layer) in nats. The last
    ``max_positions`` real positions are shown; non-finite cells are blank and say ``NaN``.
    Returns the matplotlib figure.
    """
    import numpy as np

    if metric not in LENS_PLOT_METRICS:
        raise ValueError(f"metric must be one of {', '.join(LENS_PLOT_METRICS)}; got {metric!r}")
    _check_seq(result, seq)
    if metric == "rank" and result.target_rank is None:
        raise ValueError("metric='rank' needs targets; this lens ran with targets=None")
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
    top1 = result.top_ids[:, seq, real, 0].cpu()
    n_rows, n_pos = values.shape
    fig, ax = _figure(ax, (max(6, 0.85 * n_pos + 1.5), max(3, 0.42 * n_rows + 1.6)))
    cmap = "Blues" if metric == "prob" else "Blues_r" if metric == "rank" else "viridis_r"
    vmax = float(np.nanmax(values)) if np.isfinite(values).any() else 2.0
    norm = LogNorm(vmin=1, vmax=max(2.0, vmax)) if metric == "rank" else None
    scale = {"rank": dict(norm=norm), "prob": dict(vmin=0, vmax=1)}.get(metric, dict(vmin=0))
    image = ax.imshow(values, aspect="auto", origin="lower", cmap=cmap, **scale)
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
    inputs = [_cell_text(result.token(int(i)), 10) for i in result.input_ids[seq, real].tolist()]
    ax.set_xticks(range(n_pos), inputs, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("input token")
    if result.targets is not None:
        top = ax.secondary_xaxis("top")
        targets = [_cell_text(result.token(int(i)), 10) for i in result.targets[seq, real].tolist()]
        top.set_xticks(range(n_pos), targets, rotation=60, ha="left", fontsize=8)
        top.set_xlabel("actual next token")
    fig.colorbar(image, ax=ax, label=label, fraction=0.03, pad=0.02)
    ax.set_title(f"{result.lens}: {label} (text = top-1 token)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_lens_stats(stats, *, ax=None):
    """Per-layer curves of a :class:`~reslens.lens_stats.LensStats` on one axes (``ax`` or a new one).

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
    lines = left.get_lines() + right.get_lines()
    left.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")
    left.set_title(f"{stats.lens} over {stats.n_tokens} tokens", fontsize=10)
    fig.tight_layout()
    return fig


def plot_pca_experiment(experiment, *, ax=None, conditions=("baseline", "no_embedding", "unit_norm")):
    """Explained-variance ratio per principal component: mean line with a 10-90% band per condition."""
    fig, ax = _figure(ax, (7, 4))
    k: range = range(0)
    for name in conditions:
        evr = experiment.condition(name).explained_variance_ratio  # [n, K]
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


# --- attention heads (reslens.heads) ------------------------------------------------------------


def plot_head_scores(scores, *, ax=None, annotate: bool | None = None):
    """Layers x heads heatmap of a :class:`~reslens.heads.HeadScores`. Returns the figure.

    Values are written in the cells when ``annotate`` (default: at most 16 x 16 heads).
    Scores with negative values (copying, logit attribution) get a diverging colour map
    centred on 0. Scores within [-1, 1] (attention fractions, copying) keep the full 0..1 or
    -1..1 colour scale, so weak heads look weak.
    """
    import numpy as np

    values = scores.scores.numpy()
    n_layer, n_head = values.shape
    fig, ax = _figure(ax, (max(3.5, 0.55 * n_head + 2), max(2.5, 0.45 * n_layer + 1.2)))
    finite = values[np.isfinite(values)]
    largest = float(np.abs(finite).max()) if finite.size else 1.0
    bound = 1.0 if largest <= 1.0 else largest
    if finite.size and finite.min() < 0:
        image = ax.imshow(values, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    else:
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=bound, aspect="auto")
    if annotate if annotate is not None else (n_layer <= 16 and n_head <= 16):
        for layer in range(n_layer):
            for head in range(n_head):
                v = values[layer, head]
                if np.isfinite(v):
                    text = f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.3f}"
                    colour = _text_colour(image, v)
                    ax.text(head, layer, text, ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(n_head))
    ax.set_yticks(range(n_layer))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{scores.name} scores", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    return fig


def plot_head_score_panels(all_scores, *, ncols: int | None = None):
    """Several :class:`~reslens.heads.HeadScores` heatmaps side by side in one figure."""
    plt = _pyplot()
    all_scores = list(all_scores)
    if not all_scores:
        raise ValueError("all_scores is empty; give at least one HeadScores")
    ncols = ncols or len(all_scores)
    nrows = -(-len(all_scores) // ncols)
    n_layer, n_head = all_scores[0].scores.shape
    width, height = max(3.5, 0.55 * n_head + 2), max(2.5, 0.45 * n_layer + 1.2)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, figsize=(ncols * width, nrows * height))
    for ax, scores in zip(axes.flat, all_scores):
        plot_head_scores(scores, ax=ax)
    for ax in list(axes.flat)[len(all_scores):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_composition(comp, *, ax=None):
    """Writer heads (rows) x reader heads (columns) heatmap of a :class:`~reslens.heads.CompositionScores`.

    Lines separate the layers. Returns the figure.
    """
    import numpy as np

    n_layer, n_head = comp.n_layer, comp.n_head
    n = n_layer * n_head
    values = comp.scores.reshape(n, n).numpy()
    size = min(12, max(4, 0.3 * n + 2))
    fig, ax = _figure(ax, (size + 1, size))
    finite = values[np.isfinite(values)]
    bound = max(float(np.abs(finite).max()) if finite.size else 1.0, 1e-12)
    image = ax.imshow(values, cmap="RdBu", vmin=-bound, vmax=bound)
    for edge in range(1, n_layer):
        ax.axhline(edge * n_head - 0.5, color="grey", lw=0.5)
        ax.axvline(edge * n_head - 0.5, color="grey", lw=0.5)
    labels = [f"{layer}.{head}" for layer in range(n_layer) for head in range(n_head)]
    step = max(1, n // 48)
    ax.set_xticks(range(0, n, step), labels[::step], rotation=90, fontsize=6)
    ax.set_yticks(range(0, n, step), labels[::step], fontsize=6)
    ax.set_xlabel("reader head (later layer)")
    ax.set_ylabel("writer head (earlier layer)")
    offset = getattr(comp, "offset", None)  # Q/K-composition under rotary: the query-key offset
    title = f"{comp.kind.upper()}-composition" + ("" if offset is None else f" at offset {offset}")
    ax.set_title(f"{title} minus random baseline {comp.baseline:.3f}", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    return fig


def _attribution_row(attribution, seq: int):
    _check_seq(attribution, seq)
    return attribution.contributions[seq].numpy()


def plot_logit_attribution_bars(attribution, seq: int = 0, *, ax=None):
    """Every piece of a :class:`~reslens.attribution.LogitAttribution` of sequence ``seq`` as one bar.

    In the pieces' order (embeddings, per layer its heads, attention bias and MLP, then the
    biases after the final norm), on ``ax`` or on a new figure: the same drawing either way.
    Returns the figure.
    """
    row = _attribution_row(attribution, seq)
    fig, ax = _figure(ax, (max(6.0, 0.12 * len(row) + 2), 3.5))
    ax.bar(range(len(row)), row, color=["tab:red" if v < 0 else "tab:blue" for v in row])
    ax.set_xticks(range(len(row)), attribution.labels, rotation=90, fontsize=6)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("contribution to the logit")
    ax.set_title(attribution.describe(seq), fontsize=9)
    return fig


def plot_logit_attribution(attribution, seq: int = 0):
    """Direct logit attribution of sequence ``seq`` as a new figure of two panels. Returns the figure.

    The heads as a layers x heads heatmap (left) and the other pieces (embeddings, attention
    biases, MLPs, biases after the final norm) as bars (right). For one axes of your own, use
    :func:`plot_logit_attribution_bars`.
    """
    import numpy as np

    plt = _pyplot()
    row = _attribution_row(attribution, seq)
    labels = attribution.labels
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(3.5, 0.45 * attribution.n_layer + 1.5)),
                                      gridspec_kw={"width_ratios": [1, 1.3]})
    plot_head_scores(attribution.head_scores(seq), ax=left)
    others = [i for i, kind in enumerate(attribution.kind) if kind != "head"]
    values = row[others]
    right.barh(range(len(others)), values, color=["tab:red" if v < 0 else "tab:blue" for v in values])
    right.set_yticks(range(len(others)), [labels[i] for i in others], fontsize=7)
    right.invert_yaxis()
    right.axvline(0, color="black", lw=0.5)
    right.set_xlabel("contribution to the logit")
    total = float(np.sum(row))
    model = float(attribution.logit[seq])
    right.set_title(f"other pieces (all pieces sum to {total:.3f}; model {model:.3f})", fontsize=9)
    fig.suptitle(attribution.describe(seq), fontsize=10)
    fig.tight_layout()
    return fig


# --- MLP key-value memories (reslens.kv_memory) ------------------------------------------------


def plot_agreement(result, *, ax=None):
    """Geva et al. Figs. 4-5: the key-value agreement per layer, and the next token's rank.

    Left: per layer, the fraction of keys whose value's top token (its bottom token where the
    top trigger's coefficient is negative, in a gated MLP's signed index) is the token after the
    key's top trigger, against the random 1/|V| and the shuffled baselines, log scale. Right:
    the distribution of that token's rank in the value's vocabulary scores, from that side.

    Always the same two panels: on a new figure, or on ``ax`` = a pair of axes ``(left, right)``
    (e.g. ``fig.subplots(1, 2)``). Returns the figure.
    """
    import numpy as np

    if ax is None:
        fig, (left, right) = _pyplot().subplots(1, 2, figsize=(11, 4))
    else:
        try:
            left, right = ax
        except (TypeError, ValueError):
            raise TypeError("ax must be None or a pair of matplotlib axes (left, right), e.g. "
                            "fig.subplots(1, 2): the figure has two panels; "
                            f"got {type(ax).__name__}") from None
        fig = left.figure
    layers = list(result.layers)
    agree = result.agreement.numpy()
    negative = getattr(result, "negative", None)
    signed = negative is not None and bool(negative.any())
    label = "value's token (bottom if m < 0) = next token" if signed else "value top token = next token"
    left.plot(layers, np.where(agree > 0, agree, np.nan), "o-", label=label)
    shuffled = result.shuffled.numpy()
    left.plot(layers, np.where(shuffled > 0, shuffled, np.nan), "s--", color="tab:orange",
              label="shuffled: another key's next token")
    left.axhline(result.baseline, color="grey", ls="--", label=f"random (1/{result.d_vocab})")
    left.set_yscale("log")
    left.set_xlabel("layer")
    left.set_ylabel("fraction of keys")
    left.set_xticks(layers)
    left.set_title(f"key-value agreement ({result.convention})", fontsize=10)
    left.legend(fontsize=8)
    ranks = [r[r >= 0].numpy() + 1 for r in result.rank]
    right.boxplot(ranks, positions=layers, showfliers=False)
    right.set_yscale("log")
    right.set_xlabel("layer")
    right.set_ylabel("rank of the next token + 1")
    right.set_title("next token's rank in the value's distribution", fontsize=10)
    fig.tight_layout()
    return fig


def plot_deletion_neurons(result, *, ax=None):
    """Per-layer distributions of each neuron's key-value cosine; the left tail holds deletion neurons.

    The cosine is ``result.direction``, e.g. ``cos(key ⊙ γ, value)`` with ``γ`` the weight of
    the norm before the MLP (for a gated MLP, the up key's). Up to 12 layers: one histogram
    line per layer; more: a layers x cosine heatmap of log10(1 + neurons), with the -0.5
    threshold of :meth:`~reslens.kv_memory.DeletionNeurons.counts` marked. The choice depends
    on the result only, never on ``ax``.
    """
    import numpy as np

    n_layer = result.cos.shape[0]
    fig, ax = _figure(ax, (7, 4) if n_layer <= 12 else (7, 1.5 + 0.17 * n_layer))
    bins = np.linspace(-1, 1, 81)
    direction = getattr(result, "direction", "cos(key ⊙ γ, value)")
    if n_layer <= 12:
        for layer, cos in enumerate(result.cos):
            ax.hist(cos.numpy(), bins=bins, histtype="step", label=f"layer {layer}", log=True)
        ax.set_ylabel("neurons")
        ax.legend(fontsize=8, ncol=2)
    else:
        counts = np.stack([np.histogram(cos.numpy(), bins=bins)[0] for cos in result.cos])
        image = ax.imshow(np.log10(1 + counts), aspect="auto", origin="lower", cmap="viridis",
                          extent=(-1, 1, -0.5, n_layer - 0.5))
        ax.axvline(-0.5, color="white", ls="--", lw=1)
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02).set_label("log10(1 + neurons)", fontsize=8)
    ax.set_xlabel(direction)
    ax.set_title("input vs output direction of every MLP neuron", fontsize=10)
    fig.tight_layout()
    return fig


# --- causal tracing (reslens.tracing) --------------------------------------------------------

_TRACE_CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}


def plot_trace(result, *, ax=None):
    """ROME's causal-trace heatmap: tokens (rows, subject tokens starred) x layers.

    Colour = p(answer) with that cell restored, from the corrupted probability (white) upwards.
    Purple = hidden states, green = MLP windows, red = attention windows, as in ROME. ``result``:
    a ``TraceResult``; with ``ax`` the same heatmap is drawn there.
    """
    fig, ax = _figure(ax, (3.5 + 0.35 * result.n_layer, 1.2 + 0.3 * result.n_tokens))
    scores = result.restored_prob.T.numpy()  # [n_tokens, n_layer]
    image = ax.pcolor(scores, cmap=_TRACE_CMAPS[result.kind], vmin=result.corrupted_prob)
    ax.invert_yaxis()
    start, end = result.subject_span
    labels = [repr(t)[1:-1] + ("*" if start <= i < end else "") for i, t in enumerate(result.tokens)]
    ax.set_yticks([0.5 + i for i in range(result.n_tokens)])
    ax.set_yticklabels(labels, fontsize=8)
    step = max(1, result.n_layer // 12)
    ax.set_xticks([0.5 + i for i in range(0, result.n_layer, step)])
    ax.set_xticklabels(list(range(0, result.n_layer, step)), fontsize=8)
    what = {"resid": "single restored layer", "mlp": "center of MLP window",
            "attn": "center of attention window"}
    window = f" (window {result.window})" if result.kind != "resid" else ""
    ax.set_xlabel(what[result.kind] + window)
    ax.set_title(f"Impact of restoring {result.label} after corrupted input", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
    bar.set_label(f"p({result.answer!r}) restored (white = corrupted)", fontsize=8)
    fig.tight_layout()
    return fig


def plot_trace_summary(summary, *, ax=None):
    """ROME's average indirect effect: buckets x layers (NaN cells, empty buckets, drawn as 0).

    Buckets: first / middle / last subject token, first subsequent, further, last token, each
    labelled with its number of facts. ``summary``: a ``TraceSummary``.
    """
    import numpy as np

    fig, ax = _figure(ax, (3.5 + 0.35 * summary.n_layer, 3))
    values = np.nan_to_num(summary.mean.numpy(), nan=0.0)
    image = ax.pcolor(values, cmap=_TRACE_CMAPS[summary.kind], vmin=min(0.0, float(values.min())))
    ax.invert_yaxis()
    ax.set_yticks([0.5 + i for i in range(len(summary.buckets))])
    ax.set_yticklabels([f"{b} ({int(n)})" for b, n in zip(summary.buckets, summary.count)], fontsize=8)
    ax.set_xticks([0.5 + i for i in range(summary.n_layer)])
    ax.set_xticklabels(list(range(summary.n_layer)), fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title(f"Average indirect effect ({summary.kind}) over {summary.n_facts} facts", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
    fig.tight_layout()
    return fig


def plot_lens_comparison(comparison, *, ax=None):
    """KL(final || lens) (solid) and cross-entropy with the next token (dashed) per layer, a colour per lens.

    ``comparison``: a :class:`~reslens.lenses.LensComparison`. Log scale for the KL. Returns the figure.
    """
    fig, left = _figure(ax, (8, 4))
    right = left.twinx()
    layers = list(comparison.layers)
    for k, name in enumerate(comparison.lenses):
        colour = f"C{k}"
        kl = comparison.kl_final_layer[k].clamp(min=1e-4).numpy()
        left.plot(layers[:-1], kl[:-1], "o-", color=colour, label=f"{name}: KL(final ‖ lens)")
        right.plot(layers, comparison.cross_entropy[k].numpy(), "s--", color=colour, alpha=0.7,
                   label=f"{name}: cross-entropy")
    left.set_yscale("log")
    left.set_xlabel("layer (0 = embedding; the last = the output)")
    left.set_ylabel("KL(final ‖ lens), nats (solid)")
    right.set_ylabel("cross-entropy with the next token, nats (dashed)")
    left.xaxis.get_major_locator().set_params(integer=True)
    lines = left.get_lines() + right.get_lines()
    left.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="upper right")
    left.set_title(f"lenses on {comparison.n_tokens} held-out tokens", fontsize=10)
    fig.tight_layout()
    return fig
