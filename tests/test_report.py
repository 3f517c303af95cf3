"""trainer/report.py: the Table 4 scores (docs/method.md, "Feature-space scores") on a hand-made case and against loops,
class vectors (from a generated file laid out as the GloVe class-vector file for both CIFARs), confusions, the
best evaluated epoch, and the files of a report.

    python -m pytest tests/test_report.py -q
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from helpers.images import CIFAR10_CLASSES as CIFAR10_NAMES
from mixtail.errors import DataError
from mixtail.trainer.evaluate import accuracy_summary
from mixtail.trainer.report import (Confusion, best_eval, class_centres, group_means, inter_class_scores,
                                    load_class_vectors, plot_centres_pca, semantic_similarity_rows, top_confusions,
                                    write_report)

# Three centres 3, 4 and 5 apart (a 3-4-5 triangle) and a fourth class with no training image (NaN centre).
# Many: class 0; Medium: class 1; Few: classes 2 and 3.
CENTRES = np.array([[1.0, 1.0], [4.0, 1.0], [1.0, 5.0], [np.nan, np.nan]], dtype=np.float32)
COUNTS = np.array([500, 50, 5, 8])
VECTORS = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, -1.0]])
# IS_k = exp(−(1/3)·Σ_j d_kj / 10): row sums of distances 0+3+4, 3+0+5, 4+5+0.
IS_HAND = [0.7918895663367816, 0.7659283383646487, 0.7408182206817179]
# Sc: cos(c0,c1) = 5/√34, cos(c0,c2) = 6/√52, cos(c1,c2) = 9/√442; Ss: 0, 1/√2, 1/√2; diagonals agree.
_A, _B, _C, _H = 5 / math.sqrt(34), 6 / math.sqrt(52), 9 / math.sqrt(442), 1 / math.sqrt(2)
SS_HAND = [(_A + abs(_H - _B)) / 3, (_A + abs(_H - _C)) / 3, (abs(_H - _B) + abs(_H - _C)) / 3]
SS_HAND_LITERAL = [0.32747881295461345, 0.37883778738668233, 0.13465464986626635]


def _is_loops(centres: np.ndarray, tau: float = 10.0) -> list[float]:
    keep = [k for k in range(len(centres)) if not any(math.isnan(v) for v in centres[k])]
    out = [math.nan] * len(centres)
    for k in keep:
        total = sum(math.dist(centres[k], centres[j]) for j in keep)
        out[k] = math.exp(-total / len(keep) / tau)
    return out


def _cos(a, b) -> float:
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


def _ss_loops(centres: np.ndarray, vectors: np.ndarray) -> list[float]:
    keep = [k for k in range(len(centres)) if not any(math.isnan(v) for v in centres[k])]
    out = [math.nan] * len(centres)
    for i in keep:
        out[i] = sum(abs(_cos(vectors[i], vectors[j]) - _cos(centres[i], centres[j])) for j in keep) / len(keep)
    return out


def test_hand_made_scores_and_groups():
    assert SS_HAND == pytest.approx(SS_HAND_LITERAL, rel=1e-12)
    is_k = inter_class_scores(CENTRES)
    np.testing.assert_allclose(is_k[:3], IS_HAND, rtol=1e-6)
    assert np.isnan(is_k[3])
    np.testing.assert_allclose(is_k, _is_loops(CENTRES.astype(float)), rtol=1e-6, equal_nan=True)
    ss = semantic_similarity_rows(CENTRES, VECTORS)
    np.testing.assert_allclose(ss[:3], SS_HAND, rtol=1e-6)
    assert np.isnan(ss[3])

    g = group_means(is_k, COUNTS)
    assert g["all"] == pytest.approx(sum(IS_HAND) / 3, rel=1e-6)
    assert (g["many"], g["medium"], g["few"]) == pytest.approx(IS_HAND, rel=1e-6)  # few: class 3 skipped
    s = group_means(ss, COUNTS)
    assert s["all"] == pytest.approx(0.28032375006918736, rel=1e-6)  # SS = (1/C²)·Σ_ij over the 3 centres
    assert (s["many"], s["medium"], s["few"]) == pytest.approx(SS_HAND, rel=1e-6)

    # The absent class's vector plays no part.
    other = VECTORS.copy()
    other[3] = [-7.0, 2.0]
    np.testing.assert_array_equal(semantic_similarity_rows(CENTRES, other), ss)


def test_tau_and_an_empty_group():
    np.testing.assert_allclose(inter_class_scores(CENTRES[:3], tau=1.0), np.exp([-7 / 3, -8 / 3, -3.0]), rtol=1e-6)
    g = group_means(np.array([0.5, 0.25, np.nan]), np.array([200, 300, 50]))
    assert g == {"all": 0.375, "many": 0.375, "medium": None, "few": None}


@pytest.mark.parametrize("num_classes,dim,absent", [(7, 5, ()), (11, 3, (0, 6)), (2, 9, (1,))])
def test_scores_against_loops_on_random_centres(num_classes, dim, absent):
    rng = np.random.default_rng(num_classes)
    centres = rng.normal(size=(num_classes, dim)) * rng.uniform(0.5, 20)
    centres[list(absent)] = np.nan
    vectors = rng.normal(size=(num_classes, 4))
    np.testing.assert_allclose(inter_class_scores(centres), _is_loops(centres), rtol=1e-10, equal_nan=True)
    np.testing.assert_allclose(semantic_similarity_rows(centres, vectors), _ss_loops(centres, vectors),
                               rtol=1e-10, atol=1e-14, equal_nan=True)
    counts = rng.integers(1, 300, num_classes)
    rows = semantic_similarity_rows(centres, vectors)
    for name, keep in (("many", counts > 100), ("medium", (counts >= 20) & (counts <= 100)), ("few", counts < 20)):
        vals = [r for r, k in zip(rows, keep) if k and not math.isnan(r)]
        assert group_means(rows, counts)[name] == (pytest.approx(sum(vals) / len(vals)) if vals else None)


def test_class_centres_against_a_loop():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(50, 6)).astype(np.float32)
    labels = rng.integers(0, 5, 50)
    labels[labels == 3] = 4  # class 3 absent
    centres = class_centres(feats, labels, 5)
    assert centres.dtype == np.float32 and centres.shape == (5, 6)
    for k in (0, 1, 2, 4):
        np.testing.assert_allclose(centres[k], feats[labels == k].mean(0), rtol=1e-5, atol=1e-6)
    assert np.isnan(centres[3]).all()
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        class_centres(feats, labels + 1, 5)


def test_load_class_vectors_synthetic(tmp_path):
    path = tmp_path / "v.npz"
    np.savez(path, names=np.array(["Lawn_Mower", "apple", "sweet  pepper"]), vectors=np.eye(3, dtype=np.float32))
    got = load_class_vectors(path, ["sweet_pepper", "lawn mower", "APPLE"])
    np.testing.assert_array_equal(got, np.eye(3)[[2, 0, 1]])
    with pytest.raises(DataError, match=r"'banana'"):
        load_class_vectors(path, ["apple", "banana"])
    with pytest.raises(DataError, match="not found"):
        load_class_vectors(tmp_path / "absent.npz", ["apple"])
    np.savez(tmp_path / "w.npz", words=np.array(["a"]), vectors=np.eye(1))
    with pytest.raises(DataError, match="'names' and 'vectors'"):
        load_class_vectors(tmp_path / "w.npz", ["a"])


@pytest.fixture
def glove_like(tmp_path) -> tuple[Path, list[str]]:
    """An .npz in the layout of the GloVe class-vector file for both CIFARs (cifar10_names/_vectors and
    cifar100_names/_vectors, 50-d float32), with random vectors; the hundred names include the ten, so both
    sets know every CIFAR-10 name (the tie the loader breaks towards the smaller set). The hundred names."""
    rng = np.random.default_rng(0)
    names100 = sorted(CIFAR10_NAMES + [f"class_{k:02d}_name" for k in range(90)])
    path = tmp_path / "class_vectors.npz"
    np.savez(path, cifar10_names=np.array(CIFAR10_NAMES), cifar10_vectors=rng.normal(0, 1, (10, 50)).astype(np.float32),
             cifar100_names=np.array(names100), cifar100_vectors=rng.normal(0, 1, (100, 50)).astype(np.float32))
    return path, names100


def test_load_class_vectors_cifar10_and_cifar100_sets(glove_like):
    path, names100 = glove_like
    with np.load(path) as npz:
        raw = {k: npz[k] for k in npz.files}
    ten = load_class_vectors(path, CIFAR10_NAMES)
    assert ten.shape == (10, 50) and ten.dtype == np.float32
    for k, name in enumerate(CIFAR10_NAMES):
        np.testing.assert_array_equal(ten[k], raw["cifar10_vectors"][list(raw["cifar10_names"]).index(name)])
    hundred = load_class_vectors(path, names100)
    assert hundred.shape == (100, 50)
    for k, name in enumerate(names100):
        np.testing.assert_array_equal(hundred[k], raw["cifar100_vectors"][list(raw["cifar100_names"]).index(name)])
    # Class order follows the run, not the file.
    np.testing.assert_array_equal(load_class_vectors(path, CIFAR10_NAMES[::-1]), ten[::-1])
    assert np.linalg.norm(hundred, axis=1).min() > 0  # every name has a direction
    with pytest.raises(DataError, match="'spaceship'"):
        load_class_vectors(path, CIFAR10_NAMES[:9] + ["spaceship"])


def test_top_confusions_by_hand():
    names = ["a", "b", "c"]
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    preds = np.array([1, 1, 2, 0, 0, 0, 1, 2, 2, 2, 2, 0])
    got = top_confusions(labels, preds, names)
    # a→b 2 of 4, b→a 2 of 3 (larger fraction first), a→c 1 of 4, c→a 1 of 5.
    assert got == [("b", "a", 2, pytest.approx(2 / 3)), ("a", "b", 2, 0.5), ("a", "c", 1, 0.25), ("c", "a", 1, 0.2)]
    assert top_confusions(labels, preds, names, k=1) == got[:1]
    assert top_confusions(labels, labels, names) == []
    with pytest.raises(ValueError):
        top_confusions(labels, preds + 1, names)


def test_best_eval(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"epoch": 1, "loss": 2.0},
               {"epoch": 1, "eval": {"all": 40.0, "many": 60.0, "medium": 30.0, "few": None}},
               {"epoch": 2, "eval": {"all": 55.5, "many": 70.0, "medium": 50.0, "few": 10.0}},
               {"epoch": 3, "eval": {"all": 55.5, "many": 60.0, "medium": 55.0, "few": 20.0}},
               {"epoch": 4, "eval": {"all": 50.0, "many": 65.0, "medium": 45.0, "few": 5.0}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert best_eval(path) == records[2]  # the earliest of the tied best
    path.write_text(json.dumps(records[0]) + "\n")
    assert best_eval(path) is None
    path.write_text(json.dumps(records[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:2"):
        best_eval(path)
    with pytest.raises(DataError, match="not found"):
        best_eval(tmp_path / "none.jsonl")


REPORT_KEYS = {"top1", "best_epoch", "inter_class_score", "semantic_similarity_score"}
GROUP_KEYS = {"all", "many", "medium", "few"}


def _final(counts: np.ndarray) -> dict:
    correct, total = np.array([9.0, 4.0, 1.0, 0.0]), np.array([10.0, 10.0, 10.0, 10.0])
    return accuracy_summary(correct, total, counts)


@pytest.mark.parametrize("with_vectors", [True, False])
def test_write_report_files_and_keys(tmp_path, with_vectors):
    names = ["cat", "dog", "emu", "yak"]
    final = _final(COUNTS)
    best = {"epoch": 7, "step": 70, "eval": {"all": 41.0, "many": 95.0, "medium": 35.0, "few": 7.5}}
    labels = np.repeat(np.arange(4), 10)
    preds = labels.copy()
    preds[[10, 11, 12]] = 0
    scores = {"inter_class_score": inter_class_scores(CENTRES),
              "semantic_similarity_score": semantic_similarity_rows(CENTRES, VECTORS) if with_vectors else None}
    out = tmp_path / "rep"
    report = write_report(out, final=final, best=best, train_counts=COUNTS, class_names=names,
                          confusions=top_confusions(labels, preds, names), scores=scores, centres=CENTRES,
                          meta={"checkpoint": "runs/x/checkpoint.pt", "epoch": 10},
                          posthoc=[(1.0, final)])
    for f in ("report.md", "report.json", "class_centres.npy", "per_class_accuracy.png", "class_centres_pca.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report and REPORT_KEYS <= set(on_disk)
    assert set(on_disk["top1"]) == GROUP_KEYS
    assert on_disk["top1"] == {"all": 35.0, "many": 90.0, "medium": 40.0, "few": 5.0}
    assert on_disk["best_epoch"]["epoch"] == 7 and "best evaluated epoch" in on_disk["best_epoch"]["label"]
    assert on_disk["best_epoch"]["top1"] == best["eval"]
    assert set(on_disk["inter_class_score"]) == GROUP_KEYS
    assert on_disk["inter_class_score"]["many"] == pytest.approx(IS_HAND[0], rel=1e-6)
    assert on_disk["inter_class_score"]["few"] == pytest.approx(IS_HAND[2], rel=1e-6)
    if with_vectors:
        assert set(on_disk["semantic_similarity_score"]) == GROUP_KEYS
        assert on_disk["semantic_similarity_score"]["all"] == pytest.approx(0.28032375006918736, rel=1e-6)
    else:
        assert on_disk["semantic_similarity_score"] is None
    assert on_disk["top_confusions"] == [{"true": "dog", "predicted": "cat", "count": 3, "fraction": 0.3}]
    assert on_disk["per_class"][3]["inter_class_score"] is None  # NaN centre → null, valid JSON

    saved = np.load(out / "class_centres.npy")
    assert saved.dtype == np.float32 and saved.shape == (4, 2)
    np.testing.assert_array_equal(saved, CENTRES)

    md = (out / "report.md").read_text()
    assert "|  | All | Many (1 cls) | Medium (1 cls) | Few (2 cls) |" in md
    assert "| final epoch | 35.00 | 90.00 | 40.00 | 5.00 |" in md
    assert "| best evaluated epoch (7) | 41.00 | 95.00 | 35.00 | 7.50 |" in md
    assert "| inter-class score (IS) | 0.7662 | 0.7919 | 0.7659 | 0.7408 |" in md
    assert ("| semantic similarity (SS) | 0.2803 |" in md) is with_vectors
    assert "| dog | cat | 3 | 30.0% |" in md
    assert "(per_class_accuracy.png)" in md and "(class_centres_pca.png)" in md
    assert "| 1 | 35.00 | 90.00 | 40.00 | 5.00 |" in md  # the post-hoc row


def test_class_names_are_escaped_in_the_markdown_tables(tmp_path):
    """A class named with `|` or a newline must not split or end report.md's table rows."""
    names = ["a|b", "two\nlines", "x_y*", "<i>"]
    labels = np.repeat(np.arange(4), 10)
    preds = labels.copy()
    preds[[10, 11, 12]] = 0
    write_report(tmp_path, final=_final(COUNTS), best=None, train_counts=COUNTS, class_names=names,
                 confusions=top_confusions(labels, preds, names),
                 scores={"inter_class_score": inter_class_scores(CENTRES)}, centres=CENTRES, meta={})
    md = (tmp_path / "report.md").read_text()
    assert "| two\\\\nlines | a\\|b | 3 | 30.0% |" in md.splitlines()
    tables = re.findall(r"(?:^\|.*\n?)+", md, re.M)  # runs of lines that start with |
    assert len(tables) == 3
    for table in tables:  # every row keeps the header's columns
        assert len({len(re.findall(r"(?<!\\)\|", line)) for line in table.splitlines()}) == 1, table
    names = ["x_y*", "<i>"]
    confusion = [Confusion(names[0], names[1], 1, 0.5)]
    write_report(tmp_path, final=_final(COUNTS), best=None, train_counts=COUNTS, class_names=["a", "b", *names],
                 confusions=confusion, scores={"inter_class_score": inter_class_scores(CENTRES)}, centres=CENTRES,
                 meta={})
    assert "| x\\_y\\* | \\<i\\> | 1 | 50.0% |" in (tmp_path / "report.md").read_text()


def test_write_report_without_a_best_epoch(tmp_path):
    report = write_report(tmp_path, final=_final(COUNTS), best=None, train_counts=COUNTS,
                          class_names=["a", "b", "c", "d"], confusions=[],
                          scores={"inter_class_score": inter_class_scores(CENTRES)}, centres=CENTRES, meta={})
    assert report["best_epoch"] is None and report["semantic_similarity_score"] is None
    assert "best evaluated epoch" not in (tmp_path / "report.md").read_text()


def test_plot_centres_pca_many_classes(tmp_path):
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(40, 8)).astype(np.float32)
    counts = np.linspace(500, 2, 40).astype(int)
    plot_centres_pca(centres, [f"c{k}" for k in range(40)], counts, tmp_path / "pca.png")
    assert (tmp_path / "pca.png").stat().st_size > 0
    with pytest.raises(ValueError, match="NaN"):
        plot_centres_pca(np.full((3, 2), np.nan), ["a", "b", "c"], np.array([1, 2, 3]), tmp_path / "x.png")
