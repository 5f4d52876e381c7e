"""Multivariate Gaussian statistics of deep features (Rippel et al., ICPR 2020).

The model of normal data is one Gaussian per feature stage: the mean and a
Ledoit-Wolf shrunk covariance (their Eq. 6) of the pooled features, and the
anomaly score is the Mahalanobis distance (their Eq. 2), **not squared**, so
that the scores of several stages add up as in their "sum" mode.

Optional reductions before the fit (their Sec. V-A):

* ``"pca"`` keeps the leading principal components that carry ``variance`` of
  the total (e.g. 0.99);
* ``"npca"`` ("negated PCA") keeps the trailing components whose share of the
  total variance is at most ``variance`` (e.g. 0.01) — directions along which
  normal data barely varies, where anomalies tend to show.

If normal features were Gaussian, the squared distance of a normal sample is
chi-square distributed with ``dof`` = dimension, which gives a threshold for a
target false-positive rate without any anomalies (their Eq. 8):
:func:`chi2_threshold`.

Everything is computed in float64; inputs are ``(N, D)`` arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2

# Eigenvalues below this fraction of the largest are treated as exactly zero
# when the covariance is formed, so rounding noise never becomes a "direction".
_RELATIVE_EIGEN_FLOOR = 1e-12


def _as_float64(features: np.ndarray, name: str = "features") -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {array.shape}")
    if array.shape[0] < 2:
        raise ValueError(f"a Gaussian needs at least 2 samples, got {array.shape[0]}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return array


# --------------------------------------------------------------------------- covariance


@dataclass(frozen=True)
class ShrunkCovariance:
    """Ledoit-Wolf estimate: ``mean`` (D,), ``covariance`` (D, D), ``shrinkage`` rho in [0, 1].

    ``covariance = (1 - rho) * S + rho * trace(S) / D * I`` with ``S`` the
    maximum-likelihood (divide by N) sample covariance.
    """

    mean: np.ndarray
    covariance: np.ndarray
    shrinkage: float


@dataclass(frozen=True)
class _Spectrum:
    """Non-zero part of the scatter matrix ``C^T C`` of centred (N, D) data.

    ``values`` (r,) ascending and positive, ``vectors`` (D, r) orthonormal
    columns; the other D - r eigenvalues are exactly zero (r <= N - 1).
    """

    values: np.ndarray
    vectors: np.ndarray
    n: int
    dims: int


def _scatter_spectrum(centred: np.ndarray) -> _Spectrum:
    """Eigen-decomposition of ``C^T C``, via the smaller of the (D, D) and (N, N) Gram matrices.

    Deep features often have more dimensions than there are normal images
    (1280 vs. ~200 for a pooled EfficientNet vector on MVTec): the (N, N)
    route is then much cheaper and gives the same non-zero spectrum.
    """
    n, dims = centred.shape
    if n < dims:
        values, left = np.linalg.eigh(centred @ centred.T)
        keep = values > _RELATIVE_EIGEN_FLOOR * max(float(values[-1]), 0.0)
        values = values[keep]
        # Right singular vectors from left ones: v = C^T u / sqrt(lambda).
        vectors = (centred.T @ left[:, keep]) / np.sqrt(values)
    else:
        values, vectors = np.linalg.eigh(centred.T @ centred)
        keep = values > _RELATIVE_EIGEN_FLOOR * max(float(values[-1]), 0.0)
        values, vectors = values[keep], vectors[:, keep]
    return _Spectrum(values, vectors, n, dims)


def ledoit_wolf_shrinkage(centred: np.ndarray, spectrum: _Spectrum | None = None) -> float:
    """Ledoit-Wolf (2004) optimal shrinkage intensity for centred (N, D) data.

    With ``S`` the ML covariance, ``m = tr(S) / D``:
    ``d2 = ||S - m I||^2 / D`` (distance of ``S`` from the target) and
    ``b2 = sum_i ||x_i x_i^T - S||^2 / (N^2 D)`` (how noisy ``S`` is);
    ``rho = min(b2, d2) / d2``. Both need only the eigenvalues of ``S``
    and the squared norms of the samples.
    """
    n, dims = centred.shape
    if spectrum is None:
        spectrum = _scatter_spectrum(centred)
    sample_eigen = spectrum.values / n
    m = sample_eigen.sum() / dims
    frob_sq = float((sample_eigen**2).sum())
    d2 = (frob_sq - m * m * dims) / dims
    if d2 <= 0.0:
        return 0.0  # S is already a multiple of the identity: nothing to shrink towards
    fourth = float(((centred**2).sum(axis=1) ** 2).sum())
    b2 = (fourth - n * frob_sq) / (n * n * dims)
    return float(min(max(b2, 0.0), d2) / d2)


def _shrunk_eigen(spectrum: _Spectrum, rho: float) -> tuple[np.ndarray, float]:
    """Eigenvalues of the shrunk covariance: (r,) along ``spectrum.vectors``, and the one of the rest."""
    sample = spectrum.values / spectrum.n
    ridge = rho * sample.sum() / spectrum.dims
    return (1.0 - rho) * sample + ridge, ridge


def ledoit_wolf(features: np.ndarray) -> ShrunkCovariance:
    """(N, D) -> mean and Ledoit-Wolf shrunk covariance (matches sklearn's LedoitWolf)."""
    x = _as_float64(features)
    mean = x.mean(axis=0)
    centred = x - mean
    spectrum = _scatter_spectrum(centred)
    rho = ledoit_wolf_shrinkage(centred, spectrum)
    along, ridge = _shrunk_eigen(spectrum, rho)
    v = spectrum.vectors
    covariance = (v * (along - ridge)) @ v.T + ridge * np.eye(x.shape[1])
    return ShrunkCovariance(mean, covariance, rho)


def _shrunk_precision(spectrum: _Spectrum, rho: float) -> np.ndarray:
    """(D, D) inverse of the shrunk covariance, straight from the scatter's spectrum."""
    along, ridge = _shrunk_eigen(spectrum, rho)
    v = spectrum.vectors
    if ridge <= 0.0:
        if v.shape[1] < spectrum.dims:
            raise ValueError(
                "the covariance is singular (constant features, or fewer samples than dimensions without "
                "shrinkage); cannot compute Mahalanobis distances"
            )
        return (v / along) @ v.T
    return (v * (1.0 / along - 1.0 / ridge)) @ v.T + np.eye(spectrum.dims) / ridge


def precision_matrix(covariance: np.ndarray) -> np.ndarray:
    """(D, D) symmetric positive-definite covariance -> its inverse, via eigen-decomposition."""
    eigenvalues, eigenvectors = np.linalg.eigh(np.asarray(covariance, dtype=np.float64))
    if eigenvalues[0] <= 0.0:
        raise ValueError(
            "the covariance is singular (a constant feature, or fewer samples than dimensions without shrinkage); "
            "cannot compute Mahalanobis distances"
        )
    return (eigenvectors / eigenvalues) @ eigenvectors.T


def squared_mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(N, D), (D,), (D, D) -> (N,) squared Mahalanobis distances ``(x - mu)^T P (x - mu)``."""
    d = np.asarray(features, dtype=np.float64) - mean
    # Rounding can make a tiny value negative; a squared distance never is.
    return np.maximum(np.einsum("nd,nd->n", d @ precision, d), 0.0)


def mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(N, D) -> (N,) Mahalanobis distances (Rippel's Eq. 2)."""
    return np.sqrt(squared_mahalanobis(features, mean, precision))


# --------------------------------------------------------------------------- (N)PCA


def principal_components(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D) -> ``(centre (D,), components (D, r) as columns, variances (r,))``, largest variance first.

    Only the r directions in which the data varies are returned (r <= N - 1),
    as a thin SVD would. With fewer samples than dimensions, the remaining
    directions have exactly zero sample variance: a Gaussian fitted there
    would model rounding noise, so (N)PCA leaves them out; no reduction
    ("none") keeps them, where shrinkage gives them a sensible variance.
    """
    x = _as_float64(features)
    centre = x.mean(axis=0)
    spectrum = _scatter_spectrum(x - centre)
    if spectrum.values.size == 0:
        raise ValueError("the features do not vary at all; (N)PCA has nothing to keep")
    return centre, spectrum.vectors[:, ::-1].copy(), spectrum.values[::-1] / x.shape[0]


def reduction_basis(features: np.ndarray, reduction: str, variance: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``(centre (D,), basis (D, d))`` that ``reduction`` keeps.

    ``"pca"``: the fewest leading components whose variance share reaches ``variance``.
    ``"npca"``: the trailing components left after removing the fewest leading
    ones that carry ``1 - variance``; their share is at most ``variance``. At
    least one component is always kept.
    """
    if not 0.0 < variance < 1.0:
        raise ValueError(f"variance must be strictly between 0 and 1, got {variance}")
    centre, components, variances = principal_components(features)
    cumulative = np.cumsum(variances) / variances.sum()
    if reduction == "pca":
        keep = int(np.searchsorted(cumulative, variance - 1e-12)) + 1
        return centre, components[:, : min(keep, components.shape[1])]
    if reduction == "npca":
        drop = int(np.searchsorted(cumulative, 1.0 - variance - 1e-12)) + 1
        return centre, components[:, min(drop, components.shape[1] - 1) :]
    raise ValueError(f"reduction must be 'pca' or 'npca', got {reduction!r}")


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class GaussianModel:
    """A fitted Gaussian: optional projection, then mean + precision in the projected space.

    ``centre`` (D,) and ``basis`` (D, d) project features (both None without a
    reduction); ``mean`` (d,), ``precision`` (d, d); ``shrinkage`` is the
    Ledoit-Wolf rho. ``dof`` = d is the chi-square degrees of freedom.
    """

    mean: np.ndarray
    precision: np.ndarray
    shrinkage: float
    centre: np.ndarray | None = None
    basis: np.ndarray | None = None

    @property
    def dof(self) -> int:
        return int(self.mean.shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.basis.shape[0]) if self.basis is not None else self.dof

    def project(self, features: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, d) coordinates the Gaussian lives in."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"features must have shape (N, {self.input_dim}), got {x.shape}")
        if self.basis is None:
            return x
        return (x - self.centre) @ self.basis

    def squared_distances(self, features: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) squared Mahalanobis distances."""
        return squared_mahalanobis(self.project(features), self.mean, self.precision)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) Mahalanobis distances (the anomaly score)."""
        return np.sqrt(self.squared_distances(features))


def fit_gaussian(features: np.ndarray, reduction: str = "none", variance: float = 0.01) -> GaussianModel:
    """(N, D) normal features -> :class:`GaussianModel` (optionally after (N)PCA)."""
    x = _as_float64(features)
    centre = basis = None
    if reduction != "none":
        centre, basis = reduction_basis(x, reduction, variance)
        x = (x - centre) @ basis
    mean = x.mean(axis=0)
    centred = x - mean
    spectrum = _scatter_spectrum(centred)
    rho = ledoit_wolf_shrinkage(centred, spectrum)
    return GaussianModel(mean, _shrunk_precision(spectrum, rho), rho, centre, basis)


def leave_one_out_distances(features: np.ndarray) -> np.ndarray:
    """(N, D) -> (N,) Mahalanobis distance of each sample to the Gaussian fitted without it.

    Closed form, no refit: removing sample i changes the mean by a multiple of
    ``d_i = x_i - mean`` and the scatter by ``-N/(N-1) d_i d_i^T``, so the
    shrunk covariance without i is ``a S + beta_i I - g d_i d_i^T``. One
    eigen-decomposition of ``S`` makes ``(a S + beta_i I)^{-1}`` diagonal, and
    Sherman-Morrison adds the rank-one term. Everything is exact except the
    shrinkage intensity rho, which is held at its value on all N samples (it
    moves by O(1/N) when one sample is removed). Needs N >= 3.
    """
    x = _as_float64(features)
    n, dims = x.shape
    if n < 3:
        raise ValueError(f"leave-one-out needs at least 3 samples, got {n}")
    centred = x - x.mean(axis=0)
    spectrum = _scatter_spectrum(centred)
    eigenvalues, eigenvectors = spectrum.values, spectrum.vectors
    rho = ledoit_wolf_shrinkage(centred, spectrum)
    if rho <= 0.0 and n - 2 < dims:
        raise ValueError(
            f"leave-one-out covariances of {n} samples in {dims} dimensions are singular without shrinkage"
        )
    c = n / (n - 1.0)
    a = (1.0 - rho) / (n - 1.0)
    gamma = a * c
    sq_norms = (centred**2).sum(axis=1)
    # Ridge of each leave-one-out covariance: rho * trace(S_-i) / D.
    beta = rho * (eigenvalues.sum() - c * sq_norms) / ((n - 1.0) * dims)
    # Every d_i lies in the span of the non-zero eigenvectors (it is a row of the
    # centred data), so the zero eigenvalues never enter h.
    projected_sq = (centred @ eigenvectors) ** 2  # (N, r)
    denominators = a * eigenvalues[None, :] + beta[:, None]
    if (denominators <= 0.0).any():
        raise ValueError("a leave-one-out covariance is singular (no shrinkage and too few samples)")
    h = (projected_sq / denominators).sum(axis=1)
    # d^T (B - g d d^T)^{-1} d = h / (1 - g h); the query is c * d_i away from the left-out mean.
    inner = h / np.maximum(1.0 - gamma * h, np.finfo(np.float64).tiny)
    return np.sqrt(np.maximum(c * c * inner, 0.0))


def cross_fitted_distances(
    features: np.ndarray, reduction: str, variance: float, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """(N, D) -> (N,) distances of each sample to a model (projection included) fitted without its fold.

    Used for train scores with a (N)PCA reduction: the projection itself is
    learnt from the data, so keeping it while leaving one sample out would let
    the sample shape the directions it is scored along.
    """
    x = _as_float64(features)
    n = x.shape[0]
    folds = min(folds, n)
    if n - (n + folds - 1) // folds < 2:
        raise ValueError(f"cross-fitting with {folds} folds needs more than {n} samples")
    order = np.random.default_rng(seed).permutation(n)
    scores = np.empty(n, dtype=np.float64)
    for fold in range(folds):
        held = order[fold::folds]
        kept = np.setdiff1d(order, held, assume_unique=True)
        scores[held] = fit_gaussian(x[kept], reduction, variance).distances(x[held])
    return scores


# --------------------------------------------------------------------------- working point


def chi2_threshold(target_fpr: float, dof: int) -> float:
    """Mahalanobis distance threshold for a target FPR (Rippel's Eq. 8).

    ``t = sqrt(F_dof^{-1}(1 - target_fpr))``: if normal features were exactly
    Gaussian, a fraction ``target_fpr`` of normal samples would lie farther.
    The squared distance is chi-square with ``dof`` = the dimension.
    """
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be strictly between 0 and 1, got {target_fpr}")
    if dof < 1:
        raise ValueError(f"dof must be a positive integer, got {dof}")
    return float(np.sqrt(chi2.ppf(1.0 - target_fpr, dof)))


def chi2_expected_fpr(threshold: float, dof: int) -> float:
    """Inverse of :func:`chi2_threshold`: the FPR a distance threshold gives under the Gaussian assumption."""
    return float(chi2.sf(float(threshold) ** 2, dof))
