"""The linear shortcut (Din et al. 2023, "Jump to Conclusions"): each layer mapped to the last, least squares.

:func:`fit_shortcut` streams a corpus once and keeps, per layer, the float64 mean of ``h`` and
centred sums of ``h h^T`` and ``h y^T`` (``y`` = the last raw residual, ``resid n_layer``) at every
real token: memory is ``n_layer x d_model^2 x 2`` float64 numbers, whatever the corpus. The map
is the closed-form ridge solution on the centred moments,

    A_l = C_yx (C_xx + ridge * tr(C_xx) / d_model * I)^-1,    b_l = mean(y) - A_l mean(h_l),

so ``ridge`` is relative to the residual's mean variance (``ridge=0`` is ordinary least squares
with an intercept, the paper's fit).

Under a process group (``group=``, see :mod:`reslens._distributed`) rank ``r`` reads the batches
numbered ``i`` with ``i % world == r`` and the ranks' moments are merged exactly (the many-way form
of the same update, :meth:`ShortcutMoments.merge`), so every rank fits the one-process map.
"""

from __future__ import annotations

from typing import Any

import torch

from reslens._checks import check_bool, check_float, check_int
from reslens._distributed import Shard, shard_of
from reslens._stream import chunks
from reslens._text import html_table
from reslens.arch import adapter
from reslens.lens.values import LinearShortcut
from reslens.lens._data import corpus_windows, model_name, residual_batches

__all__ = ["fit_shortcut", "ShortcutMoments"]


