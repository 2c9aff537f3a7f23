"""Principal components of the residual stream.

- :class:`ResidualPCA`: variance directions over many residual vectors, with scikit-learn
  estimator conventions (built on ``sklearn.decomposition.PCA`` / ``IncrementalPCA``).
- :func:`trajectory_pca`: for each prediction, PCA across layers of that position's
  residual stack ``[layers, d_model]``, batched as one torch SVD over all examples.
- :func:`pca_experiment`: the "one direction is the prediction" experiment with its controls
  (norm growth, ``ln_f``, centring, the embedding row, a random direction).

Sign convention (everywhere): each component's sign is chosen so that the stack's last row
(minus the mean when centred) has a non-negative coordinate on it — PC1 points along where
the residual ends up.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from reslens._checks import check_layers
from reslens._gpt2 import GPT2
from reslens.hooks import Batch, as_batch, capture, pad_ids, pad_token_id

__all__ = ["ResidualPCA", "TrajectoryPCAResult", "trajectory_pca", "PCAExperiment", "pca_experiment", "NORMALIZE"]

NORMALIZE = (None, "unit", "ln_f")


# --- data-set-scale variance directions ----------------------------------------------------


class ResidualPCA:
    """PCA of residual vectors ``[n_samples, d_model]`` (scikit-learn conventions).

    ``center=True`` uses ``sklearn.decomposition.PCA`` (or ``IncrementalPCA`` with
    ``incremental=True`` / :meth:`partial_fit`, constant memory); ``center=False`` runs an SVD
    of the raw vectors (``mean_`` is zero). Learned state: ``components_ [k, d_model]`` (rows
    with deterministic signs: largest-magnitude loading positive), ``explained_variance_ [k]``,
    ``explained_variance_ratio_ [k]``, ``mean_ [d_model]`` — torch float32 tensors.

    >>> import torch
    >>> x = torch.randn(200, 8) @ torch.diag(torch.tensor([5.0, 2, 1, 1, 1, 1, 1, 1]))
    >>> pca = ResidualPCA(n_components=2).fit(x)
    >>> tuple(pca.components_.shape), bool(pca.explained_variance_ratio_[0] > 0.5)
    ((2, 8), True)
    """

    def __init__(self, n_components: int | None = None, *, center: bool = True, incremental: bool = False,
                 batch_size: int | None = None):
        self.n_components = n_components
        self.center = center
        self.incremental = incremental
        self.batch_size = batch_size

    # scikit-learn style parameter access
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"n_components": self.n_components, "center": self.center, "incremental": self.incremental,
                "batch_size": self.batch_size}

    def _check_x(self, x: Any, name: str = "x") -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().float().cpu().numpy()
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a torch.Tensor or numpy array [n_samples, d_model]; got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D [n_samples, d_model]; got shape {tuple(x.shape)}")
        if x.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 samples; got {x.shape[0]}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf (pad positions?); select real positions first")
        return x.astype(np.float64)

    def _sklearn(self):
        from sklearn.decomposition import PCA, IncrementalPCA

        if self.incremental:
            return IncrementalPCA(n_components=self.n_components, batch_size=self.batch_size)
        return PCA(n_components=self.n_components, svd_solver="full")

    def fit(self, x: Any) -> ResidualPCA:
        """Learn the components of ``x: [n_samples, d_model]``; returns ``self``."""
        x = self._check_x(x)
        if self.n_components is not None and not 1 <= self.n_components <= min(x.shape):
            raise ValueError(f"n_components={self.n_components} must be in 1..{min(x.shape)} for x of shape {x.shape}")
        if self.center:
            self._model = self._sklearn().fit(x)
            self._set(self._model.components_, self._model.explained_variance_, self._model.explained_variance_ratio_,
                      self._model.mean_)
        else:
            _, s, vt = np.linalg.svd(x, full_matrices=False)
            k = self.n_components or len(s)
            var = s**2 / (x.shape[0] - 1)
            self._set(vt[:k], var[:k], (s**2 / (s**2).sum())[:k], np.zeros(x.shape[1]))
        return self

    def partial_fit(self, x: Any) -> ResidualPCA:
        """Update the fit with one batch ``[n_samples, d_model]`` (IncrementalPCA, centred only)."""
        if not self.center:
            raise ValueError("partial_fit needs center=True (it streams through IncrementalPCA)")
        x = self._check_x(x)
        if not hasattr(self, "_model"):
            self.incremental = True
            self._model = self._sklearn()
        self._model.partial_fit(x)
        self._set(self._model.components_, self._model.explained_variance_, self._model.explained_variance_ratio_,
                  self._model.mean_)
        return self

    def _set(self, components, variance, ratio, mean) -> None:
        components = np.array(components, dtype=np.float64)
        flip = np.sign(components[np.arange(len(components)), np.abs(components).argmax(1)])
        components *= np.where(flip == 0, 1, flip)[:, None]
        self.components_ = torch.from_numpy(components).float()
        self.explained_variance_ = torch.from_numpy(np.asarray(variance, dtype=np.float64)).float()
        self.explained_variance_ratio_ = torch.from_numpy(np.asarray(ratio, dtype=np.float64)).float()
        self.mean_ = torch.from_numpy(np.asarray(mean, dtype=np.float64)).float()
        self.n_components_ = len(components)

    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this ResidualPCA is not fitted yet; call fit(x) first")

    def transform(self, x: Any) -> torch.Tensor:
        """Coordinates ``[n_samples, k]`` of ``x: [n_samples, d_model]`` on the components."""
        self._check_fitted()
        x = torch.as_tensor(self._check_x(x, "x") if not isinstance(x, torch.Tensor) else x.detach().cpu()).float()
        if x.ndim != 2 or x.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"x must be [n_samples, {self.mean_.shape[0]}]; got {tuple(x.shape)}")
        return (x - self.mean_) @ self.components_.T

    def inverse_transform(self, coords: Any) -> torch.Tensor:
        """Residual vectors ``[n_samples, d_model]`` from coordinates ``[n_samples, k]``."""
        self._check_fitted()
        coords = torch.as_tensor(coords).float()
        if coords.ndim != 2 or coords.shape[1] != self.n_components_:
            raise ValueError(f"coords must be [n_samples, {self.n_components_}]; got {tuple(coords.shape)}")
        return coords @ self.components_ + self.mean_


# --- PCA across layers of one prediction ---------------------------------------------------


@dataclass(frozen=True)
class TrajectoryPCAResult:
    """PCA across layers of each example's residual stack. ``E`` = examples, ``K`` = components.

    - ``seq``, ``pos``: ``[E]`` where each example sits in the batch
    - ``explained_variance_ratio: [E, K]``; ``pc1: [E, d_model]`` (sign: along the last row)
    - ``final_prediction: [E]``: the model's own top-1 token at that position
    - ``pc1_top_token``, ``pc1_final_rank: [E]``: PC1 read through ``ln_f`` and the unembedding
      (top token; rank of the final prediction, 0 = top); ``pc1_top_token_raw``,
      ``pc1_final_rank_raw``: PC1 through the unembedding alone; ``pc1_top_token_flipped``:
      ``-PC1`` through ``ln_f`` and the unembedding (a component's sign is a convention)
    - ``layers``: the residual layers stacked; ``center``, ``normalize``: how
    """

    seq: torch.Tensor
    pos: torch.Tensor
    explained_variance_ratio: torch.Tensor
    pc1: torch.Tensor
    final_prediction: torch.Tensor
    pc1_top_token: torch.Tensor
    pc1_final_rank: torch.Tensor
    pc1_top_token_raw: torch.Tensor
    pc1_final_rank_raw: torch.Tensor
    pc1_top_token_flipped: torch.Tensor
    layers: tuple[int, ...]
    center: bool
    normalize: str | None

    def __post_init__(self) -> None:
        n = self.seq.shape[0]
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.shape[0] != n:
                raise ValueError(f"{f.name} has {value.shape[0]} rows; expected {n} examples")

    @property
    def match(self) -> torch.Tensor:
        """``[E]`` bool: PC1's top token (through ``ln_f``) is the model's final prediction."""
        return self.pc1_top_token == self.final_prediction

    @property
    def match_raw(self) -> torch.Tensor:
        """``[E]`` bool: the same without ``ln_f``."""
        return self.pc1_top_token_raw == self.final_prediction

    def to_frame(self):
        """``pandas.DataFrame``: one row per example."""
        import pandas as pd

        frame = pd.DataFrame({
            "seq": self.seq.numpy(), "pos": self.pos.numpy(),
            "pc1_evr": self.explained_variance_ratio[:, 0].numpy(),
            "final_prediction": self.final_prediction.numpy(),
            "pc1_top_token": self.pc1_top_token.numpy(), "match": self.match.numpy(),
            "pc1_final_rank": self.pc1_final_rank.numpy(),
            "pc1_top_token_raw": self.pc1_top_token_raw.numpy(), "match_raw": self.match_raw.numpy(),
            "pc1_final_rank_raw": self.pc1_final_rank_raw.numpy(),
        })
        return frame


def _rank_of(logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """0-based rank of ``token: [E]`` in ``logits: [E, vocab]`` (count of strictly larger)."""
    return (logits > logits.gather(1, token[:, None])).sum(-1)


def _batched_pca(g: GPT2, stacks: torch.Tensor, *, center: bool, normalize: str | None):
    """PCA of each example's ``stacks: [E, L, d_model]`` -> explained variance ratios
    ``[E, K]`` and components ``[E, K, d_model]`` (signed along the last row)."""
    x = stacks.float()
    if normalize == "unit":
        x = x / x.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
    elif normalize == "ln_f":
        x = g.apply_ln_f(x.to(g.dtype)).float()
    if center:
        x = x - x.mean(dim=1, keepdim=True)
    # SVD through the small Gram matrix [E, L, L] in float64 (L = layers, a dozen or so):
    # one batched eigh instead of E SVDs of [L, d_model].
    x64 = x.double()
    power, u = torch.linalg.eigh(x64 @ x64.transpose(1, 2))  # ascending
    power, u = power.flip(-1).clamp(min=0), u.flip(-1)  # [E, K], [E, L, K]
    s = power.sqrt()
    vh = ((u.transpose(1, 2) @ x64) / torch.where(s > 0, s, 1.0)[..., None]).float()  # [E, K, d_model]
    ratio = (power / power.sum(-1, keepdim=True).clamp(min=torch.finfo(power.dtype).tiny)).float()
    # Sign: the last row's coordinate on each component is non-negative.
    last = torch.einsum("ekd,ed->ek", vh, x[:, -1])
    return ratio, vh * torch.where(last < 0, -1.0, 1.0)[..., None]


def _readout(g: GPT2, direction: torch.Tensor, final_prediction: torch.Tensor) -> dict[str, torch.Tensor]:
    """A direction per example ``[E, d_model]`` read in the vocabulary: through ``ln_f`` and
    the unembedding, through the unembedding alone, and reversed."""
    with torch.no_grad():
        d = direction.to(g.dtype)
        logits = g.unembed(g.apply_ln_f(d)).float()  # [E, vocab]
        logits_raw = (d @ g.W_U.T).float()
        flipped = g.unembed(g.apply_ln_f(-d)).float()
    return {
        "pc1": direction,
        "pc1_top_token": logits.argmax(-1),
        "pc1_final_rank": _rank_of(logits, final_prediction),
        "pc1_top_token_raw": logits_raw.argmax(-1),
        "pc1_final_rank_raw": _rank_of(logits_raw, final_prediction),
        "pc1_top_token_flipped": flipped.argmax(-1),
    }


def _stack_pca(g: GPT2, stacks: torch.Tensor, final_prediction: torch.Tensor, *, center: bool,
               normalize: str | None) -> dict[str, torch.Tensor]:
    """Batched PCA of ``stacks: [E, L, d_model]`` and PC1 read in the vocabulary."""
    ratio, components = _batched_pca(g, stacks, center=center, normalize=normalize)
    return {"explained_variance_ratio": ratio, **_readout(g, components[:, 0], final_prediction)}


def _positions(positions: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seq, pos)`` index pairs ``[E]`` of the chosen prediction positions."""
    mask = batch.attention_mask.cpu()
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # last real position per sequence
    if isinstance(positions, str):
        if positions == "last":
            return torch.arange(mask.shape[0]), last
        if positions == "all":
            return mask.nonzero(as_tuple=True)
        raise ValueError(f"positions must be 'last', 'all', an int or a [batch] tensor; got {positions!r}")
    if isinstance(positions, int) and not isinstance(positions, bool):
        positions = torch.full((mask.shape[0],), positions)
    positions = torch.as_tensor(positions)
    if positions.ndim != 1 or positions.shape[0] != mask.shape[0] or positions.dtype.is_floating_point:
        raise ValueError(f"positions must hold one int per sequence ({mask.shape[0]}); got shape {tuple(positions.shape)}")
    positions = torch.where(positions < 0, positions + mask.shape[1], positions)
    seq = torch.arange(mask.shape[0])
    bad = (positions < 0) | (positions >= mask.shape[1])
    bad[~bad] = ~mask[seq[~bad], positions[~bad]]
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"positions[{i}]={int(positions[i])} is not a real token of sequence {i} "
                         f"(its real positions are {mask[i].nonzero().flatten().tolist()})")
    return seq, positions


