"""The lens bench: lenses side by side on held-out text (Belrose et al. 2023, Fig. 3), with a causal check.

:func:`compare_lenses` captures the corpus windows once and reads every batch through every lens with the
accumulator of :func:`reslens.lens.lens_stats` (bounded memory, pads and special tokens left out, sums
merged exactly across ranks), and keeps, per lens and ``resid`` layer:

- ``kl_final_layer`` = mean KL(p_final ‖ p_lens) and ``kl_layer_final`` = mean KL(p_lens ‖ p_final) (nats);
- ``cross_entropy``: ``-mean log p_lens(actual next token)`` (nats);
- ``top1_agreement``: the fraction of positions whose top-1 is the output's top-1;
- ``calibration``: the expected calibration error of the lens's top-1 against the actual next token:
  positions binned by the lens's top-1 probability (10 equal-width bins of [0, 1]),
  ``ECE = sum_b (n_b / N) |accuracy_b - confidence_b|`` with accuracy = the fraction of the bin whose top-1
  *is* the next token and confidence = the bin's mean top-1 probability (Guo et al. 2017). Belrose et al.
  measure the same top-label calibration against the next token, with another estimator (the tuned-lens
  package's monotonic-sweep, equal-mass bins, L2 norm; Roelofs et al. 2020), which needs every position
  kept; fixed bins keep memory bounded and merge exactly. ``calibration_bins`` holds the bins.
- with ``causal_positions > 0``, the causal check of :mod:`reslens.lens._causal` (editing the residual
  along the lens's gradient for a token, against a norm-matched random edit): ``causal_lens``,
  ``causal_random`` (mean change of the output's log-probability of the token) and ``causal_win`` (the
  fraction of edits where the lens's moved it more).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from reslens._checks import check_bool, check_float, check_int
from reslens._corpus import start_ids
from reslens._distributed import shard_of
from reslens._saving import Saveable
from reslens._stream import batches
from reslens._text import html_table, pandas
from reslens.arch import adapter
from reslens.lens._bench import N_BINS, check_lenses, expected_calibration_error, read_bench
from reslens.lens._causal import causal_check, sample_positions
from reslens.lens._data import corpus_windows, model_name
from reslens.lens.stats import QUANTILES

__all__ = ["LensComparison", "compare_lenses"]

#: the ``[K, R]`` scores, in the order tables and frames show them: (field, short name, what it is)
SCORES = (
    ("kl_final_layer", "KL(f‖l)", "mean KL(output ‖ lens), nats"),
    ("kl_layer_final", "KL(l‖f)", "mean KL(lens ‖ output), nats"),
    ("cross_entropy", "CE", "cross-entropy with the next token, nats"),
    ("top1_agreement", "agree", "fraction of positions whose top-1 is the output's"),
    ("calibration", "ECE", "expected calibration error of the top-1 vs the next token (10 bins)"),
    ("causal_lens", "Δlens", "mean Δ log p_out(t) of the edit along the lens's direction"),
    ("causal_random", "Δrand", "mean Δ log p_out(t) of a norm-matched random edit"),
    ("causal_win", "win", "fraction of edits where the lens's edit moved the output more"),
)


@dataclass(frozen=True, repr=False, eq=False)
class LensComparison(Saveable):
    """Per-layer scores of ``K`` lenses on the same tokens. ``R`` = number of ``resid`` layers.

    - ``lenses``: the lenses' labels (their names, or the keys of a mapping), ``layers``: the ``resid``
      layers (the last one is the output, where every lens is the model itself)
    - ``kl_final_layer``, ``kl_layer_final``, ``cross_entropy``, ``top1_agreement``, ``calibration``:
      ``[K, R]`` (see :mod:`reslens.lens.compare`); ``calibration_bins: [K, R, 10, 3]``: per bin of the
      top-1 probability, the count, the sum of top-1 probabilities and the number of hits
    - ``causal_lens``, ``causal_random``, ``causal_win``: ``[K, R]`` (NaN when not measured;
      ``causal_notes[k]`` says why for lens ``k``), over ``causal_positions`` positions, edits of
      ``causal_scale`` times the residual's norm
    - ``n_tokens``: positions scored; ``model``, ``model_fingerprint``: the model that was read
    """

    lenses: tuple[str, ...]
    layers: tuple[int, ...]
    kl_final_layer: torch.Tensor
    cross_entropy: torch.Tensor
    top1_agreement: torch.Tensor
    n_tokens: int
    kl_layer_final: torch.Tensor | None = None
    calibration: torch.Tensor | None = None
    calibration_bins: torch.Tensor | None = None
    causal_lens: torch.Tensor | None = None
    causal_random: torch.Tensor | None = None
    causal_win: torch.Tensor | None = None
    causal_positions: int = 0
    causal_scale: float = 0.0
    causal_notes: tuple[str, ...] = ()
    lens_kinds: tuple[str, ...] = ()
    model: str = ""
    model_fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        shape = (len(self.lenses), len(self.layers))
        for name, *_ in SCORES:
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}; expected {shape}")
        bins = self.calibration_bins
        if bins is not None and tuple(bins.shape) != (*shape, N_BINS, 3):
            want = (*shape, N_BINS, 3)
            raise ValueError(f"calibration_bins has shape {tuple(bins.shape)}; expected {want}")

    def _scores(self) -> list[tuple[str, str, str]]:
        return [s for s in SCORES if getattr(self, s[0]) is not None]

    def to_frame(self):
        """Long-form ``pandas.DataFrame``: one row per (lens, layer), a column per score."""
        names = [name for name, *_ in self._scores()]
        rows = [(label, layer, *(float(getattr(self, n)[k, r]) for n in names))
                for k, label in enumerate(self.lenses) for r, layer in enumerate(self.layers)]
        return pandas().DataFrame(rows, columns=["lens", "layer", *names])

    def table(self) -> str:
        """Per score, a layer × lens grid; then what to read from it."""
        width = max(9, *(len(label) for label in self.lenses))
        head = f"{'layer':>5} " + " ".join(f"{label:>{width}}" for label in self.lenses)
        lines = [f"{self.n_tokens} held-out tokens{f' of {self.model}' if self.model else ''}; "
                 f"lenses: {', '.join(self.lenses)}"]
        for name, short, what in self._scores():
            values = getattr(self, name)
            if bool(values.isnan().all()):
                continue
            lines += ["", f"{short}: {what}", head, "-" * len(head)]
            lines += [f"{layer:>5} " + " ".join(f"{float(values[k, r]):>{width}.3f}"
                                                for k in range(len(self.lenses)))
                      for r, layer in enumerate(self.layers)]
        return "\n".join(lines + ["", *self.reading()])

    def reading(self) -> list[str]:
        """What to read from the table: the best lens per score over the inner layers, and caveats."""
        inner = slice(1, len(self.layers) - 1) if len(self.layers) > 2 else slice(None)
        lines = ["What to read from it (means over the layers between the embedding and the output):"]
        lower = {"kl_final_layer", "kl_layer_final", "cross_entropy", "calibration"}
        for name, short, _ in self._scores():
            if name == "causal_random":
                continue
            means = getattr(self, name)[:, inner].nanmean(1)
            if bool(means.isnan().all()):
                continue
            key = means if name in lower else -means
            best = int(key.nan_to_num(float("inf")).argmin())
            shown = ", ".join(f"{label} {float(m):.3g}" for label, m in zip(self.lenses, means))
            lines.append(f"- {short}: best {self.lenses[best]} ({'lower' if name in lower else 'higher'} is "
                         f"better): {shown}")
        if self.causal_win is not None and not bool(self.causal_win.isnan().all()):
            lines.append(f"- causal: over {self.causal_positions} positions, edits of "
                         f"{self.causal_scale:g}×|h|; win > 0.5: the lens's direction for its token moves "
                         "the output toward that token more than a random direction does")
        lines += [f"- {label}: {note}" for label, note in zip(self.lenses, self.causal_notes) if note]
        lines.append("- the last row is the output itself: equal for every lens")
        return lines

    def plot(self, *, ax=None):
        """Per-layer panels, a line per lens: KL, cross-entropy, agreement, calibration, causal (a figure)."""
        from reslens.lens._plot import plot_lens_comparison

        return plot_lens_comparison(self, ax=ax)

    def _repr_html_(self) -> str:
        scores = self._scores()
        header = ("lens", "layer", *(short for _, short, _ in scores))
        rows = [(label, layer, *(float(getattr(self, n)[k, r]) for n, _, _ in scores))
                for k, label in enumerate(self.lenses) for r, layer in enumerate(self.layers)]
        note = f"(lenses: {', '.join(self.lenses)}; " + "; ".join(f"{s} = {w}" for _, s, w in scores) + ")"
        return html_table(repr(self), header, rows, note=note)

    def __repr__(self) -> str:
        model = f"model={self.model!r}, " if self.model else ""
        return (
            f"LensComparison({model}lenses={list(self.lenses)}, layers={self.layers[0]}..{self.layers[-1]}, "
            f"tokens={self.n_tokens}, causal positions={self.causal_positions})"
        )


def compare_lenses(
    model: Any,
    corpus: Any,
    lenses: Any,
    *,
    tokenizer: Any = None,
    max_tokens: int = 20_000,
    max_length: int = 128,
    batch_size: int = 8,
    causal_positions: int = 0,
    causal_scale: float = 0.25,
    seed: int = 0,
    progress: bool = True,
    group: Any = None,
) -> LensComparison:
    """Score every lens in ``lenses`` on the first ``max_tokens`` tokens of ``corpus`` (the lens bench).

    ``lenses``: a list of lenses (``None`` or ``"logit"`` for the logit lens, a
    :class:`~reslens.lens.LinearShortcut`, :class:`~reslens.lens.TunedLens`,
    :class:`~reslens.lens.JacobianLens`, a :class:`~reslens.lens.Patchscope`), at most one of a kind and
    labelled by their names, or a mapping ``{label: lens}`` (two of a kind under your labels, e.g. a cold-
    and a warm-started tuned lens); each is read at every ``resid`` layer. ``corpus``: a ``.txt`` file, a
    folder, a list of files or an iterable of strings (hold out what the lenses were trained on), read in
    windows of ``max_length`` tokens led by the tokenizer's start tokens (never scored). The corpus is
    captured once, and every batch's residuals feed every lens, so ``K`` lenses cost one forward per batch
    (and a patchscope its batched target runs). The scores are defined in :mod:`reslens.lens.compare`.

    ``causal_positions``: how many positions (sampled uniformly from the windows with ``seed``) the causal
    check edits (0 = none; see :mod:`reslens.lens._causal`): per position one capture of the window up to
    it, a backward per lens and one batched patched forward of ``(K + 1) (n_layer + 1)`` one-position
    rows. ``causal_scale``: the edits' norm as a fraction of the residual's.
    ``group``: a torch.distributed process group (None = the default group under torchrun, else one
    process; see :mod:`reslens._distributed`): each rank reads every ``world``-th batch and causal
    position, and every rank returns the merged scores.
    """
    shard = shard_of(group)
    with shard.together():  # an argument refused on one rank is refused on every rank
        arch = adapter(model)
        labels, chosen = check_lenses(lenses, arch)
        check_int(batch_size, "batch_size", low=1)
        check_int(causal_positions, "causal_positions", low=0)
        check_float(causal_scale, "causal_scale", low=0.0, low_open=True)
        check_int(seed, "seed")
        check_bool(progress, "progress")
        windows = corpus_windows(arch, corpus, tokenizer, max_tokens, max_length)
    total = -(-len(windows) // batch_size)
    kept = tuple(range(arch.n_layer + 1))
    shard.same((kept, total, causal_positions), "the layers, batch count and causal positions")
    shard.same_model(arch, chosen)
    sums = read_bench(arch, batches(tokenizer, windows, batch_size), total, chosen, kept, progress, shard)
    stats = [acc.result(kept, QUANTILES, 1, label) for acc, label in zip(sums, labels)]
    for s in stats:
        bad = int(s.n_non_finite.sum())
        if bad and shard.primary:
            warnings.warn(f"compare_lenses: {bad} {s.lens_name} cells (layer, position) had non-finite "
                          "logits (NaN or inf) and are left out of its scores", RuntimeWarning, stacklevel=2)
    bins = torch.stack([acc.bins for acc in sums]).float()  # [K, R, N_BINS, 3]
    causal = dict.fromkeys(("causal_lens", "causal_random", "causal_win"))
    if causal_positions:
        cells = sample_positions(windows, tuple(start_ids(tokenizer)), causal_positions, seed)
        found = causal_check(arch, chosen, cells, windows, tuple(start_ids(tokenizer)), causal_scale, seed,
                             progress, shard)
        causal = dict(zip(causal, found.means()))
        causal_positions = found.n_edited
    return LensComparison(
        lenses=tuple(labels),
        layers=kept,
        kl_final_layer=torch.stack([s.mean.kl_final_layer for s in stats]),
        cross_entropy=torch.stack([-s.mean.target_logprob for s in stats]),
        top1_agreement=torch.stack([s.top1_agreement for s in stats]),
        n_tokens=stats[0].n_tokens,
        kl_layer_final=torch.stack([s.mean.kl_layer_final for s in stats]),
        calibration=expected_calibration_error(bins.double()).float(),
        calibration_bins=bins,
        **causal,
        causal_positions=causal_positions,
        causal_scale=float(causal_scale) if causal_positions else 0.0,
        causal_notes=tuple(_note(lens, causal_positions) for lens in chosen),
        lens_kinds=tuple(lens.kind for lens in chosen),
        model=model_name(arch),
        model_fingerprint=arch.fingerprint,
    )


def _note(lens: Any, positions: int) -> str:
    """What a reader should know about a lens's causal scores (empty: nothing)."""
    if not positions:
        return ""
    if lens.kind == "patchscope":
        return ("its direction is the gradient through the target prompt's run from the join layer on "
                "(exact, at one position's cost per layer)")
    return ""
