"""Text tables and matplotlib figures for reslens results (matplotlib is the ``plot`` extra)."""

from __future__ import annotations

import textwrap

from reslens._figures import _check_seq, _figure, _pyplot, _text_colour
from reslens.lens._plot import (LENS_PLOT_METRICS, plot_lens, plot_lens_change, plot_lens_comparison,
                                 plot_lens_stats, plot_lenses)

__all__ = ["plot_lens", "plot_lenses", "plot_lens_stats", "plot_pca_experiment", "LENS_PLOT_METRICS",
           "plot_head_scores", "plot_head_score_panels", "plot_composition", "plot_logit_attribution",
           "plot_logit_attribution_bars",
           "plot_agreement", "plot_deletion_neurons", "plot_trace", "plot_trace_summary",
           "plot_lens_comparison", "plot_lens_change"]


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
    -1..1 colour scale, so weak heads look weak. The colour bar's label is the score's description.
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
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    if scores.description:  # what the colour means, e.g. the copying score's formula and reading
        bar.set_label(textwrap.fill(scores.description, 60), fontsize=7)
    return fig


def plot_head_score_panels(all_scores, *, ncols: int | None = None, annotate: bool | None = None):
    """Several :class:`~reslens.heads.HeadScores` heatmaps side by side in one figure.

    ``annotate``: as :func:`plot_head_scores`.
    """
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
        plot_head_scores(scores, ax=ax, annotate=annotate)
    for ax in list(axes.flat)[len(all_scores):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _layer_blocks(comp):
    """``[n_layer, n_layer]`` strongest score per (writer layer, reader layer) block (NaN where none)."""
    import torch

    blocks = torch.where(comp.mask & ~comp.scores.isnan(), comp.scores, float("-inf")).amax(dim=(1, 3))
    return torch.where(blocks.isfinite(), blocks, float("nan")).numpy()


def plot_composition(comp, *, ax=None, top: int = 20):
    """A :class:`~reslens.heads.CompositionScores` readable at any model size: layer blocks and the top pairs.

    Left: a writer layer x reader layer heatmap, each cell the strongest head pair of that block (score
    = raw minus the random baseline; white 0 = as random). Right: the ``top`` strongest head pairs as
    bars labelled ``writer -> reader`` (``layer.head``). A 30-layer, 270-head model gives a 30 x 30 grid
    and 20 bars instead of a 270 x 270 grid. ``ax``: None (a new figure), a pair of axes ``(left,
    right)``, or one axes for the layer heatmap alone. Returns the figure.
    """
    import numpy as np

    from reslens._checks import check_int

    check_int(top, "top", low=1)
    if ax is None:
        size = (min(14, max(9, 0.3 * comp.n_layer + 7)), min(10, max(4, 0.25 * comp.n_layer + 2.5)))
        fig, (left, right) = _pyplot().subplots(1, 2, figsize=size, gridspec_kw={"width_ratios": [1.2, 1]},
                                                layout="constrained")
    elif isinstance(ax, (tuple, list)) and len(ax) == 2:
        (left, right), fig = ax, ax[0].figure
    else:
        fig, left, right = ax.figure, ax, None
    blocks = _layer_blocks(comp)
    finite = blocks[np.isfinite(blocks)]
    bound = max(float(np.abs(finite).max()) if finite.size else 1.0, 1e-12)
    image = left.imshow(blocks, cmap="RdBu_r", vmin=-bound, vmax=bound)
    step = max(1, -(-comp.n_layer // 24))  # at most 24 labels a side
    ticks = list(range(0, comp.n_layer, step))
    left.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
    left.set_yticks(ticks, [str(t) for t in ticks], fontsize=8)
    left.set_xlabel("reader layer (later)")
    left.set_ylabel("writer layer (earlier)")
    offset = getattr(comp, "offset", None)  # Q/K-composition under rotary: the query-key offset
    title = f"{comp.kind.upper()}-composition" + ("" if offset is None else f" at offset {offset}")
    left.set_title(f"{title}: strongest head pair per layer pair", fontsize=10)
    fig.colorbar(image, ax=left, fraction=0.046, pad=0.03,
                 label=f"score = raw − random baseline {comp.baseline:.3f}")
    if right is not None:
        pairs = comp.top(top)
        values = [score for _, _, score in pairs]
        right.barh(range(len(pairs)), values, color=["tab:red" if v >= 0 else "tab:blue" for v in values])
        right.set_yticks(range(len(pairs)), [f"{w} -> {r}" for w, r, _ in pairs], fontsize=8)
        right.invert_yaxis()
        right.axvline(0, color="black", lw=0.5)
        right.set_xlabel("score (raw − random baseline)")
        right.set_title(f"the {len(pairs)} strongest pairs (writer -> reader, layer.head)", fontsize=10)
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