def trajectory_pca(
    model: Any,
    inputs: Any,
    *,
    tokenizer: Any = None,
    positions: Any = "last",
    layers: Any = None,
    center: bool = True,
    normalize: str | None = None,
) -> TrajectoryPCAResult:
    """For each prediction, PCA across layers of that position's residual stack.

    ``positions``: ``"last"`` (each sequence's last real token), ``"all"``, an int, or one int
    per sequence. ``layers``: residual layers to stack (default all ``n_layer + 1``, embedding
    included). ``normalize``: None, ``"unit"`` (each layer's vector scaled to norm 1, removing
    norm growth) or ``"ln_f"`` (``ln_f`` applied to each). One batched torch SVD.

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50)).eval()
    >>> r = trajectory_pca(model, torch.tensor([[1, 2, 3], [4, 5, 6]]))
    >>> tuple(r.explained_variance_ratio.shape), tuple(r.pc1.shape)
    ((2, 4), (2, 16))
    """
    g = GPT2(model)
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}; got {normalize!r}")
    if not isinstance(center, bool):
        raise TypeError(f"center must be True or False; got {center!r}")
    kept = check_layers(layers, g.n_layer, what=f"a {g.n_layer}-layer model's residual stream")
    if len(kept) < 2:
        raise ValueError(f"layers={list(kept)}: a trajectory needs at least 2 layers")
    batch = as_batch(inputs, g, tokenizer)
    seq, pos = _positions(positions, batch)
    res = capture(model, batch, sites=("resid", "final"), layers=sorted({*kept, g.n_layer}))
    stacks = torch.stack([res.get("resid", layer) for layer in kept], dim=2)  # [B, P, L, d_model]
    stacks = stacks[seq.to(stacks.device), pos.to(stacks.device)]  # [E, L, d_model]
    final_prediction = g.unembed(res.final[seq, pos]).float().argmax(-1)
    out = _stack_pca(g, stacks, final_prediction, center=center, normalize=normalize)
    return TrajectoryPCAResult(
        seq=seq, pos=pos, final_prediction=final_prediction.cpu(), layers=kept, center=center, normalize=normalize,
        **{k: v.detach().cpu() for k, v in out.items()},
    )


