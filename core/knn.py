"""k-nearest-neighbour scoring: the engine under DN2, SPADE and PANDA.

Score convention (used everywhere in the project): the anomaly score of a query
is the **sum of the squared L2 distances to its k nearest gallery points**.
This is what the PANDA authors' code computes; higher = more anomalous.
With ``metric="cosine"`` the gallery and the queries are first scaled to unit
length, so the squared distance is 2 - 2 cos(angle): only the direction of a
feature vector counts, not its length.

Backends, chosen automatically:

* ``faiss-gpu`` — FAISS GPU index, when a CUDA build of FAISS and a GPU exist;
* ``torch`` — exact search with chunked matrix products on a CUDA device, when a
  GPU exists but FAISS has no GPU support (the usual ``faiss-cpu`` wheel);
* ``faiss`` — FAISS ``IndexFlatL2`` on the CPU (exact);
* ``torch`` on the CPU is also used when FAISS is not installed at all.

All inputs are converted to C-contiguous float32, which FAISS requires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

try:  # FAISS is a hard requirement of the project, but keep the engine usable without it.
    import faiss
except ImportError:  # pragma: no cover - exercised only on installs without faiss
    faiss = None


def as_float32(features: np.ndarray | torch.Tensor, name: str = "features") -> np.ndarray:
    """(N, D) array or tensor -> C-contiguous float32 numpy array; rejects NaN/inf and bad shapes."""
    if isinstance(features, torch.Tensor):
        features = features.detach().float().cpu().numpy()
    array = np.ascontiguousarray(features, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return array


KNN_METRICS = {"euclidean": "Euclidean (paper)", "cosine": "Cosine (direction only)"}
"""The kNN distances, name -> label: ``euclidean`` is the papers' distance; ``cosine`` the same search on
unit-length vectors. The one list: settings check against it, pages offer it."""


def check_metric(metric: str) -> str:
    """``metric`` if it is one of :data:`KNN_METRICS`; else ``ValueError`` naming the choices."""
    if metric not in KNN_METRICS:
        raise ValueError(f"metric must be one of {', '.join(KNN_METRICS)}; got {metric!r}")
    return metric


def unit_rows(features: np.ndarray) -> np.ndarray:
    """(N, D) float32 -> (N, D) float32 rows scaled to unit L2 length (all-zero rows stay zero)."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return np.ascontiguousarray(features / np.maximum(norms, 1e-12), dtype=np.float32)


def in_metric_space(features: np.ndarray | torch.Tensor, metric: str, name: str = "features") -> np.ndarray:
    """(N, D) -> C-contiguous float32 (N, D) in the space ``metric`` measures: unchanged, or unit rows for cosine."""
    check_metric(metric)
    array = as_float32(features, name)
    return unit_rows(array) if metric == "cosine" else array


def faiss_gpu_available() -> bool:
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def choose_backend(device: str | torch.device | None = None) -> str:
    """The backend the project uses for kNN on this machine (see module docstring)."""
    wants_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if wants_cuda and faiss_gpu_available():
        return "faiss-gpu"
    if wants_cuda or faiss is None:
        return "torch"
    return "faiss"


@dataclass(frozen=True)
class Neighbours:
    """Result of a search: ``sq_distances`` (M, k) ascending, ``indices`` (M, k) into the gallery."""

    sq_distances: np.ndarray
    indices: np.ndarray


