"""The kNN engine (core.knn) against brute-force numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core import knn
from core.knn import KnnIndex, centre_distance, kmeans_summary


def brute_force(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(M, k) squared distances and indices of the k nearest gallery rows, in float64."""
    d = ((queries[:, None, :].astype(np.float64) - gallery[None].astype(np.float64)) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(60, 16)).astype(np.float32), rng.normal(size=(15, 16)).astype(np.float32)


BACKENDS = ["torch"] + (["faiss"] if knn.faiss is not None else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_and_score_match_brute_force(data, backend):
    gallery, queries = data
    index = KnnIndex(k=3, backend=backend, device="cpu").fit(gallery)
    found = index.search(queries)
    expected_d, expected_i = brute_force(gallery, queries, 3)
    np.testing.assert_allclose(found.sq_distances, expected_d, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(found.indices, expected_i)
    np.testing.assert_allclose(index.score(queries), expected_d.sum(axis=1), rtol=1e-4)
    assert found.sq_distances.shape == (15, 3) and found.indices.dtype == np.int64


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_scores_leave_each_point_out(data, backend):
    gallery, _ = data
    index = KnnIndex(k=2, backend=backend, device="cpu").fit(gallery)
    expected = []
    for i in range(len(gallery)):
        others = np.delete(gallery, i, axis=0)
        expected.append(brute_force(others, gallery[i : i + 1], 2)[0].sum())
    np.testing.assert_allclose(index.train_scores(), expected, rtol=1e-4, atol=1e-5)
    assert (index.train_scores() > 0).all()  # a point at distance 0 from itself never counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_scores_count_exact_duplicates_as_neighbours(backend):
    rng = np.random.default_rng(1)
    points = rng.normal(size=(10, 4)).astype(np.float32)
    gallery = np.concatenate([points, points[:1], points[:1]])  # point 0 three times
    scores = KnnIndex(k=2, backend=backend, device="cpu").fit(gallery).train_scores()
    # Each copy has the two other copies at distance 0: a zero score, not the next distinct point.
    np.testing.assert_allclose(scores[[0, 10, 11]], 0.0, atol=1e-5)
    assert (scores[1:10] > 0).all()


@pytest.mark.skipif(knn.faiss is None, reason="FAISS is not installed")
def test_torch_backend_equals_faiss_backend(data):
    gallery, queries = data
    a = KnnIndex(k=2, backend="torch", device="cpu").fit(gallery)
    b = KnnIndex(k=2, backend="faiss").fit(gallery)
    np.testing.assert_allclose(a.score(queries), b.score(queries), rtol=1e-4)
    np.testing.assert_array_equal(a.search(queries).indices, b.search(queries).indices)
    np.testing.assert_allclose(a.train_scores(), b.train_scores(), rtol=1e-4, atol=1e-5)


def test_torch_tensors_are_accepted(data):
    gallery, queries = data
    index = KnnIndex(k=1, backend="torch", device="cpu").fit(torch.from_numpy(gallery))
    np.testing.assert_allclose(index.score(torch.from_numpy(queries)), brute_force(gallery, queries, 1)[0][:, 0], rtol=1e-4)


def test_kmeans_summary_shapes_and_determinism(data):
    gallery, _ = data
    centres = kmeans_summary(gallery, n_means=5, seed=3)
    assert centres.shape == (5, 16) and centres.dtype == np.float32
    np.testing.assert_array_equal(centres, kmeans_summary(gallery, n_means=5, seed=3))
    # More means than points: one per point at most.
    assert kmeans_summary(gallery[:4], n_means=50).shape == (4, 16)


def test_kmeans_centres_sit_in_clusters():
    rng = np.random.default_rng(2)
    blobs = np.concatenate([rng.normal(loc, 0.01, size=(20, 2)) for loc in ((0, 0), (5, 5), (-5, 5))]).astype(np.float32)
    centres = kmeans_summary(blobs, n_means=3)
    for loc in ((0, 0), (5, 5), (-5, 5)):
        assert np.min(np.linalg.norm(centres - np.array(loc), axis=1)) < 0.1


def test_centre_distance_is_squared_l2(data):
    gallery, _ = data
    centre = gallery.mean(axis=0)
    np.testing.assert_allclose(centre_distance(gallery, centre), ((gallery - centre) ** 2).sum(axis=1), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_clear_errors(data, backend):
    gallery, queries = data
    with pytest.raises(ValueError, match="NaN"):
        KnnIndex(backend=backend, device="cpu").fit(np.full((3, 2), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="empty"):
        KnnIndex(backend=backend, device="cpu").fit(np.zeros((0, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        KnnIndex(backend=backend, device="cpu").fit(np.zeros(5, dtype=np.float32))
    index = KnnIndex(k=2, backend=backend, device="cpu").fit(gallery)
    with pytest.raises(ValueError, match="dimensions"):
        index.search(queries[:, :8])
    with pytest.raises(ValueError, match="NaN"):
        index.score(np.full((1, 16), np.inf, dtype=np.float32))
    with pytest.raises(RuntimeError, match="before fit"):
        KnnIndex(backend=backend, device="cpu").search(queries)
    with pytest.raises(ValueError, match="more than k"):
        KnnIndex(k=2, backend=backend, device="cpu").fit(gallery[:2]).train_scores()
    with pytest.raises(ValueError):
        KnnIndex(k=0)


# --------------------------------------------------------------------------- IVF (approximate) search


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """20,000 gallery points and 300 queries around 64 centres in 24-D, with the exact nearest of each query."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, 24)).astype(np.float32) * 3
    gallery = (centres[rng.integers(0, 64, 20_000)] + rng.normal(size=(20_000, 24))).astype(np.float32)
    queries = (centres[rng.integers(0, 64, 300)] + rng.normal(size=(300, 24))).astype(np.float32)
    distances, rows = knn.blockwise_search(torch.from_numpy(queries), torch.from_numpy(gallery), None, 1)
    return gallery, queries, distances[:, 0].numpy(), rows[:, 0].numpy()


def test_blockwise_search_matches_brute_force(data):
    gallery, queries = data
    distances, rows = knn.blockwise_search(torch.from_numpy(queries), torch.from_numpy(gallery), None, 3)
    expected_d, expected_i = brute_force(gallery, queries, 3)
    np.testing.assert_allclose(distances.numpy(), expected_d, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(rows.numpy(), expected_i)


@pytest.mark.skipif(knn.faiss is None, reason="FAISS not installed")
def test_ivf_flat_agrees_with_exact_search(clustered):
    gallery, queries, exact_d, exact_i = clustered
    index = knn.IvfIndex(24, "flat", probe=8, n_hint=len(gallery)).train(gallery)
    index.add(gallery[:7000])
    index.add(gallery[7000:])  # ids continue across calls
    found = index.search(queries, 1)
    recall = (found.indices[:, 0] == exact_i).mean()
    assert recall >= 0.95, f"IVF-Flat recall@1 {recall:.3f} with 8 of {index.lists} lists probed"
    # IVF-Flat keeps float32 vectors: a found neighbour's distance is exact, never below the true nearest.
    hit = found.indices[:, 0] == exact_i
    np.testing.assert_allclose(found.sq_distances[hit, 0], exact_d[hit], rtol=1e-4, atol=1e-4)
    assert (found.sq_distances[:, 0] >= exact_d - 1e-3).all()
    # Probing every list is an exhaustive search.
    everything = index.search(queries, 1, probe=index.lists)
    np.testing.assert_array_equal(everything.indices[:, 0], exact_i)


@pytest.mark.skipif(knn.faiss is None, reason="FAISS not installed")
def test_ivf_pq_approximates_exact_search_within_tolerance(clustered):
    gallery, queries, exact_d, exact_i = clustered
    index = knn.IvfIndex(24, "pq", probe=8, pq_dims=2, n_hint=len(gallery)).train(gallery)
    index.add(gallery)
    assert index.code_bytes == 12  # 24 dimensions, 2 per one-byte code
    found = index.search(queries, 1)
    recall = (found.indices[:, 0] == exact_i).mean()
    error = np.abs(found.sq_distances[:, 0] - exact_d) / exact_d
    assert recall >= 0.7, f"IVF-PQ recall@1 {recall:.3f}"
    assert np.median(error) <= 0.05 and np.quantile(error, 0.95) <= 0.15, (np.median(error), np.quantile(error, 0.95))
    # Measured memory: codes + ids dominate and match the formula within the fixed parts.
    assert index.nbytes >= len(gallery) * (12 + 8)
    assert abs(index.nbytes - knn.ivf_bytes(len(gallery), 24, "pq", index.lists, 2)) < 0.1 * index.nbytes


@pytest.mark.skipif(knn.faiss is None, reason="FAISS not installed")
def test_ivf_exclusion_and_round_trip(clustered):
    gallery, queries, _, _ = clustered
    index = knn.IvfIndex(24, "pq", probe=16, n_hint=len(gallery)).train(gallery)
    index.add(gallery)
    # Leave-one-out style exclusion: no id of the excluded span is ever returned.
    found = index.search(queries, 5, exclude=(0, 10_000))
    assert (found.indices >= 10_000).all()
    again = knn.IvfIndex.from_array(index.to_array(), probe=16)
    assert again.kind == "pq" and len(again) == len(gallery)
    np.testing.assert_array_equal(again.search(queries, 3).indices, index.search(queries, 3).indices)
    with pytest.raises(ValueError, match="IVF"):
        knn.IvfIndex.from_array(np.frombuffer(b"not an index at all", dtype=np.uint8))


def test_pq_subquantizers_divide_the_dimension():
    assert knn.pq_subquantizers(24, 4) == 6 and knn.pq_subquantizers(112, 4) == 28
    assert knn.pq_subquantizers(40, 3) in (10, 20) and 40 % knn.pq_subquantizers(40, 3) == 0
    assert knn.pq_subquantizers(7, 4) in (1, 7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_metric_searches_unit_vectors_and_ignores_length(data, backend):
    gallery, queries = data
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    index = KnnIndex(k=2, backend=backend, device="cpu", metric="cosine").fit(gallery)
    expected_d, expected_i = brute_force(unit(gallery), unit(queries), 2)
    found = index.search(queries)
    np.testing.assert_allclose(found.sq_distances, expected_d, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(found.indices, expected_i)
    # Squared distance of unit vectors = 2 - 2 cos: the score reads angles only.
    cosines = (unit(queries)[:, None] * unit(gallery)[expected_i]).sum(-1)
    np.testing.assert_allclose(found.sq_distances, 2 - 2 * cosines, atol=1e-5)
    scaled = queries * np.linspace(0.1, 50, len(queries), dtype=np.float32)[:, None]
    np.testing.assert_allclose(index.score(scaled), index.score(queries), rtol=1e-4, atol=1e-5)
    # Euclidean keeps the length: the same scaling changes its scores.
    plain = KnnIndex(k=2, backend=backend, device="cpu").fit(gallery)
    assert not np.allclose(plain.score(scaled), plain.score(queries))


def test_cosine_leave_one_out_and_bad_metric(data):
    gallery, _ = data
    unit = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    cosine = KnnIndex(k=2, backend="torch", device="cpu", metric="cosine").fit(gallery * 3.0)
    np.testing.assert_allclose(cosine.train_scores(), KnnIndex(k=2, backend="torch", device="cpu").fit(unit).train_scores(),
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="metric must be one of euclidean, cosine"):
        KnnIndex(k=2, metric="manhattan")
    with pytest.raises(ValueError, match="metric"):
        knn.in_metric_space(gallery, "dot")
    zero = knn.unit_rows(np.zeros((2, 3), dtype=np.float32))
    assert np.isfinite(zero).all() and not zero.any()  # an all-zero vector stays zero, no NaN
