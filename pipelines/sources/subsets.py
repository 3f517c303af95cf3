"""Subsets of a dataset: the standard long-tailed subset (`long_tailed_indices`), the Many/Medium/Few shot
groups by training count, and the validation split held out of the training images (`hold_out_validation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixtail.errors import DataError


def long_tailed_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> np.ndarray:
    """n_k = int(n_max · (1/ρ)^(k/(C−1))), the profile of CIFAR-LT (Cao et al., LDAM)."""
    if num_classes == 1:
        return np.array([n_max], dtype=np.int64)
    # The same float expression as the reference implementation, so int() truncates identically.
    return np.array([int(n_max * (1.0 / imbalance_ratio) ** (k / (num_classes - 1.0)))
                     for k in range(num_classes)], dtype=np.int64)


LT_SUBSET_RULES = ("ldam", "first")


def long_tailed_indices(labels: np.ndarray, imbalance_ratio: float, num_classes: int | None = None,
                        rule: str = "ldam") -> np.ndarray:
    """Indices of the standard long-tailed subset, grouped by class (class 0 first).

    n_max is the size of the largest class and n_k = long_tailed_counts(n_max, C, ρ). Which n_k images of
    class k are kept depends on `rule`:

    - "ldam" (the default): the protocol of LDAM-DRW's `imbalance_cifar.py`, which CMO, BCL and RIDE reuse
      and every published CIFAR-LT number was trained on: seed numpy's legacy generator with 0 once, then
      for each class in order shuffle the positions of that class's images and keep the first n_k, in
      the shuffled order. For CIFAR-100 at ρ = 100, 50, 10 these are exactly the canonical subsets.
    - "first": the first n_k images of class k in dataset order (an older rule, kept only by name).
    """
    labels = np.asarray(labels)
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    if rule not in LT_SUBSET_RULES:
        raise ValueError(f"long-tailed subset rule must be one of {', '.join(LT_SUBSET_RULES)}, got {rule!r}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    n_max = int(np.bincount(labels, minlength=num_classes).max())
    keep = long_tailed_counts(n_max, num_classes, imbalance_ratio)
    # RandomState(0) is the legacy global generator right after np.random.seed(0), without touching it.
    rng = np.random.RandomState(0) if rule == "ldam" else None
    parts = []
    for k in range(num_classes):
        idx = np.flatnonzero(labels == k)
        if rng is not None:
            rng.shuffle(idx)
        parts.append(idx[: keep[k]])
    return np.concatenate(parts).astype(np.int64)


MANY_MIN = 101  # Many: more than 100 training images


FEW_MAX = 19  # Few: fewer than 20


def shot_groups(train_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Class indices of the Many (>100), Medium (20..100) and Few (<20) groups."""
    counts = np.asarray(train_counts)
    return {
        "many": np.flatnonzero(counts >= MANY_MIN),
        "medium": np.flatnonzero((counts > FEW_MAX) & (counts < MANY_MIN)),
        "few": np.flatnonzero(counts <= FEW_MAX),
    }


@dataclass(frozen=True)
class HeldOut:
    """A validation split of a training split: indices into the training split as read (before the LT subset)."""

    val: np.ndarray  # (C·k,) int64, class by class, ascending within a class
    train: np.ndarray  # the LT subset's indices, in its order, without the ones val took from it
    from_subset: np.ndarray  # (C,) int64: how many of class k's validation images came out of its LT subset


def hold_out_validation(labels: np.ndarray, kept: np.ndarray | None, per_class: int, seed: int,
                        classes: list[str]) -> HeldOut:
    """k = per_class images of every class held out for validation, never trained on.

    A class's validation images are drawn (seeded, numpy's PCG64 from `seed`, class by class in label order)
    from the training images the long-tailed subset `kept` left out; a class with fewer than k left out (the
    head class keeps all of its images) takes the rest from its own subset, which then loses them. kept=None
    means the subset is the whole split (a balanced dataset, or one long-tailed on disk): every class then
    draws from its own images. A class left with no training image is an error naming it.
    """
    labels = np.asarray(labels)
    kept = np.arange(len(labels), dtype=np.int64) if kept is None else np.asarray(kept, dtype=np.int64)
    in_subset = np.zeros(len(labels), bool)
    in_subset[kept] = True
    rng = np.random.default_rng(seed)
    val, taken_from_subset, from_subset = [], [], np.zeros(len(classes), np.int64)
    for k, name in enumerate(classes):
        left_out = np.flatnonzero((labels == k) & ~in_subset)
        own = kept[labels[kept] == k]
        out_part = rng.permutation(left_out)[:per_class]
        need = per_class - len(out_part)
        own_part = rng.permutation(own)[:need] if need > 0 else own[:0]
        if len(own) - len(own_part) < 1:
            raise DataError(f"class {name!r} (label {k}) has {len(own)} training image(s) and "
                            f"{len(left_out)} left out by the long-tailed subset: holding out "
                            f"data.val_per_class={per_class} for validation leaves it none to train on; "
                            f"lower data.val_per_class")
        val.append(np.sort(np.concatenate([out_part, own_part])))
        taken_from_subset.append(own_part)
        from_subset[k] = len(own_part)
    drop = np.zeros(len(labels), bool)
    drop[np.concatenate(taken_from_subset)] = True
    return HeldOut(np.concatenate(val).astype(np.int64), kept[~drop[kept]], from_subset)


VAL_RECORD = "val_split.json"  # in the run directory: which images a run held out


def validation_record(data, ds) -> dict:
    """What names a validation split so that anyone can rebuild it: the keys that draw it, its class counts,
    and each image (its file, its .beton position, or its position in the training split as read)."""
    if getattr(ds, "files", None) is not None:
        images = {"files": list(ds.files)}
    elif getattr(ds, "positions", None) is not None:
        images = {"beton": str(ds.path), "positions": np.asarray(ds.positions).tolist()}
    else:
        images = {"train_split_index": None if ds.origin is None else np.asarray(ds.origin).tolist()}
    return {"dataset": data.dataset, "val_per_class": data.val_per_class, "val_seed": data.val_seed,
            "val_list": data.val_list or None, "imbalance_ratio": data.imbalance_ratio, "lt_subset": data.lt_subset,
            "classes": list(ds.classes), "counts": np.bincount(ds.labels, minlength=len(ds.classes)).tolist(),
            "labels": np.asarray(ds.labels).tolist(), **images}


def sample_per_class(labels: np.ndarray, per_class: int, seed: int, num_classes: int) -> np.ndarray:
    """Up to `per_class` indices of every class, drawn seeded (a validation list with more than k per class)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([np.sort(rng.permutation(np.flatnonzero(labels == k))[:per_class])
                           for k in range(num_classes)]).astype(np.int64)