# --- the experiment -------------------------------------------------------------------------


#: (name, description, keyword arguments) of each condition; "all" = embedding included.
CONDITIONS = (
    ("baseline", "centred raw residuals, all layers (embedding included)", dict()),
    ("no_embedding", "centred raw residuals, block outputs only (layers 1..n)", dict(skip_embedding=True)),
    ("uncentred", "raw residuals without centring", dict(center=False)),
    ("unit_norm", "each layer's residual scaled to norm 1 (removes norm growth)", dict(normalize="unit")),
    ("ln_f", "ln_f applied to each layer's residual", dict(normalize="ln_f")),
    ("random", "a random unit direction instead of PC1 (chance baseline)", dict(random=True)),
)


@dataclass(frozen=True)
class PCAExperiment:
    """The "one direction is the prediction" experiment over ``n`` sampled predictions.

    ``results[condition]`` holds per-example arrays as a :class:`TrajectoryPCAResult`-like
    dict (``explained_variance_ratio [n, K]``, ``match [n]``, ``match_raw [n]``,
    ``pc1_final_rank [n]``); ``examples`` the (window, position) of each prediction.
    """

    n: int
    seed: int
    n_layer: int
    results: dict[str, dict[str, torch.Tensor]]
    examples: torch.Tensor  # [n, 2]

    def summary(self):
        """``pandas.DataFrame``: one row per condition (mean and std of PC1's explained
        variance, match rates with and without ``ln_f``, median rank of the final prediction)."""
        import pandas as pd

        rows = []
        for name, description, _ in CONDITIONS:
            r = self.results[name]
            evr = r["explained_variance_ratio"][:, 0].double()
            rows.append({
                "condition": name,
                "pc1_evr_mean": float(evr.mean()), "pc1_evr_std": float(evr.std()),
                "match_rate": float(r["match"].double().mean()),
                "match_rate_raw": float(r["match_raw"].double().mean()),
                "match_rate_flipped": float(r["match_flipped"].double().mean()),
                "median_final_rank": float(r["pc1_final_rank"].double().median()),
                "description": description,
            })
        return pd.DataFrame(rows)

    def table(self) -> str:
        """The summary as text."""
        head = (f"{'condition':<13} {'PC1 var (mean ± std)':>21} {'top-1 = final':>13} {'(no ln_f)':>10} "
                f"{'(-PC1)':>7} {'med rank':>9}")
        lines = [f"{self.n} predictions, {self.n_layer}-layer model, seed {self.seed}", head, "-" * len(head)]
        for row in self.summary().itertuples():
            lines.append(f"{row.condition:<13} {row.pc1_evr_mean:>12.3f} ± {row.pc1_evr_std:<6.3f} "
                         f"{row.match_rate:>13.3f} {row.match_rate_raw:>10.3f} {row.match_rate_flipped:>7.3f} "
                         f"{row.median_final_rank:>9.0f}")
        return "\n".join(lines)

    def to_frame(self):
        """Long form: one row per (condition, example)."""
        import pandas as pd

        frames = []
        for name, _, _ in CONDITIONS:
            r = self.results[name]
            frames.append(pd.DataFrame({
                "condition": name, "window": self.examples[:, 0].numpy(), "pos": self.examples[:, 1].numpy(),
                "pc1_evr": r["explained_variance_ratio"][:, 0].numpy(), "match": r["match"].numpy(),
                "match_raw": r["match_raw"].numpy(), "match_flipped": r["match_flipped"].numpy(),
                "pc1_final_rank": r["pc1_final_rank"].numpy(),
            }))
        return pd.concat(frames, ignore_index=True)

    def plot(self, *, ax=None, conditions: tuple[str, ...] = ("baseline", "no_embedding", "unit_norm")):
        """Explained-variance ratio per component (mean with 10-90% band), like the seed's figure."""
        from reslens.plot import plot_pca_experiment

        return plot_pca_experiment(self, ax=ax, conditions=conditions)

    def __repr__(self) -> str:
        return f"PCAExperiment(n={self.n}, conditions={[c for c, _, _ in CONDITIONS]})"