class KnnIndex:
    """Exact kNN over a gallery of feature vectors.

    ``fit(gallery)`` stores the (N, D) gallery; ``search(queries, k)`` returns
    squared distances and indices; ``score(queries)`` returns (M,) scores;
    ``train_scores()`` returns leave-one-out scores of the gallery itself.
    ``metric``: "euclidean" or "cosine" (both gallery and queries scaled to unit
    length first; ``gallery_`` then holds the unit vectors).
    """

    def __init__(self, k: int = 2, backend: str | None = None, device: str | torch.device | None = None,
                 metric: str = "euclidean") -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.metric = check_metric(metric)
        self.backend = backend or choose_backend(device)
        if self.backend not in ("faiss", "faiss-gpu", "torch"):
            raise ValueError(f"unknown kNN backend {self.backend!r}")
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._index = None
        self._gallery_torch: torch.Tensor | None = None
        self.gallery_: np.ndarray | None = None

    # ------------------------------------------------------------------ fit
    def fit(self, gallery: np.ndarray | torch.Tensor) -> "KnnIndex":
        """Store the (N, D) gallery. N must exceed k for leave-one-out scores to exist."""
        gallery = in_metric_space(gallery, self.metric, "gallery")
        if gallery.shape[0] == 0:
            raise ValueError("the gallery is empty: fit needs at least one normal feature vector")
        self.gallery_ = gallery
        if self.backend == "torch":
            self._gallery_torch = torch.from_numpy(gallery).to(self.device)
            self._index = None
        else:
            index = faiss.IndexFlatL2(gallery.shape[1])
            if self.backend == "faiss-gpu":
                self._gpu_resources = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
            index.add(gallery)
            self._index = index
        return self

    def _require_fitted(self) -> np.ndarray:
        if self.gallery_ is None:
            raise RuntimeError("KnnIndex.search called before fit(gallery)")
        return self.gallery_

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray | torch.Tensor, k: int | None = None) -> Neighbours:
        """(M, D) queries -> their k nearest gallery points (k defaults to ``self.k``)."""
        gallery = self._require_fitted()
        k = self.k if k is None else k
        queries = in_metric_space(queries, self.metric, "queries")
        if queries.shape[1] != gallery.shape[1]:
            raise ValueError(f"queries have {queries.shape[1]} dimensions, the gallery {gallery.shape[1]}")
        k_eff = min(k, gallery.shape[0])
        if self.backend == "torch":
            distances, indices = _torch_search(self._gallery_torch, torch.from_numpy(queries).to(self.device), k_eff)
        else:
            distances, indices = self._index.search(queries, k_eff)
        # FAISS can return tiny negative squared distances from rounding.
        return Neighbours(np.maximum(distances, 0.0), indices.astype(np.int64))

    def score(self, queries: np.ndarray | torch.Tensor) -> np.ndarray:
        """(M, D) -> (M,) sum of squared distances to the k nearest gallery points."""
        return self.search(queries).sq_distances.sum(axis=1)

    def train_scores(self) -> np.ndarray:
        """(N,) leave-one-out scores of the gallery: each point's k nearest *other* points.

        The point itself is found at distance 0 and dropped by index (not by
        distance), so exact duplicates in the gallery still count as neighbours.
        """
        gallery = self._require_fitted()
        if gallery.shape[0] <= self.k:
            raise ValueError(f"leave-one-out scores need more than k={self.k} gallery points, got {gallery.shape[0]}")
        found = self.search(gallery, self.k + 1)
        own = found.indices == np.arange(gallery.shape[0])[:, None]
        # Where the point itself was not returned (many exact duplicates), drop the farthest instead.
        missing = ~own.any(axis=1)
        own[missing, -1] = True
        keep = ~own
        return np.where(keep, found.sq_distances, 0.0).sum(axis=1)


SEARCH_BLOCK = 1 << 23
"""Query x gallery distances computed at once by :func:`blockwise_search` (32 MiB of float32)."""


def blockwise_search(
    queries: torch.Tensor, gallery: torch.Tensor, gallery_sq: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact kNN: (P, C) queries, (M, C) gallery, (M,) its squared norms -> (P, k) sq distances, (P, k) rows.

    The project's one exact search kernel (``KnnIndex``'s torch backend, SPADE's
    pixel galleries). Distances ascend along k. Computed as ||q||² - 2 q·g + ||g||²
    in query blocks that keep the (block, M) matrix near 32 MiB; for k = 1 a plain
    min replaces the top-k, which is several times faster on a CPU. ``gallery_sq``
    None: computed here.
    """
    if gallery_sq is None:
        gallery_sq = (gallery * gallery).sum(1)
    k = min(k, gallery.shape[0])
    block = max(1, SEARCH_BLOCK // max(1, gallery.shape[0]))
    distances, rows = [], []
    for start in range(0, queries.shape[0], block):
        q = queries[start : start + block]
        d = torch.addmm(gallery_sq[None], q, gallery.T, alpha=-2.0)
        if k == 1:
            value, index = d.min(dim=1, keepdim=True)
        else:
            value, index = torch.topk(d, k, dim=1, largest=False)
        distances.append(value + (q * q).sum(1, keepdim=True))
        rows.append(index)
    # Rounding can leave tiny negatives for (near-)identical vectors.
    return torch.cat(distances).clamp_min_(0.0), torch.cat(rows)


def merge_neighbours(parts: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k best of several (P, k_i) searches over disjoint gallery parts (rows already global)."""
    if len(parts) == 1:
        return parts[0]
    distances = torch.cat([p[0] for p in parts], dim=1)
    rows = torch.cat([p[1] for p in parts], dim=1)
    k = min(k, distances.shape[1])
    best, order = torch.topk(distances, k, dim=1, largest=False)
    return best, torch.gather(rows, 1, order)


