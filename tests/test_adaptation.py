"""PANDA training: frozen parts stay frozen, the cache changes nothing, SES/EWC/OE maths, curves, cancel.

Everything runs on EfficientNet-Lite0 with random weights on 32x32 synthetic
images for a couple of epochs: fast, and enough to check the mechanics. The
real-data figures live in the benchmark scripts, not here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from core.adaptation.compare import compare_strategies, time_prefix_cache
from core.adaptation.fisher import FisherFileError, _per_sample_squared_grads, _TopLogits, estimate_fisher, load_fisher, save_fisher
from core.adaptation.network import TrainableNetwork
from core.adaptation.objectives import EwcPenalty, compactness_loss, outlier_exposure_loss
from core.adaptation.pipeline import adapt, prepare
from core.adaptation.prefix_cache import PrefixCache, build_image_inputs, build_prefix_cache, choose_cache_dtype
from core.adaptation.schedule import PAPER_MINIBATCHES, Schedule, resolve_schedule
from core.adaptation.ses import SesScorer, holdout_split
from core.adaptation.strategies import CompactnessObjective
from core.adaptation.training import OptimiserSettings, train
from core.config import FeatureSettings, PandaSettings, paper_panda_settings
from core.datasets import ImageItem, ImageSet
from core.images import ImageSize

FEATURES = FeatureSettings(weights="random", resize=32, crop=32, device="cpu", batch_size=16)
SIZE = ImageSize(32, 32)


def _images(n: int, label: int, offset: int, prefix: str, seed: int) -> list[ImageItem]:
    rng = np.random.default_rng(seed)
    return [
        ImageItem(name=f"{prefix}{i}", array=(rng.integers(0, 90, (32, 32, 3)) + offset).astype(np.uint8), label=label)
        for i in range(n)
    ]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def normal() -> ImageSet:
    return ImageSet(_images(24, 0, 0, "normal", 0))


@pytest.fixture(scope="module")
def test_set() -> ImageSet:
    return ImageSet(_images(8, 0, 0, "test-normal", 1) + _images(8, 1, 150, "test-anomaly", 2))


def settings(**changes) -> PandaSettings:
    # The paper's keep rule: these tests check the mechanics of each strategy (the signal's choice between the
    # pretrained and the trained network is tested in test_panda_signal.py).
    base = PandaSettings(features=FEATURES, strategy="early", epochs=2, batch_size=8, snapshot_every=1, fisher_batches=2, keep_rule="last")
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------------- frozen parts
def test_only_trainable_parameters_change_and_batchnorm_statistics_stay(normal):
    prepared = prepare(normal, settings())
    network = prepared.new_network()
    frozen_before = network.frozen_state()
    trainable_before = network.suffix_state()
    train(network, prepared.normal, CompactnessObjective(), Schedule(2, 3), OptimiserSettings(batch_size=8, grad_clip=1.0))
    frozen_after = network.frozen_state()
    assert frozen_before.keys() == frozen_after.keys()
    assert any("running_mean" in name for name in frozen_after)  # BN statistics are part of the check
    for name, value in frozen_before.items():
        assert torch.equal(value, frozen_after[name]), f"{name} changed although it is frozen"
    changed = [name for name, value in network.suffix_state().items() if not torch.equal(value, trainable_before[name])]
    assert changed, "no trainable parameter moved"
    assert all(name.split(".")[1] in prepared.trainable for name in changed)
    assert not network.training  # BatchNorm kept in eval mode
    network.train()
    assert not network.training and not any(m.training for m in network.modules())


def test_trainable_pieces_default_to_the_backbone_spec_and_can_be_chosen(normal):
    prepared = prepare(normal, settings(trainable=("block6", "head")))
    network = prepared.new_network()
    assert network.trainable == ("block6", "head")
    assert network.split == network.network.piece_names.index("block6")
    assert prepared.normal.start == network.split
    with pytest.raises(ValueError, match="trainable pieces"):
        TrainableNetwork(prepared.extractor.copy_network(), ("nope",))


def test_loss_decreases(normal):
    run = adapt(normal, settings(epochs=4, grad_clip=1.0, lr=0.05))
    records = run.result.records
    losses = [r.loss for r in records[1:]]
    assert losses[-1] < losses[0]
    assert records[-1].train_distance < records[0].train_distance


# ---------------------------------------------------------------------- prefix cache
def test_prefix_cached_training_equals_naive_training(normal):
    timing = time_prefix_cache(normal, settings(), epochs=1)
    assert timing.max_weight_difference < 1e-5
    assert timing.cache_dtype == "float32" and timing.cache_bytes > 0
    assert timing.naive_epoch_seconds > 0 and timing.cached_epoch_seconds > 0


def test_image_inputs_are_lossless_and_cache_matches_the_prefix(normal):
    prepared = prepare(normal, settings(prefix_cache=False))
    network = prepared.new_network()
    assert prepared.normal.start == 0
    cache = build_prefix_cache(network, normal, SIZE, 16, "float32")
    images = build_image_inputs(network, normal, SIZE, 16)
    direct = torch.from_numpy(normal.arrays(SIZE))
    index = torch.arange(len(normal))
    assert torch.equal(images.batch(index), direct)
    assert torch.allclose(cache.batch(index), network.prefix(direct), atol=1e-5)


def test_cache_falls_back_to_float16_over_budget(normal):
    assert choose_cache_dtype((112, 2, 2), 10**6, "auto", budget_mb=1) == torch.float16
    assert choose_cache_dtype((112, 2, 2), 10, "auto", budget_mb=1) == torch.float32
    network = prepare(normal, settings()).new_network()
    half = build_prefix_cache(network, normal, SIZE, 16, "float16")
    full = build_prefix_cache(network, normal, SIZE, 16, "float32")
    assert isinstance(half, PrefixCache) and half.dtype == torch.float16 and half.nbytes * 2 == full.nbytes
    assert torch.allclose(half.batch(torch.arange(4)), full.batch(torch.arange(4)), rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------- schedule
def test_schedule_follows_the_paper_and_scales_with_dataset_size():
    paper = paper_panda_settings()
    cifar = resolve_schedule(dataclasses.replace(paper, strategy="ses"), 5000)
    assert cifar.batches_per_epoch == 157
    assert cifar.epochs == 30 and cifar.snapshot_epochs == (5, 10, 15, 20, 25, 30)
    assert resolve_schedule(dataclasses.replace(paper, strategy="early"), 5000).epochs == 15
    small = resolve_schedule(dataclasses.replace(paper, strategy="early"), 500)
    assert small.batches_per_epoch == 16 and abs(small.minibatches - PAPER_MINIBATCHES["early"]) <= 16
    assert resolve_schedule(PandaSettings(strategy="ewc", epochs=3), 500).epochs == 3
    assert resolve_schedule(PandaSettings(strategy="ewc", epochs=0, minibatches=64), 500).epochs == 4
    # The measured defaults: 16 epochs whatever the set's size, a snapshot every 2.
    measured = resolve_schedule(PandaSettings(), 500)
    assert measured.epochs == 16 and measured.snapshot_epochs == tuple(range(2, 17, 2))


# ---------------------------------------------------------------------- curves and cancel
def test_curves_have_one_record_per_epoch_streamed_as_training_runs(normal, test_set):
    seen = []
    run = adapt(normal, settings(epochs=3), test=test_set, on_epoch=seen.append)
    records = run.result.records
    # The epoch kept is marked once training is over, on the result's records only.
    assert [r.epoch for r in records] == [0, 1, 2, 3] and seen == [dataclasses.replace(r, kept=False) for r in records]
    assert [r.epoch for r in records if r.kept] == [3] and not any(r.kept for r in seen)
    assert records[0].loss is None and all(r.loss is not None for r in records[1:])
    assert [r.minibatches for r in records] == [0, 3, 6, 9]
    for r in records:
        assert r.auroc is not None and 0.0 <= r.auroc <= 1.0
        assert r.test_anomalous_ratio == pytest.approx(r.test_anomalous_distance / r.train_distance)
        assert r.test_normal_ratio == pytest.approx(r.test_normal_distance / r.train_distance)
    assert [r.early_stop for r in records] == [False, False, False, True]
    assert records[0].to_dict()["epoch"] == 0


def test_cancel_stops_between_minibatches_and_keeps_the_weights(normal):
    done = {"minibatches": 0}

    def progress(steps: int, total: int) -> None:
        done["minibatches"] = steps

    def cancel() -> bool:
        return done["minibatches"] >= 4  # 3 minibatches per epoch: stops in the middle of epoch 2

    run = adapt(normal, settings(epochs=5, grad_clip=1.0), progress=progress, cancel=cancel)
    result = run.result
    assert result.cancelled and result.minibatches == 4
    assert [r.epoch for r in result.records] == [0, 1]
    now = run.network.suffix_state()
    assert all(torch.equal(now[k], v) for k, v in result.final_state.items())
    assert result.final_train_features.shape == (len(normal), 1280)


def test_same_seed_repeats_and_another_seed_differs(normal):
    a = adapt(normal, settings(epochs=1, grad_clip=1.0)).result.final_state
    b = adapt(normal, settings(epochs=1, grad_clip=1.0)).result.final_state
    c = adapt(normal, settings(epochs=1, grad_clip=1.0, seed=1)).result.final_state
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------------- SES
def _knn_sum(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    d = ((queries[:, None, :] - gallery[None, :, :]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, :k].sum(1)


def test_ses_score_is_the_hand_computed_maximum_over_snapshots():
    rng = np.random.default_rng(3)
    train = [rng.normal(size=(20, 4)).astype(np.float32), (3.0 * rng.normal(size=(20, 4))).astype(np.float32)]
    queries = [rng.normal(size=(6, 4)).astype(np.float32) * 2, rng.normal(size=(6, 4)).astype(np.float32)]
    scorer = SesScorer(k=2, holdout=0.1, seed=5).fit(train)
    gallery, held = holdout_split(20, 0.1, 2, 5)
    assert len(held) == 2 and len(np.intersect1d(gallery, held)) == 0
    expected = []
    for features, query in zip(train, queries):
        s = _knn_sum(features[held], features[gallery], 2).mean()
        expected.append(_knn_sum(query, features[gallery], 2) / s)
    expected = np.stack(expected)
    found = scorer.score(queries)
    np.testing.assert_allclose(found.normalised, expected, rtol=1e-5)
    np.testing.assert_allclose(found.scores, expected.max(0), rtol=1e-5)
    np.testing.assert_array_equal(found.choice, expected.argmax(0))
    rebuilt = SesScorer.from_state(scorer.state(), 2, 0.1, 5)
    np.testing.assert_allclose(rebuilt.score(queries).scores, found.scores)
    assert scorer.train_scores().scores.shape == (20,)


def test_ses_run_keeps_a_snapshot_at_each_planned_epoch(normal):
    run = adapt(normal, settings(strategy="ses", epochs=4, snapshot_every=2))
    assert run.schedule.snapshot_epochs == (2, 4)
    assert sorted(run.result.snapshots) == [2, 4]
    assert [r.snapshot for r in run.result.records] == [None, None, 0, None, 1]
    snap = run.result.snapshots[2]
    assert snap.train_features.shape == (len(normal), 1280) and snap.test_features is None
    assert set(snap.state) == set(run.network.trainable_parameters())


# ---------------------------------------------------------------------- EWC and Fisher
def test_ewc_penalty_is_zero_at_the_anchor_and_grows_with_the_change():
    anchor = {"a": torch.randn(3, 2), "b": torch.randn(4)}
    fisher = {"a": torch.rand(3, 2), "b": torch.rand(4)}
    penalty = EwcPenalty(fisher, anchor, lam=1e4)
    assert float(penalty(anchor)) == 0.0
    direction = {k: torch.randn_like(v) for k, v in anchor.items()}
    values = [float(penalty({k: anchor[k] + t * direction[k] for k in anchor})) for t in (0.01, 0.1, 1.0)]
    assert values[0] < values[1] < values[2]
    expected = 0.5 * 1e4 * sum(float((fisher[k] * direction[k] ** 2).sum()) for k in anchor)
    assert values[2] == pytest.approx(expected, rel=1e-5)
    assert values[1] == pytest.approx(expected * 0.01, rel=1e-4)  # quadratic in the change


def test_ewc_proximal_step_is_the_closed_form_and_never_overshoots():
    anchor = {"w": torch.zeros(5)}
    fisher = {"w": torch.tensor([0.0, 1e-4, 1e-2, 1.0, 4.0])}
    penalty = EwcPenalty(fisher, anchor, lam=1e4)
    weights = {"w": torch.ones(5)}
    penalty.proximal_(weights, step=0.5)
    expected = 1.0 / (1.0 + 0.5 * 1e4 * fisher["w"])
    torch.testing.assert_close(weights["w"], expected)
    assert weights["w"][0] == 1.0  # no Fisher, no pull
    assert bool(((weights["w"] >= 0) & (weights["w"] <= 1)).all())  # between theta and theta0


def test_ewc_proximal_step_stays_stable_where_the_gradient_step_oscillates():
    # lr * lam * F = 10 on a stiff coordinate: the explicit step overshoots theta0
    # and grows; the proximal step contracts towards theta0 every time.
    anchor = {"w": torch.zeros(1)}
    penalty = EwcPenalty({"w": torch.ones(1)}, anchor, lam=1e3)
    explicit = torch.nn.Parameter(torch.ones(1))
    sgd = torch.optim.SGD([explicit], lr=1e-2)
    for _ in range(5):
        sgd.zero_grad()
        penalty({"w": explicit}).backward()
        sgd.step()
    proximal = {"w": torch.ones(1)}
    for _ in range(5):
        penalty.proximal_(proximal, step=1e-2)
    assert abs(float(explicit.detach())) > 1.0
    assert 0.0 < float(proximal["w"]) < 1e-4


def test_proximal_ewc_run_trains_and_reports_the_penalty(normal):
    run = adapt(normal, settings(strategy="ewc", ewc_step="proximal", grad_clip=1.0, lr=0.05))
    penalties = [r.penalty for r in run.result.records[1:]]
    assert all(p is not None and p >= 0 for p in penalties) and penalties[-1] > 0
    anchor = run.prepared.new_network().suffix_state()
    moved = max(float((run.result.final_state[k] - anchor[k]).abs().max()) for k in anchor)
    assert moved > 0  # the compactness loss still moves the weights
    with pytest.raises(ValueError, match="ewc_step"):
        PandaSettings(ewc_step="implicit")


def test_per_sample_fisher_gradients_match_autograd(normal):
    prepared = prepare(normal, settings(trainable=("head",)))
    network = prepared.new_network()
    module = _TopLogits(network)
    names = [full for full, p in module.named_parameters() if p.requires_grad]
    params = {full: p.detach() for full, p in module.named_parameters() if full in names}
    inputs = prepared.normal.batch(torch.arange(3))
    labels = torch.tensor([1, 5, 7])
    onehot = torch.nn.functional.one_hot(labels, 1000).float()
    fast = _per_sample_squared_grads(module, params, inputs, onehot, prepared.normal.start)
    slow = {name: torch.zeros_like(p) for name, p in params.items()}
    for i in range(3):
        logp = torch.log_softmax(module(inputs[i : i + 1], prepared.normal.start), -1)[0, labels[i]]
        grads = torch.autograd.grad(logp, [dict(module.named_parameters())[n] for n in names])
        for name, g in zip(names, grads):
            slow[name] += g.pow(2)
    for name in names:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-10)


def test_fisher_file_round_trip_and_validation(normal, tmp_path):
    prepared = prepare(normal, settings())
    network = prepared.new_network()
    fisher = estimate_fisher(network, prepared.normal, max_samples=4, backbone="efficientnet_lite0")
    assert fisher.samples == 4 and set(fisher.values) == set(network.trainable_parameters())
    assert all((v >= 0).all() for v in fisher.values.values()) and fisher.total() > 0
    path = save_fisher(tmp_path / "fisher.npz", fisher)
    loaded = load_fisher(path)
    assert loaded.samples == 4 and loaded.source == fisher.source and loaded.backbone == "efficientnet_lite0"
    assert all(torch.equal(loaded.values[k], fisher.values[k]) for k in fisher.values)
    assert set(loaded.for_network(network)) == set(fisher.values)

    # A Fisher for other trainable pieces does not fit.
    other = prepare(normal, settings(trainable=("head",))).new_network()
    partial = dataclasses.replace(loaded, values={k: v for k, v in loaded.values.items() if "head" in k})
    assert set(partial.for_network(other)) == set(other.trainable_parameters())
    with pytest.raises(FisherFileError, match="no entry"):
        partial.for_network(network)
    # Object arrays would need unpickling: refused.
    np.savez(tmp_path / "evil.npz", w=np.array([{"x": 1}], dtype=object))
    with pytest.raises(FisherFileError):
        load_fisher(tmp_path / "evil.npz")
    np.savez(tmp_path / "negative.npz", w=-np.ones(3, dtype=np.float32))
    with pytest.raises(FisherFileError, match="negative"):
        load_fisher(tmp_path / "negative.npz")


def test_ewc_run_uses_a_fisher_file_and_reports_the_penalty(normal, tmp_path):
    prepared = prepare(normal, settings())
    fisher = estimate_fisher(prepared.new_network(), prepared.normal, max_samples=4)
    path = save_fisher(tmp_path / "f.npz", fisher)
    run = adapt(normal, settings(strategy="ewc", fisher_file=str(path), grad_clip=1.0, lr=0.05))
    assert run.fisher is not None and run.fisher.source == fisher.source
    penalties = [r.penalty for r in run.result.records[1:]]
    assert all(p is not None and p >= 0 for p in penalties) and penalties[-1] > 0


# ---------------------------------------------------------------------- outlier exposure
def test_outlier_exposure_loss_is_logistic():
    normal_logits, outlier_logits = torch.tensor([-10.0, -8.0]), torch.tensor([9.0])
    assert float(outlier_exposure_loss(normal_logits, outlier_logits)) < 1e-3
    assert float(outlier_exposure_loss(-normal_logits, -outlier_logits)) > 5


def test_outlier_exposure_head_separates_a_toy_set(normal, test_set):
    outliers = ImageSet(_images(16, 1, 140, "outlier", 7))
    run = adapt(normal, settings(strategy="oe", epochs=3), test=test_set, outliers=outliers)
    assert run.head is not None and np.abs(run.head["weight"]).sum() > 0
    assert run.result.records[-1].auroc > 0.9
    with pytest.raises(ValueError, match="outlier"):
        adapt(normal, settings(strategy="oe"))


def test_compactness_loss_is_mean_squared_distance():
    features, centre = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1.0, 1.0])
    assert float(compactness_loss(features, centre)) == pytest.approx((0 + 1 + 4 + 9) / 4)


# ---------------------------------------------------------------------- comparison (Table 6)
def test_compare_strategies_reads_each_method_where_it_belongs(normal, test_set):
    seen: list[tuple[str, int]] = []
    result = compare_strategies(
        normal, test_set, settings(epochs=0, grad_clip=1.0, lr=0.05, snapshot_every=2, ewc_step="proximal"),
        epochs=4, early_epoch=1, ewc_epochs=2, on_epoch=lambda run, record: seen.append((run, record.epoch)),
    )
    methods = [row.method for row in result.rows]
    # The paper's keep rule: no automatic choice; DN2 fused with Early's and SES's last epoch for comparison.
    assert methods == ["DN2", "PANDA-Early", "PANDA-Early (auto)", "PANDA-SES", "Unregularised (last epoch)",
                       "Unregularised (best epoch)", "DN2 + epoch 1 (fused)", "DN2 + epoch 4 (fused)", "PANDA-EWC"]
    long_run = result.curves["unregularised"]
    # The automatic Early row is the long run's record at the epoch of the best signal (epoch 0 included).
    (marked,) = [r for r in long_run if r.auto_stop]
    assert result.auroc("PANDA-Early (auto)") == marked.auroc
    assert marked.signal == max(r.signal for r in long_run)
    assert [r.epoch for r in long_run] == [0, 1, 2, 3, 4] and [r.epoch for r in result.curves["ewc"]] == [0, 1, 2]
    assert seen == [("unregularised", e) for e in range(5)] + [("ewc", e) for e in range(3)]
    # Each row is the long run's record at its epoch (DN2 = epoch 0, Early = its stopping epoch).
    assert result.auroc("DN2") == long_run[0].auroc and result.auroc("PANDA-Early") == long_run[1].auroc
    assert result.auroc("Unregularised (last epoch)") == long_run[4].auroc
    assert result.auroc("Unregularised (best epoch)") == max(r.auroc for r in long_run)
    assert result.auroc("PANDA-EWC") == result.curves["ewc"][-1].auroc
    # SES: snapshots at epochs 2 and 4, every test image won by one of them.
    assert result.ses_snapshot_epochs == [2, 4] and sum(result.ses_choice_counts) == len(test_set)
    assert "PANDA-SES" in result.table() and result.to_dict()["rows"][0]["method"] == "DN2"
    with pytest.raises(ValueError, match="normal and anomalous"):
        compare_strategies(normal, normal, settings())


def test_compare_can_leave_strategies_out(normal, test_set):
    result = compare_strategies(normal, test_set, settings(grad_clip=1.0, lr=0.05), epochs=2, early_epoch=1,
                                strategies=("early",))
    assert [row.method for row in result.rows] == ["DN2", "PANDA-Early", "Unregularised (last epoch)",
                                                   "Unregularised (best epoch)", "DN2 + epoch 1 (fused)"]
    assert set(result.curves) == {"unregularised"}


def test_compare_scores_every_row_with_the_settings_metric(normal, test_set, monkeypatch):
    import core.adaptation.ses as ses_module
    import core.adaptation.strategies as strategies_module
    from core.knn import KnnIndex

    metrics: list[str] = []

    class RecordingIndex(KnnIndex):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            metrics.append(self.metric)

    for module in (ses_module, strategies_module):
        monkeypatch.setattr(module, "KnnIndex", RecordingIndex)
    result = compare_strategies(normal, test_set, settings(grad_clip=1.0, lr=0.05, metric="cosine", ewc_step="proximal"),
                                epochs=2, early_epoch=1, ewc_epochs=1, strategies=("early", "ses", "ewc"),
                                ewc_curves=False)
    # Per-epoch curves (3 records), two SES snapshots, the EWC end score: all cosine.
    assert len(metrics) >= 6 and set(metrics) == {"cosine"}
    assert result.auroc("PANDA-EWC") is not None


# ---------------------------------------------------------------------- automatic Early (normal images only)
@pytest.fixture(autouse=True)
def _private_fisher_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY_FISHER_CACHE", str(tmp_path / "fisher-cache"))


def test_fixed_early_stays_the_papers(normal):
    run = adapt(normal, settings(epochs=2, grad_clip=1.0, lr=0.05))
    assert run.prepared.holdout is None and run.result.auto_stop_epoch is None
    assert [r.epoch for r in run.result.records if r.early_stop] == [2]


# ---------------------------------------------------------------------- EWC's Fisher: the offline photo pool
def test_ewc_fisher_comes_from_the_photo_pool_once_then_from_the_cache(normal, tmp_path):
    from core.adaptation.fisher_pool import natural_photos, pool_batches

    ewc = settings(strategy="ewc", epochs=1, grad_clip=1.0, lr=0.05, ewc_step="proximal")
    first = adapt(normal, ewc)
    assert first.fisher.source.startswith("offline photo pool") and "chelsea.png" in first.fisher.source
    assert first.fisher.samples == ewc.fisher_batches * 32 and first.fisher.total() > 0  # the paper's minibatches
    cached = list((tmp_path / "fisher-cache").glob("fisher-pool-*.npz"))
    assert len(cached) == 1
    again = adapt(normal, ewc)  # same backbone, pieces and size: read back, not estimated again
    assert all(torch.equal(again.fisher.values[k], first.fisher.values[k]) for k in first.fisher.values)
    # The normal images remain a choice, and give another Fisher.
    own = adapt(normal, dataclasses.replace(ewc, fisher_source="normal"))
    assert own.fisher.source.startswith("normal training images")
    assert any(not torch.equal(own.fisher.values[k], first.fisher.values[k]) for k in first.fisher.values)
    # The pool: varied crops of natural photos, seeded.
    batches = list(pool_batches(SIZE, 2, 4, seed=0))
    assert len(natural_photos()) >= 2 and batches[0].shape == (4, 3, 32, 32)
    assert float(batches[0].std()) > 0.05 and not torch.equal(batches[0], batches[1])
    assert torch.equal(next(iter(pool_batches(SIZE, 1, 4, seed=0))), batches[0])


def test_minibatch_fisher_is_the_papers_eq3(normal):
    """Eq. 3 over minibatches: the mean of squared gradients of each minibatch's loss (labels = top-1)."""
    from core.adaptation.fisher import estimate_fisher_minibatch

    prepared = prepare(normal, settings())
    network = prepared.new_network()
    parts = [torch.arange(0, 8), torch.arange(8, 16)]
    fisher = estimate_fisher_minibatch(network, ((prepared.normal.batch(p), prepared.normal.start) for p in parts),
                                       2, "test")
    expected = {}
    for part in parts:
        logits = network.logits(network.features(prepared.normal.batch(part), prepared.normal.start))
        loss = torch.nn.functional.cross_entropy(logits, logits.argmax(1).detach())
        grads = torch.autograd.grad(loss, list(network.trainable_parameters().values()))
        for name, g in zip(network.trainable_parameters(), grads):
            expected[name] = expected.get(name, 0) + g.pow(2) / 2
    for name, value in expected.items():
        assert torch.allclose(fisher.values[name], value, rtol=1e-4, atol=1e-12), name
    assert fisher.samples == 16
