"""The linear shortcut (Din et al. 2023, "Jump to Conclusions"): each layer mapped to the last, least squares.

:func:`fit_shortcut` streams a corpus once and keeps, per layer, the float64 mean of ``h`` and
centred sums of ``h h^T`` and ``h y^T`` (``y`` = the last raw residual, ``resid n_layer``) at every
real token: memory is ``n_layer x d_model^2 x 2`` float64 numbers, whatever the corpus. The map
is the closed-form ridge solution on the centred moments,

    A_l = C_yx (C_xx + ridge * tr(C_xx) / d_model * I)^-1,    b_l = mean(y) - A_l mean(h_l),

so ``ridge`` is relative to the residual's mean variance (``ridge=0`` is ordinary least squares
with an intercept, the paper's fit).
"""

from __future__ import annotations

from typing import Any

import torch

from reslens._checks import check_bool, check_float, check_int
from reslens.arch import adapter
from reslens.lenses._base import LinearShortcut
from reslens.lenses._data import corpus_windows, residual_batches

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

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight [L, d_out, d_in], bias [L, d])`` in float32 from the centred moments."""
        c_xx, c_xy = self.m2_xx / self.n, self.m2_xy / self.n
        d = c_xx.shape[-1]
        scale = torch.diagonal(c_xx, dim1=1, dim2=2).sum(-1) / d  # [L]: the mean variance
        eye = torch.eye(d, dtype=c_xx.dtype, device=c_xx.device)
        a_t = torch.linalg.solve(c_xx + ridge * scale[:, None, None] * eye, c_xy)  # [L, d_in, d_out] = A^T
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
) -> LinearShortcut:
    """Fit the linear shortcut of every layer ``0..n_layer-1`` to the last residual over ``corpus``.

    ``corpus``: a ``.txt`` file, a folder of them, a list of files or an iterable of strings,
    read as windows of ``max_length`` tokens until ``max_tokens`` real tokens (pads and special
    tokens never count). ``ridge``: relative ridge term (see the module docstring; default 1e-6,
    enough to keep a degenerate direction solvable). Shows a tqdm bar unless ``progress=False``.
    One forward per batch; the solve is one ``d_model x d_model`` system per layer.

    >>> import torch, reslens
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from reslens.lenses import fit_shortcut
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

    arch = adapter(model)
    check_int(max_tokens, "max_tokens", low=2)
    check_float(ridge, "ridge", low=0.0)
    check_bool(progress, "progress")
    windows = corpus_windows(arch, corpus, tokenizer, max_tokens, max_length)
    moments = ShortcutMoments(arch.n_layer, arch.d_model, arch.device)
    with tqdm(
        total=sum(map(len, windows)),
        desc="linear shortcut",
        unit="tok",
        unit_scale=True,
        disable=not progress,
    ) as bar:
        for resid in residual_batches(arch, windows, batch_size):
            moments.add(resid)
            bar.update(resid.shape[1])
    if moments.n <= arch.d_model:
        raise ValueError(
            f"the corpus gave {moments.n} tokens; fitting a {arch.d_model}-wide map needs more than "
            f"d_model={arch.d_model} (raise max_tokens or give more text)"
        )
    weight, bias = moments.solve(ridge)
    config = {
        "model": getattr(arch.model.config, "name_or_path", "") or type(arch.model).__name__,
        "n_tokens": moments.n,
        "ridge": ridge,
        "max_length": max_length,
        "fit": "least squares (Din et al.)",
    }
    return LinearShortcut(weight, bias, config)
