"""Sampling for SMC: the uniform background stream and the weighted foreground stream.

One pure function, `sample_order`, draws the indices of an epoch for one rank. Every backend (torch,
DALI, FFCV) calls it, so they all see the same samples for the same (seed, epoch, rank, world_size).

- Background (weights=None): a shuffled pass over the dataset. The permutation depends on (seed, epoch)
  only and rank r takes every world_size-th element of it, so the ranks are disjoint and their union is
  the single-process epoch (minus the tail that does not divide evenly).
- Foreground (weights given): draws with replacement from the per-image weights. Rank r draws its own
  part of the global stream from a generator seeded by (seed, epoch, rank); draws are i.i.d., so the
  global stream has the right distribution for any world size.

    from mixtail.pipelines.sampling import foreground_weights, sample_order
    w = foreground_weights(labels, num_classes=100, mode="class", gamma=1.0)
    fg = sample_order(w, epoch=3, seed=0, rank=0, world_size=1, num_samples=len(labels))
"""

from __future__ import annotations

from typing import Literal

import numpy as np

_BACKGROUND_STREAM = 0
_FOREGROUND_STREAM = 1
_BATCH_PARAMS_STREAM = 2
_MIX_DECISION_STREAM = 3
_BATCH_BOX_STREAM = 4


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return np.bincount(labels, minlength=num_classes).astype(np.int64)


def foreground_class_probs(counts: np.ndarray, mode: Literal["class", "instance"], gamma: float) -> np.ndarray:
    """q(k), the probability that a foreground is of class k (classes with no images get 0).

    class:    q(k) ∝ n_k^-γ           (Eq. 2 of the paper)
    instance: each image weighs n_y^-γ, so q(k) ∝ n_k^(1-γ)   (CMO's official code)
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    q = np.zeros_like(counts)
    if mode == "class":
        q[present] = counts[present] ** -gamma
    elif mode == "instance":
        q[present] = counts[present] ** (1.0 - gamma)
    else:
        raise ValueError(f"fg_sampling must be 'class' or 'instance', got {mode!r}")
    return q / q.sum()


def foreground_weights(labels: np.ndarray, num_classes: int, mode: Literal["class", "instance"],
                       gamma: float) -> np.ndarray:
    """Per-image sampling probabilities (sum 1): q(y_i) spread uniformly over the images of class y_i."""
    labels = np.asarray(labels)
    counts = class_counts(labels, num_classes)
    q = foreground_class_probs(counts, mode, gamma)
    w = q[labels] / counts[labels]
    return w / w.sum()


def samples_per_rank(num_samples: int, world_size: int) -> int:
    """Samples each rank sees per epoch: the same on every rank (the tail that does not divide is dropped)."""
    return num_samples // world_size


def batches_per_epoch(num_samples: int, batch_size: int, *, rank: int, world_size: int, train: bool,
                      drop_last: bool = True) -> int:
    """Exact batches per epoch on a rank: training drops the partial last batch unless drop_last is False
    (the count is equal on every rank either way: each sees samples_per_rank); evaluation covers this rank's
    shard rank::world_size, a partial last batch included."""
    if train:
        per_rank = samples_per_rank(num_samples, world_size)
        return per_rank // batch_size if drop_last else -(-per_rank // batch_size)
    return -(-len(range(rank, num_samples, world_size)) // batch_size)


def generator(seed: int, epoch: int, *stream: int) -> np.random.Generator:
    """A generator for one named stream of (seed, epoch, ...): streams never share draws."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, *stream])))


def weighted_draws(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    """n indices drawn with replacement with probabilities ∝ the increments of `cdf` (int64).

    Inverse-CDF draws: the same as rng.choice(p=weights), without its tolerance check on the sum.
    """
    idx = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
    return np.minimum(idx, len(cdf) - 1).astype(np.int64)


def sample_order(weights: np.ndarray | None, *, epoch: int, seed: int, rank: int, world_size: int,
                 num_samples: int) -> np.ndarray:
    """Indices this rank visits in `epoch`: samples_per_rank(num_samples, world_size) of them (int64).

    weights=None gives the uniform background stream (a permutation of range(num_samples), split across
    ranks); otherwise `weights` (length num_samples, summing to 1) gives the weighted foreground stream.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    per_rank = samples_per_rank(num_samples, world_size)
    if weights is None:
        perm = generator(seed, epoch, _BACKGROUND_STREAM).permutation(num_samples)
        return perm[rank : per_rank * world_size : world_size].astype(np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (num_samples,):
        raise ValueError(f"weights has shape {weights.shape}, expected ({num_samples},)")
    return weighted_draws(generator(seed, epoch, _FOREGROUND_STREAM, rank), np.cumsum(weights), per_rank)


def batch_generator(seed: int, epoch: int, rank: int, batch: int) -> np.random.Generator:
    """The generator for one batch's augmentation and mixing parameters.

    Seeding per batch makes every batch reproducible on its own: a resumed run can start mid-epoch,
    and two backends given the same (seed, epoch, rank, batch) draw the same boxes, λ and crops.
    """
    return generator(seed, epoch, _BATCH_PARAMS_STREAM, rank, batch)


def batch_box_generator(seed: int, epoch: int, batch: int) -> np.random.Generator:
    """The generator of global batch `batch`'s one λ and box (mix.box_per=batch): the same on every rank."""
    return generator(seed, epoch, _BATCH_BOX_STREAM, batch)


def batch_mixed(seed: int, epoch: int, batch: int, mix_prob: float) -> bool:
    """Whether global batch `batch` of `epoch` is mixed (mix.mix_per=batch): one draw per global batch, the
    same on every rank, so a batch is mixed or not as a whole whatever the world size (CMO's code draws once
    per batch on one process)."""
    return bool(generator(seed, epoch, _MIX_DECISION_STREAM, batch).random() < mix_prob)
