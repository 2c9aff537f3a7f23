"""The residual-vector PCA estimator (re-exported as :class:`reslens.pca.ResidualPCA`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator

from reslens._checks import check_bool, check_int

__all__ = ["ResidualPCA"]


class ResidualPCA(BaseEstimator):
    """PCA of residual vectors ``[n_samples, d_model]``, a scikit-learn estimator.

    ``center=True`` fits ``sklearn.decomposition.PCA`` (``IncrementalPCA`` with
    ``incremental=True``; :meth:`partial_fit` streams batches through ``IncrementalPCA`` in
    constant memory); ``center=False`` runs an SVD of the raw vectors (``mean_`` is zero).
    Learned state: ``components_ [k, d_model]`` (largest-magnitude loading positive),
    ``explained_variance_ [k]``, ``explained_variance_ratio_ [k]``, ``mean_ [d_model]`` (torch
    float32) and the fitted scikit-learn object ``estimator_`` (``None`` when uncentred).

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

    def _check_params(self) -> None:
        if self.n_components is not None:
            check_int(self.n_components, "n_components", low=1)
        check_bool(self.center, "center")
        check_bool(self.incremental, "incremental")
        if self.batch_size is not None:
            check_int(self.batch_size, "batch_size", low=1)

    @staticmethod
    def _check_x(x: Any, name: str = "x", min_samples: int = 2) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().float().cpu().numpy()
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a torch.Tensor or numpy array [n_samples, d_model]; "
                            f"got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D [n_samples, d_model]; got shape {tuple(x.shape)}")
        if x.shape[0] < min_samples:
            raise ValueError(f"{name} needs at least {min_samples} samples; got {x.shape[0]}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf (pad positions?); select real positions first")
        return x.astype(np.float64)

    def _sklearn(self, incremental: bool):
        from sklearn.decomposition import PCA, IncrementalPCA

        if incremental:
            return IncrementalPCA(n_components=self.n_components, batch_size=self.batch_size)
        return PCA(n_components=self.n_components, svd_solver="full")

    def fit(self, x: Any) -> ResidualPCA:
        """Learn the components of ``x: [n_samples, d_model]``; returns ``self``."""
        self._check_params()
        x = self._check_x(x)
        if self.n_components is not None and self.n_components > min(x.shape):
            raise ValueError(f"n_components={self.n_components} must be in 1..{min(x.shape)} "
                             f"for x of shape {x.shape}")
        if self.center:
            self.estimator_ = self._sklearn(self.incremental).fit(x)
            self._set_from_estimator()
        else:
            self.estimator_ = None
            _, s, vt = np.linalg.svd(x, full_matrices=False)
            k = self.n_components or len(s)
            var = s**2 / (x.shape[0] - 1)
            self._set(vt[:k], var[:k], (s**2 / (s**2).sum())[:k], np.zeros(x.shape[1]))
        return self

    def partial_fit(self, x: Any) -> ResidualPCA:
        """Update the fit with one batch ``[n_samples, d_model]`` (IncrementalPCA, centred only)."""
        self._check_params()
        if not self.center:
            raise ValueError("partial_fit needs center=True (it streams through IncrementalPCA)")
        x = self._check_x(x)
        from sklearn.decomposition import IncrementalPCA

        if getattr(self, "estimator_", None) is None:
            self.estimator_ = self._sklearn(incremental=True)
        elif not isinstance(self.estimator_, IncrementalPCA):
            raise ValueError("partial_fit continues an incremental fit; this ResidualPCA was fitted by fit() "
                             "with incremental=False (start a new one, or fit with incremental=True)")
        self.estimator_.partial_fit(x)
        self._set_from_estimator()
        return self

    def _set_from_estimator(self) -> None:
        e = self.estimator_
        self._set(e.components_, e.explained_variance_, e.explained_variance_ratio_, e.mean_)

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
        x = torch.from_numpy(self._check_x(x, "x", min_samples=1)).float()
        if x.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"x must be [n_samples, {self.mean_.shape[0]}]; got {tuple(x.shape)}")
        return (x - self.mean_) @ self.components_.T

    def inverse_transform(self, coords: Any) -> torch.Tensor:
        """Residual vectors ``[n_samples, d_model]`` from coordinates ``[n_samples, k]``."""
        self._check_fitted()
        coords = torch.as_tensor(coords).float()
        if coords.ndim != 2 or coords.shape[1] != self.n_components_:
            raise ValueError(f"coords must be [n_samples, {self.n_components_}]; got {tuple(coords.shape)}")
        return coords @ self.components_ + self.mean_