def _torch_search(gallery: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN through :func:`blockwise_search`, results on the CPU."""
    distances, indices = blockwise_search(queries, gallery, None, k)
    return distances.cpu().numpy(), indices.cpu().numpy()


def kmeans_summary(features: np.ndarray | torch.Tensor, n_means: int = 50, seed: int = 0, iterations: int = 20) -> np.ndarray:
    """(N, D) -> (min(n_means, N), D) K-means centres: the paper's faster, approximate gallery."""
    features = as_float32(features)
    n_means = min(n_means, features.shape[0])
    if n_means < 1:
        raise ValueError("cannot summarise an empty feature set")
    if faiss is None:  # pragma: no cover
        from sklearn.cluster import KMeans

        return KMeans(n_means, random_state=seed, n_init=1, max_iter=iterations).fit(features).cluster_centers_.astype(np.float32)
    # min_points_per_centroid=1: small galleries are expected here; FAISS would warn on stderr otherwise.
    kmeans = faiss.Kmeans(features.shape[1], n_means, niter=iterations, seed=seed, verbose=False,
                          min_points_per_centroid=1,
                          max_points_per_centroid=max(256, features.shape[0] // n_means + 1))
    kmeans.train(features)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def centre_distance(features: np.ndarray | torch.Tensor, centre: np.ndarray) -> np.ndarray:
    """(N, D), (D,) -> (N,) squared distance to the centre: the paper's simpler alternative to kNN."""
    features = as_float32(features)
    return ((features - centre[None].astype(np.float32)) ** 2).sum(axis=1)


# --------------------------------------------------------------------------- approximate search (FAISS IVF)

IVF_KINDS = ("flat", "pq")


def ivf_lists_for(n_vectors: int) -> int:
    """The default number of IVF lists for a gallery of ``n_vectors``: about √n, between 16 and 4096."""
    return int(min(4096, max(16, round(math.sqrt(max(1, n_vectors))))))


def pq_subquantizers(dim: int, dims_per_code: int) -> int:
    """PQ sub-quantizer count m for ``dim`` dimensions: the divisor of ``dim`` closest to dim / dims_per_code."""
    target = dim / max(1, dims_per_code)
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    return min(divisors, key=lambda m: (abs(m - target), m))


class IvfIndex:
    """FAISS inverted-file index: ``kind="flat"`` (IVF-Flat: float32 vectors per list, exact distances
    within the probed lists) or ``"pq"`` (IVF-PQ: residuals compressed to ``m`` codes of ``nbits``).

    Ids are the insertion order (row = number of vectors added before), so a
    gallery added image by image keeps SPADE's row = image * h * w + pixel.
    ``train(sample)`` then ``add(vectors)`` any number of times, then
    ``search(queries, k, exclude=(start, stop))``. Memory: ``nbytes`` (the
    serialised index, measured) or :func:`ivf_bytes` (the formula).
    """

    def __init__(self, dim: int, kind: str = "pq", lists: int = 0, probe: int = 8,
                 pq_dims: int = 4, n_hint: int = 0, seed: int = 0) -> None:
        if faiss is None:  # pragma: no cover
            raise RuntimeError("IVF galleries need FAISS (pip install faiss-cpu)")
        if kind not in IVF_KINDS:
            raise ValueError(f"IVF kind must be one of {IVF_KINDS}, got {kind!r}")
        self.dim, self.kind, self.probe, self.seed = dim, kind, probe, seed
        self.lists = lists or ivf_lists_for(n_hint)
        self.pq_dims = pq_dims
        self.index = None

    def train(self, sample: np.ndarray) -> "IvfIndex":
        """Learn the coarse centres (and PQ codebooks) from an (n, D) sample of the vectors to add."""
        sample = as_float32(sample, "IVF training sample")
        lists = max(1, min(self.lists, sample.shape[0]))
        quantizer = faiss.IndexFlatL2(self.dim)
        if self.kind == "flat":
            index = faiss.IndexIVFFlat(quantizer, self.dim, lists)
        else:
            # 2^nbits codewords per sub-quantizer need at least as many training points.
            nbits = int(max(1, min(8, math.floor(math.log2(max(2, sample.shape[0]))))))
            index = faiss.IndexIVFPQ(quantizer, self.dim, lists, pq_subquantizers(self.dim, self.pq_dims), nbits)
            index.pq.cp.min_points_per_centroid = 1  # small galleries are expected; FAISS warns otherwise
            index.pq.cp.seed = self.seed
        index.cp.min_points_per_centroid = 1
        index.cp.seed = self.seed
        index.own_fields = True
        quantizer.this.disown()  # the index owns and frees its quantizer
        index.train(sample)
        self.index, self.lists = index, lists
        return self

    def add(self, vectors: np.ndarray | torch.Tensor) -> None:
        """Append (n, D) vectors; their ids continue from ``len(self)``."""
        if self.index is None:
            raise RuntimeError("IvfIndex.add called before train(sample)")
        self.index.add(as_float32(vectors, "gallery"))

    def __len__(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def search(self, queries: np.ndarray | torch.Tensor, k: int, exclude: tuple[int, int] | None = None,
               probe: int | None = None) -> Neighbours:
        """(P, D) -> k nearest among the probed lists; ``exclude``: ids start <= id < stop never match.

        ``probe`` (default ``self.probe``): lists searched per query; ``probe >= lists``
        makes IVF-Flat exact.
        """
        queries = as_float32(queries, "queries")
        k = min(k, len(self) - (0 if exclude is None else exclude[1] - exclude[0]))
        selector = None if exclude is None else faiss.IDSelectorNot(faiss.IDSelectorRange(int(exclude[0]), int(exclude[1])))
        params = faiss.SearchParametersIVF(sel=selector, nprobe=min(self.lists, probe or self.probe))
        distances, indices = self.index.search(queries, max(1, k), params=params)
        # A probe that reached fewer than k vectors returns id -1: treat those as infinitely far.
        distances = np.where(indices < 0, np.inf, np.maximum(distances, 0.0))
        return Neighbours(distances, indices.astype(np.int64))

    def centres(self) -> np.ndarray:
        """(lists, D) float32 coarse centres (the cells the vectors are filed under)."""
        return self.index.quantizer.reconstruct_n(0, self.lists)

    def assign(self, vectors: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(n, D) -> (n,) squared distance to the nearest coarse centre, (n,) its list number."""
        distances, lists = self.index.quantizer.search(as_float32(vectors, "vectors"), 1)
        return np.maximum(distances[:, 0], 0.0), lists[:, 0].astype(np.int64)

    @property
    def code_bytes(self) -> int:
        """Bytes stored per vector in the inverted lists (codes, without the 8-byte id)."""
        return int(self.index.code_size)

    @property
    def nbytes(self) -> int:
        """Measured size of the index (its serialised form: centres, codebooks, codes, ids)."""
        return int(faiss.serialize_index(self.index).nbytes)

    def to_array(self) -> np.ndarray:
        """The index as a uint8 array (FAISS's own format, no pickle) for an ``.npz``."""
        return faiss.serialize_index(self.index)

    @classmethod
    def from_array(cls, data: np.ndarray, probe: int = 8) -> "IvfIndex":
        """Inverse of :meth:`to_array`; ValueError when the bytes are not an IVF index."""
        try:
            index = faiss.deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))
            ivf = faiss.extract_index_ivf(index)
        except RuntimeError as error:
            raise ValueError(f"not a FAISS IVF index ({str(error).splitlines()[0]})") from error
        kind = "pq" if isinstance(index, faiss.IndexIVFPQ) else "flat"
        made = cls(index.d, kind, ivf.nlist, probe)
        made.index = index
        return made


def ivf_bytes(n_vectors: int, dim: int, kind: str, lists: int, pq_dims: int = 4) -> int:
    """Formula for an IVF index's memory: per vector 8 (id) + 4·D (flat) or m (PQ codes, 8 bits),
    plus the coarse centres (lists·D·4) and, for PQ, the codebooks (256·D·4)."""
    per_vector = 8 + (4 * dim if kind == "flat" else pq_subquantizers(dim, pq_dims))
    fixed = lists * dim * 4 + (256 * dim * 4 if kind == "pq" else 0)
    return n_vectors * per_vector + fixed