class ShortcutMoments:
    """Running moments for each layer's least-squares map to the last residual, merged exactly.

    Each batch's products are taken about the batch's own mean (float32 matrix products, no
    cancellation) and merged into float64 totals with Chan et al.'s pairwise update, so large
    residual means (Llama's massive activations) cost no precision.
    """

    def __init__(self, n_layer: int, d_model: int, device: Any = "cpu") -> None:
        f64 = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.mean_x = torch.zeros(n_layer, d_model, **f64)  # [L, d]
        self.mean_y = torch.zeros(d_model, **f64)  # [d]
        self.m2_xx = torch.zeros(n_layer, d_model, d_model, **f64)  # [L, d, d]: sum (x - mean)(x - mean)^T
        self.m2_xy = torch.zeros(n_layer, d_model, d_model, **f64)  # [L, d_in, d_out]

    def __repr__(self) -> str:
        n_layer, d_model = self.mean_x.shape
        return f"ShortcutMoments(n_layer={n_layer}, d_model={d_model}, tokens={self.n})"

    def _repr_html_(self) -> str:
        n_layer, d_model = self.mean_x.shape
        rows = [("layers", n_layer), ("d_model", d_model), ("tokens", self.n),
                ("‖mean of the last residual‖", float(self.mean_y.norm()))]
        return html_table(repr(self), (), rows)

    def add(self, resid: torch.Tensor) -> None:
        """Add ``resid: [n_layer + 1, tokens, d_model]`` (the last layer is the target)."""
        n_b = resid.shape[1]
        if n_b == 0:
            return
        x, y = resid[:-1].float(), resid[-1].float()  # [L, N, d], [N, d]
        mean_xb, mean_yb = x.double().mean(1), y.double().mean(0)
        xc, yc = x - mean_xb.float()[:, None], y - mean_yb.float()
        m2_xx, m2_xy = (xc.transpose(1, 2) @ xc).double(), (xc.transpose(1, 2) @ yc).double()
        n_a, n = self.n, self.n + n_b
        dx, dy = mean_xb - self.mean_x, mean_yb - self.mean_y  # [L, d], [d]
        w = n_a * n_b / n
        self.m2_xx += m2_xx + w * dx[:, :, None] * dx[:, None, :]
        self.m2_xy += m2_xy + w * dx[:, :, None] * dy[None, None, :]
        self.mean_x += dx * (n_b / n)
        self.mean_y += dy * (n_b / n)
        self.n = n

    def merge(self, shard: Shard) -> None:
        """Make these the moments of every rank's tokens (the same on every rank; nothing alone).

        The many-way Chan update with float64 all-reduces: ``n = sum n_r``, ``mean = sum n_r mean_r / n``
        and ``m2 = sum_r [m2_r + n_r (mean_r - mean)(mean_r - mean)^T]`` (``h y^T`` alike), each rank
        adding its own term about the merged mean: no cancellation, whatever the ranks' means.
        """
        if not shard.parallel:
            return
        n_layer, d = self.mean_x.shape
        n_r = float(self.n)
        first = torch.cat([torch.tensor([n_r], dtype=torch.float64, device=self.mean_x.device),
                           (n_r * self.mean_x).flatten(), n_r * self.mean_y])
        first = shard.sum(first)
        n = first[0]
        if float(n) == 0:
            return
        mean_x, mean_y = (first[1 : 1 + n_layer * d] / n).view(n_layer, d), first[1 + n_layer * d :] / n
        dx, dy = self.mean_x - mean_x, self.mean_y - mean_y  # [L, d], [d]
        m2_xx = self.m2_xx + n_r * dx[:, :, None] * dx[:, None, :]
        m2_xy = self.m2_xy + n_r * dx[:, :, None] * dy[None, None, :]
        both = shard.sum(torch.stack([m2_xx, m2_xy]))
        self.m2_xx, self.m2_xy = both[0], both[1]
        self.mean_x, self.mean_y, self.n = mean_x, mean_y, int(round(float(n)))

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight [L, d_out, d_in], bias [L, d])`` in float32 from the centred moments."""
        c_xx, c_xy = self.m2_xx / self.n, self.m2_xy / self.n
        d = c_xx.shape[-1]
        scale = torch.diagonal(c_xx, dim1=1, dim2=2).sum(-1) / d  # [L]: the mean variance
        constant = [int(i) for i in (scale <= 0).nonzero().flatten()]
        if constant:
            raise ValueError(
                f"the residual at layer(s) {constant} is the same at all {self.n} tokens of the corpus "
                "(variance 0): no map can be fitted from it; expected a corpus whose tokens vary there "
                "(more, or more varied, text)"
            )
        eye = torch.eye(d, dtype=c_xx.dtype, device=c_xx.device)
        # One solve per layer: torch 2.13's CPU build fails batched float64 solves of this size on 2 threads
        # (oneMKL "Parameter 6 was incorrect on entry to DLASWP"); single ones are fine.
        regular = c_xx + ridge * scale[:, None, None] * eye
        try:
            a_t = torch.stack([torch.linalg.solve(regular[i], c_xy[i]) for i in range(len(c_xx))])  # A^T
        except torch.linalg.LinAlgError as error:
            raise ValueError(f"ridge={ridge}: a layer's residual covariance is singular over this corpus "
                             f"({error}); expected ridge > 0 (the default is 1e-6)") from None
        weight = a_t.transpose(1, 2)
        bias = self.mean_y[None] - (weight @ self.mean_x[:, :, None])[..., 0]
        return weight.float().cpu(), bias.float().cpu()


def fit_shortcut(
    model: Any,
    corpus: Any,
    *,
    tokenizer: Any = None,
    max_tokens: int = 200_000,
    max_length: int = 128,
    batch_size: int = 8,
    ridge: float = 1e-6,
    progress: bool = True,
    group: Any = None,
) -> LinearShortcut:
    """Fit the linear shortcut of every layer ``0..n_layer-1`` to the last residual over ``corpus``.

    ``corpus``: a ``.txt`` file, a folder of them, a list of files or an iterable of strings,
    read as windows of ``max_length`` tokens until ``max_tokens`` real tokens, each led by the
    tokenizer's start tokens (a BOS where it adds one), which like pads are never fitted on (see
    :mod:`reslens._stream`). ``ridge``: relative ridge term (see the module docstring; default 1e-6,
    enough to keep a degenerate direction solvable). Shows a tqdm bar unless ``progress=False``.
    One forward per batch; the solve is one ``d_model x d_model`` system per layer.
    ``group``: a torch.distributed process group; None = the default group under torchrun, else
    one process; see :mod:`reslens._distributed`. Each rank reads every ``world``-th batch and
    every rank returns the merged fit (the one-process fit up to float64 rounding).

    >>> import torch, reslens
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from reslens.lens import fit_shortcut
    >>> _ = torch.manual_seed(0)
    >>> config = GPT2Config(n_layer=2, hidden_size=8, n_head=2, vocab_size=40, bos_token_id=0, eos_token_id=0)
    >>> model = GPT2LMHeadModel(config).eval()
    >>> class Chars:  # a toy tokenizer: one id per character
    ...     def __call__(self, texts, add_special_tokens=False):
    ...         return {"input_ids": [[ord(c) % 40 for c in t] for t in texts]}
    >>> shortcut = fit_shortcut(model, ["the quick brown fox " * 20], tokenizer=Chars(), progress=False)
    >>> shortcut, tuple(shortcut.weight.shape)
    (LinearShortcut(n_layer=2, d_model=8, model=GPT2LMHeadModel, n_tokens=400), (2, 8, 8))
    """
    from tqdm.auto import tqdm

    shard = shard_of(group)
    with shard.together():  # an argument refused on one rank is refused on every rank
        arch = adapter(model)
        check_int(max_tokens, "max_tokens", low=2)
        check_float(ridge, "ridge", low=0.0)
        check_bool(progress, "progress")
        check_int(batch_size, "batch_size", low=1)
        windows = corpus_windows(arch, corpus, tokenizer, max_tokens, max_length)
    shard.same((len(windows), batch_size, ridge), "the number of windows, batch_size and ridge")
    shard.same_model(arch)
    mine = sum(len(w) for _, chunk in shard.take(chunks(windows, batch_size)) for w in chunk)
    moments = ShortcutMoments(arch.n_layer, arch.d_model, arch.device)
    with shard.together(), tqdm(total=mine, desc="linear shortcut", unit="tok", unit_scale=True,
                                disable=not progress or not shard.primary) as bar:
        for resid in residual_batches(arch, tokenizer, windows, batch_size, shard):
            moments.add(resid)
            bar.update(resid.shape[1])
    moments.merge(shard)
    if moments.n <= arch.d_model:
        raise ValueError(
            f"the corpus gave {moments.n} tokens; fitting a {arch.d_model}-wide map needs more than "
            f"d_model={arch.d_model} (raise max_tokens or give more text)"
        )
    weight, bias = moments.solve(ridge)
    config = {
        "model": model_name(arch),
        "model_fingerprint": arch.fingerprint,
        "n_tokens": moments.n,
        "ridge": ridge,
        "max_length": max_length,
        "fit": "least squares (Din et al.)",
    }
    return LinearShortcut(weight, bias, config)
