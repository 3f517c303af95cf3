"""Tests of pipelines/sampling.py: the foreground weights (class and instance modes), the statistics of
the weighted stream, the background permutation split across ranks, and per-batch generators.

    python -m pytest tests/test_sampling.py -q

Statistical tests use fixed seeds, so they are deterministic; each one also shows that the wrong
distribution would be rejected with the same draws, so a bound that tests nothing cannot slip in.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from mixtail.pipelines.sampling import (batch_generator, class_counts, foreground_class_probs, foreground_weights,
                                        sample_order, samples_per_rank)

P_ACCEPT = 1e-6  # the right distribution must have p above this; the wrong one far below


def lt_labels(counts, seed: int = 0) -> np.ndarray:
    """Labels with the given class counts, shuffled (so no test depends on images being grouped by class)."""
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels)


# 10 classes from 2000 down to 20 images (ρ = 100), ~5.5k images.
COUNTS = np.array([int(2000 * 0.01 ** (k / 9)) for k in range(10)])
LABELS = lt_labels(COUNTS)


def expected_q(counts, mode: str, gamma: float) -> np.ndarray:
    """q(k) written from docs/method.md, "Foreground sampling": class: n_k^-γ / Σ n_l^-γ;
    instance: n_k·n_k^-γ / Σ n_l·n_l^-γ."""
    n = np.asarray(counts, dtype=np.float64)
    if mode == "class":
        raw = np.array([c ** -gamma if c > 0 else 0.0 for c in n])
    else:
        raw = np.array([c * c ** -gamma if c > 0 else 0.0 for c in n])
    return raw / raw.sum()


# --------------------------------------------------------------------------------------------------
# Formulas
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["class", "instance"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_foreground_class_probs_formula(mode, gamma):
    q = foreground_class_probs(COUNTS, mode, gamma)
    np.testing.assert_allclose(q, expected_q(COUNTS, mode, gamma), rtol=1e-12, atol=0)


def test_foreground_class_probs_named_cases():
    n = np.array([400, 100, 25])
    # γ=1 class mode: ∝ 1/n -> 1:4:16; γ=1 instance mode: balanced; γ=0 class: balanced; γ=0 instance: the prior.
    np.testing.assert_allclose(foreground_class_probs(n, "class", 1.0), np.array([1, 4, 16]) / 21, rtol=1e-12)
    np.testing.assert_allclose(foreground_class_probs(n, "instance", 1.0), np.full(3, 1 / 3), rtol=1e-12)
    np.testing.assert_allclose(foreground_class_probs(n, "class", 0.0), np.full(3, 1 / 3), rtol=1e-12)
    np.testing.assert_allclose(foreground_class_probs(n, "instance", 0.0), n / n.sum(), rtol=1e-12)
    # γ=0.5: class ∝ n^-0.5 = 1/20 : 1/10 : 1/5 -> 1:2:4; instance ∝ n^0.5 -> 20:10:5 = 4:2:1.
    np.testing.assert_allclose(foreground_class_probs(n, "class", 0.5), np.array([1, 2, 4]) / 7, rtol=1e-12)
    np.testing.assert_allclose(foreground_class_probs(n, "instance", 0.5), np.array([4, 2, 1]) / 7, rtol=1e-12)


@pytest.mark.parametrize("mode", ["class", "instance"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_foreground_weights_per_image(mode, gamma):
    w = foreground_weights(LABELS, 10, mode, gamma)
    assert w.shape == LABELS.shape and w.dtype == np.float64
    assert abs(w.sum() - 1) < 1e-12 and (w > 0).all()
    q = expected_q(COUNTS, mode, gamma)
    for k in range(10):
        wk = w[LABELS == k]
        # Uniform inside a class, and the class total is q(k).
        np.testing.assert_allclose(wk, np.full(COUNTS[k], q[k] / COUNTS[k]), rtol=1e-10)
    if mode == "instance":
        # CMO's rule: each image weighs n_{y_i}^-γ (normalized).
        raw = np.array([float(COUNTS[y]) ** -gamma for y in LABELS])
        np.testing.assert_allclose(w, raw / raw.sum(), rtol=1e-10)


def test_absent_class_gets_zero_probability():
    labels = np.array([0, 0, 0, 2, 2, 3])
    for mode in ("class", "instance"):
        q = foreground_class_probs(class_counts(labels, 5), mode, 1.0)
        assert q[1] == 0 and q[4] == 0 and np.isfinite(q).all() and abs(q.sum() - 1) < 1e-12
        w = foreground_weights(labels, 5, mode, 1.0)
        assert np.isfinite(w).all() and abs(w.sum() - 1) < 1e-12


def test_class_counts_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="labels must lie in"):
        class_counts(np.array([0, 5]), 5)
    with pytest.raises(ValueError):
        class_counts(np.array([-1, 0]), 5)


def test_bad_mode_rejected():
    with pytest.raises(ValueError, match="fg_sampling"):
        foreground_class_probs(COUNTS, "balanced", 1.0)


# --------------------------------------------------------------------------------------------------
# Statistics of the weighted stream
# --------------------------------------------------------------------------------------------------


def class_histogram(mode: str, gamma: float, world_size: int, epochs=(0, 1, 2)) -> np.ndarray:
    w = foreground_weights(LABELS, 10, mode, gamma)
    hist = np.zeros(10, np.int64)
    for epoch in epochs:
        for rank in range(world_size):
            idx = sample_order(w, epoch=epoch, seed=7, rank=rank, world_size=world_size, num_samples=len(LABELS))
            hist += np.bincount(LABELS[idx], minlength=10)
    return hist


def chi2_p(hist: np.ndarray, q: np.ndarray) -> float:
    return stats.chisquare(hist, hist.sum() * q).pvalue


@pytest.mark.parametrize("mode,other", [("class", "instance"), ("instance", "class")])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_sample_order_class_frequencies_match_q(mode, other, gamma):
    hist = class_histogram(mode, gamma, world_size=1)
    assert hist.sum() == 3 * len(LABELS)
    p_right = chi2_p(hist, expected_q(COUNTS, mode, gamma))
    p_other_mode = chi2_p(hist, expected_q(COUNTS, other, gamma))
    # A γ that is a little off (or the background's prior P_Y) must be rejected by the same draws too.
    p_gamma_off = chi2_p(hist, expected_q(COUNTS, mode, gamma + 0.15))
    p_prior = chi2_p(hist, COUNTS / COUNTS.sum())
    assert p_right > P_ACCEPT, f"{mode} γ={gamma}: draws do not follow q(k) (p={p_right:.2e}), hist={hist}"
    assert p_other_mode < P_ACCEPT, f"the test cannot tell {mode} from {other} (p={p_other_mode:.2e})"
    assert p_gamma_off < P_ACCEPT, f"the test cannot tell γ={gamma} from γ={gamma + 0.15} (p={p_gamma_off:.2e})"
    if not (mode == "instance" and gamma == 0.0):  # instance mode at γ=0 *is* the prior
        assert p_prior < P_ACCEPT


def test_foreground_distribution_pooled_over_three_ranks():
    hist = class_histogram("class", 1.0, world_size=3)
    assert hist.sum() == 3 * 3 * (len(LABELS) // 3)
    assert chi2_p(hist, expected_q(COUNTS, "class", 1.0)) > P_ACCEPT
    assert chi2_p(hist, expected_q(COUNTS, "instance", 1.0)) < P_ACCEPT


def test_images_within_a_class_are_uniform():
    # The tail class (20 images) under class-balanced-and-more sampling: every image equally likely.
    w = foreground_weights(LABELS, 10, "class", 1.0)
    draws = np.concatenate([sample_order(w, epoch=e, seed=3, rank=0, world_size=1, num_samples=len(LABELS))
                            for e in range(4)])
    tail = np.flatnonzero(LABELS == 9)
    hits = np.array([(draws == i).sum() for i in tail])
    assert hits.sum() > 2000
    assert stats.chisquare(hits).pvalue > P_ACCEPT
    skewed = np.linspace(0.5, 1.5, len(tail))
    assert stats.chisquare(hits, hits.sum() * skewed / skewed.sum()).pvalue < P_ACCEPT


def test_zero_weight_images_are_never_drawn():
    w = np.zeros(50)
    w[[0, 7, 49]] = [0.5, 0.25, 0.25]
    idx = sample_order(w, epoch=0, seed=0, rank=0, world_size=1, num_samples=50)
    assert set(np.unique(idx)) <= {0, 7, 49}
    assert idx.dtype == np.int64 and len(idx) == 50
    idx = np.concatenate([sample_order(w, epoch=e, seed=0, rank=0, world_size=1, num_samples=50)
                          for e in range(40)])
    hits = np.array([(idx == i).sum() for i in (0, 7, 49)])
    assert stats.chisquare(hits, hits.sum() * np.array([0.5, 0.25, 0.25])).pvalue > P_ACCEPT


def test_foreground_stream_reproducible_and_rank_distinct():
    w = foreground_weights(LABELS, 10, "class", 1.0)
    kw = dict(seed=5, world_size=3, num_samples=len(LABELS))
    a = sample_order(w, epoch=2, rank=1, **kw)
    assert np.array_equal(a, sample_order(w, epoch=2, rank=1, **kw))
    assert not np.array_equal(a, sample_order(w, epoch=3, rank=1, **kw))
    assert not np.array_equal(a, sample_order(w, epoch=2, rank=2, **kw))
    assert not np.array_equal(a, sample_order(w, epoch=2, rank=1, **{**kw, "seed": 6}))
    assert len(a) == len(LABELS) // 3


def test_sample_order_argument_checks():
    with pytest.raises(ValueError, match="rank"):
        sample_order(None, epoch=0, seed=0, rank=3, world_size=3, num_samples=10)
    with pytest.raises(ValueError, match="shape"):
        sample_order(np.full(9, 1 / 9), epoch=0, seed=0, rank=0, world_size=1, num_samples=10)


# --------------------------------------------------------------------------------------------------
# The background stream
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples", [103, 120])
def test_background_is_one_permutation_split_across_ranks(num_samples):
    for epoch in (0, 1, 5):
        single = sample_order(None, epoch=epoch, seed=11, rank=0, world_size=1, num_samples=num_samples)
        assert single.dtype == np.int64
        assert np.array_equal(np.sort(single), np.arange(num_samples)), "world_size 1 must be a permutation"
        for world in range(1, 6):
            per_rank = samples_per_rank(num_samples, world)
            assert per_rank == num_samples // world
            parts = [sample_order(None, epoch=epoch, seed=11, rank=r, world_size=world, num_samples=num_samples)
                     for r in range(world)]
            assert all(len(p) == per_rank for p in parts), "every rank must see the same number of samples"
            union = np.concatenate(parts)
            assert len(np.unique(union)) == len(union), "ranks overlap"
            assert np.array_equal(np.sort(union), np.sort(single[: per_rank * world]))


def test_background_reproducible_and_changes_with_epoch_and_seed():
    kw = dict(rank=1, world_size=2, num_samples=500)
    a = sample_order(None, epoch=3, seed=0, **kw)
    assert np.array_equal(a, sample_order(None, epoch=3, seed=0, **kw))
    assert not np.array_equal(a, sample_order(None, epoch=4, seed=0, **kw))
    assert not np.array_equal(a, sample_order(None, epoch=3, seed=1, **kw))
    # Different epochs are different permutations, not a rotation of one another.
    b = sample_order(None, epoch=4, seed=0, rank=0, world_size=1, num_samples=500)
    c = sample_order(None, epoch=3, seed=0, rank=0, world_size=1, num_samples=500)
    assert (b == c).mean() < 0.05


def test_background_is_uniform_over_positions():
    # Over many epochs every index lands in the first half of the permutation about half the time.
    n, epochs = 40, 4000
    first_half = np.zeros(n)
    for e in range(epochs):
        first_half[sample_order(None, epoch=e, seed=0, rank=0, world_size=2, num_samples=n)] += 1
    assert stats.chisquare(first_half).pvalue > P_ACCEPT
    assert first_half.sum() == epochs * (n // 2)


# --------------------------------------------------------------------------------------------------
# Per-batch generators
# --------------------------------------------------------------------------------------------------


def test_batch_generator_reproducible_and_distinct():
    def draw(*args):
        return batch_generator(*args).random(8)

    a = draw(0, 1, 2, 3)
    assert np.array_equal(a, draw(0, 1, 2, 3))
    for other in [(1, 1, 2, 3), (0, 2, 2, 3), (0, 1, 3, 3), (0, 1, 2, 4)]:
        assert not np.array_equal(a, draw(*other)), other