def _sample_windows(tokenizer: Any, texts: Any, n: int, seed: int, max_length: int, min_context: int):
    """``n`` distinct (window, position) predictions sampled from the texts' token windows."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a string or a list of strings")
    windows = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        windows.extend(ids[i : i + max_length] for i in range(0, len(ids), max_length))
    candidates = [(w, p) for w, ids in enumerate(windows) for p in range(min_context, len(ids))]
    if not candidates:
        raise ValueError(f"texts hold no position with at least {min_context} tokens of context; give longer texts")
    if n > len(candidates):
        raise ValueError(f"n={n} is larger than the {len(candidates)} prediction positions available in texts")
    chosen = sorted(random.Random(seed).sample(candidates, n))
    return windows, chosen


def pca_experiment(
    model: Any,
    tokenizer: Any,
    texts: Any,
    *,
    n: int = 200,
    seed: int = 0,
    max_length: int = 128,
    min_context: int = 8,
    batch_size: int = 16,
    progress: bool = True,
) -> PCAExperiment:
    """Sample ``n`` prediction positions from ``texts`` (windows of ``max_length`` tokens, at
    least ``min_context`` tokens in), run PCA across layers of each one's residual stack, and
    compare conditions (see ``CONDITIONS``). Residuals are captured once per window batch."""
    from tqdm.auto import tqdm

    g = GPT2(model)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    max_length = min(max_length, g.n_positions)
    windows, chosen = _sample_windows(tokenizer, texts, n, seed, max_length, min_context)
    by_window: dict[int, list[int]] = {}
    for w, p in chosen:
        by_window.setdefault(w, []).append(p)
    order = sorted(by_window)
    stacks, finals = [], []
    pad_id = pad_token_id(tokenizer)
    for start in tqdm(range(0, len(order), batch_size), desc="pca residuals", unit="batch", disable=not progress):
        group = order[start : start + batch_size]
        res = capture(model, pad_ids([windows[w] for w in group], pad_id=pad_id), sites=("resid", "final"))
        seq = torch.tensor([row for row, w in enumerate(group) for _ in by_window[w]])
        pos = torch.tensor([p for w in group for p in by_window[w]])
        stacks.append(res.resid[:, seq, pos].transpose(0, 1))  # [e, n_layer + 1, d_model]
        finals.append(g.unembed(res.final[seq, pos]).float().argmax(-1))
    stacks_all, final_prediction = torch.cat(stacks), torch.cat(finals)

    results = {}
    gen = torch.Generator().manual_seed(seed)
    for name, _, options in CONDITIONS:
        x = stacks_all[:, 1:] if options.get("skip_embedding") else stacks_all
        out = _stack_pca(g, x, final_prediction, center=options.get("center", True), normalize=options.get("normalize"))
        if options.get("random"):
            out = _random_direction(g, x, final_prediction, gen)
        out["match"] = out["pc1_top_token"] == final_prediction
        out["match_raw"] = out["pc1_top_token_raw"] == final_prediction
        out["match_flipped"] = out["pc1_top_token_flipped"] == final_prediction
        results[name] = {k: v.detach().cpu() for k, v in out.items() if k != "pc1"}
    return PCAExperiment(n=n, seed=seed, n_layer=g.n_layer, results=results, examples=torch.tensor(chosen))


def _random_direction(g: GPT2, stacks: torch.Tensor, final_prediction: torch.Tensor, gen: torch.Generator):
    """Chance baseline: a random unit direction per example, sign-aligned like PC1; its
    'explained variance' is the share of the centred stack's variance along it."""
    x = stacks.float() - stacks.float().mean(dim=1, keepdim=True)
    direction = torch.randn(x.shape[0], x.shape[2], generator=gen).to(x.device)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    direction = direction * torch.where((direction * x[:, -1]).sum(-1) < 0, -1.0, 1.0)[:, None]
    share = (x @ direction[..., None]).squeeze(-1).pow(2).sum(-1) / x.pow(2).sum((1, 2)).clamp(min=1e-30)
    return {"explained_variance_ratio": share[:, None], **_readout(g, direction, final_prediction)}
