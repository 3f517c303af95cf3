"""trainer/evaluate.py on hand-made predictions: All/Many/Medium/Few, an empty group, a class absent from the
test set, the logit shift, the per-sample outputs, `model.training` restored, the feature centres, and two
gloo ranks against one process.

    python -m pytest tests/test_evaluate.py -q
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mixtail.pipelines.batch import Batch
from mixtail.trainer.evaluate import accuracy_summary, evaluate, extract_features, feature_centres, format_table
from mixtail.trainer.report import class_centres

# Many: classes 0, 1 (> 100 images); Medium: none; Few: classes 2, 3. Class 3 has no test image.
TRAIN_COUNTS = np.array([300, 120, 10, 2])
SHIFT = torch.tensor([-1.5, 0.0, 0.0, 1.0])
# (label, logits, argmax, argmax after + SHIFT), each worked out by hand.
SAMPLES = [
    (0, [2.0, 1.2, 0.0, 0.0], 0, 1),
    (0, [3.0, 0.0, 0.0, 0.0], 0, 0),
    (0, [2.8, 0.0, 0.0, 0.0], 0, 0),
    (0, [0.0, 1.5, 0.0, 0.0], 1, 1),
    (1, [0.0, 2.0, 0.0, 0.0], 1, 1),
    (1, [1.0, 0.5, 0.0, 0.0], 0, 3),
    (2, [0.0, 0.0, 1.0, 0.5], 2, 3),
    (2, [1.0, 0.0, 2.0, 0.0], 2, 2),
]
BATCH_SPLIT = (3, 4, 1)  # odd batch sizes, the last a single image


class LogitsAreImages(torch.nn.Module):
    """The "image" (B, C, 1, 1) is the logit vector; features are 2·image. Records its mode at every call."""

    def __init__(self):
        super().__init__()
        self.modes: list[bool] = []

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return 2.0 * x.flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.modes.append(self.training)
        assert not torch.is_grad_enabled()
        return x.flatten(1), torch.zeros(len(x), 2)


def _batches(samples=SAMPLES, split=BATCH_SPLIT) -> list[Batch]:
    out, start = [], 0
    for size in split:
        rows = samples[start:start + size]
        start += size
        y = torch.tensor([r[0] for r in rows])
        x = torch.tensor([r[1] for r in rows])[:, :, None, None]
        out.append(Batch(x, y, y.clone(), torch.ones(len(rows))))
    assert start == len(samples)
    return out


@pytest.mark.parametrize("was_training", [True, False])
def test_known_predictions_give_known_groups(was_training):
    model = LogitsAreImages().train(was_training)
    r = evaluate(model, _batches(), TRAIN_COUNTS, torch.device("cpu"))
    assert model.training is was_training
    assert model.modes == [False] * len(BATCH_SPLIT)  # every forward ran in eval mode
    # Class 0: 3/4, class 1: 1/2, class 2: 2/2, class 3: no test image.
    assert r["all"] == pytest.approx(75.0)
    assert r["many"] == pytest.approx(100 * 4 / 6)
    assert r["medium"] is None
    assert r["few"] == pytest.approx(100.0)
    assert r["per_class"] == [pytest.approx(75.0), pytest.approx(50.0), pytest.approx(100.0), None]
    assert r["group_sizes"] == {"many": 2, "medium": 0, "few": 2}
    assert r["num_test_images"] == 8
    assert "shifted" not in r and "outputs" not in r
    table = format_table(r)
    assert "Medium (0 cls)" in table and "75.00" in table and " -" in table


def test_logit_shift_changes_exactly_the_expected_predictions():
    model = LogitsAreImages()
    shifts = torch.stack([SHIFT, torch.zeros(4)])
    r = evaluate(model, _batches(), TRAIN_COUNTS, torch.device("cpu"), logit_shift=shifts, return_outputs=True)
    assert r["all"] == pytest.approx(75.0)  # the headline stays unshifted
    shifted, zero = r["shifted"]
    # Shifted: class 0: 2/4, class 1: 1/2, class 2: 1/2.
    assert shifted["all"] == pytest.approx(50.0)
    assert shifted["many"] == pytest.approx(50.0)
    assert shifted["medium"] is None
    assert shifted["few"] == pytest.approx(50.0)
    assert shifted["per_class"] == [pytest.approx(50.0), pytest.approx(50.0), pytest.approx(50.0), None]
    assert {k: zero[k] for k in ("all", "many", "medium", "few")} == {k: r[k] for k in ("all", "many", "medium", "few")}

    out = r["outputs"]
    np.testing.assert_array_equal(out.labels, [s[0] for s in SAMPLES])
    np.testing.assert_array_equal(out.preds, [s[2] for s in SAMPLES])
    np.testing.assert_array_equal(out.shifted_preds[0], [s[3] for s in SAMPLES])
    np.testing.assert_array_equal(out.shifted_preds[1], out.preds)
    assert out.logits.dtype == np.float32 and out.logits.shape == (8, 4)
    np.testing.assert_array_equal(out.logits, np.array([s[1] for s in SAMPLES], dtype=np.float32))
    assert out.labels.dtype == out.preds.dtype == np.int64

    one = evaluate(model, _batches(), TRAIN_COUNTS, torch.device("cpu"), logit_shift=SHIFT)
    assert len(one["shifted"]) == 1 and one["shifted"][0]["all"] == pytest.approx(50.0)


def test_logit_shift_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match=r"C = 4"):
        evaluate(LogitsAreImages(), _batches(), TRAIN_COUNTS, torch.device("cpu"), logit_shift=torch.zeros(5))


def test_outputs_of_an_empty_shard():
    r = evaluate(LogitsAreImages(), [], TRAIN_COUNTS, torch.device("cpu"), logit_shift=SHIFT, return_outputs=True)
    assert r["outputs"].preds.shape == (0,) and r["outputs"].shifted_preds.shape == (1, 0)
    assert r["outputs"].logits.shape == (0, 4)
    assert r["num_test_images"] == 0 and r["many"] is None and r["per_class"] == [None] * 4


def test_training_mode_restored_after_an_error():
    model = LogitsAreImages().train()
    bad = Batch(torch.zeros(2, 3, 1, 1), torch.tensor([0, 9]), torch.tensor([0, 9]), torch.ones(2))  # label 9 of 4
    with pytest.raises((IndexError, RuntimeError)):
        evaluate(model, [bad], TRAIN_COUNTS, torch.device("cpu"))
    assert model.training


def test_accuracy_summary_random_counts_against_a_loop():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 400, 37)
    total = rng.integers(0, 12, 37).astype(float)
    correct = np.floor(total * rng.random(37))
    r = accuracy_summary(correct, total, counts)
    for name, keep in (("many", lambda n: n > 100), ("medium", lambda n: 20 <= n <= 100), ("few", lambda n: n < 20)):
        hit = sum(c for c, t, n in zip(correct, total, counts) if keep(n))
        seen = sum(t for t, n in zip(total, counts) if keep(n))
        assert r[name] == (pytest.approx(100 * hit / seen) if seen else None)
    assert r["all"] == pytest.approx(100 * correct.sum() / total.sum())


@pytest.mark.parametrize("was_training", [True, False])
def test_features_and_centres(was_training):
    model = LogitsAreImages().train(was_training)
    feats, labels = extract_features(model, _batches())
    assert model.training is was_training and set(model.modes) == {False}
    np.testing.assert_array_equal(feats, 2 * np.array([s[1] for s in SAMPLES], dtype=np.float32))
    np.testing.assert_array_equal(labels, [s[0] for s in SAMPLES])

    centres, n = feature_centres(model, _batches(), 4, torch.device("cpu"))
    assert model.training is was_training
    np.testing.assert_array_equal(n, [4, 2, 2, 0])
    # Class 1: mean of 2·[0, 2, 0, 0] and 2·[1, 0.5, 0, 0].
    np.testing.assert_allclose(centres[1], [1.0, 2.5, 0.0, 0.0], rtol=1e-6)
    assert np.isnan(centres[3]).all()
    np.testing.assert_allclose(centres, class_centres(feats, labels, 4), rtol=1e-6, equal_nan=True)


def test_centres_refuse_mixed_or_multi_view_batches():
    model = LogitsAreImages().train()
    b = _batches()[0]
    mixed = Batch(b.images, b.y_f, b.y_b, torch.tensor([1.0, 0.6, 1.0]))
    two_views = Batch(torch.cat([b.images, b.images]), b.y_f, b.y_b, b.lam)
    for batch in (mixed, two_views):
        with pytest.raises(ValueError, match="unmixed, single-view"):
            feature_centres(model, [batch], 4, torch.device("cpu"))
        assert model.training


def _rank_check(rank: int, init_file: str, world: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batches = _batches()
        mine = batches[:2] if rank == 0 else batches[2:]  # ranks see different numbers of batches
        r = evaluate(LogitsAreImages(), mine, TRAIN_COUNTS, torch.device("cpu"), logit_shift=SHIFT, return_outputs=True)
        # The one-process numbers of the two tests above (inside a process group every call all-reduces).
        assert (r["all"], r["few"], r["medium"], r["num_test_images"]) == (75.0, 100.0, None, 8)
        assert r["many"] == pytest.approx(100 * 4 / 6)
        assert (r["shifted"][0]["all"], r["shifted"][0]["many"]) == (50.0, 50.0)
        assert len(r["outputs"].preds) == sum(len(b.y_f) for b in mine)  # outputs stay per rank
        centres, n = feature_centres(LogitsAreImages(), mine, 4, torch.device("cpu"))
        images = np.array([s[1] for s in SAMPLES], dtype=np.float32)
        np.testing.assert_array_equal(n, [4, 2, 2, 0])
        np.testing.assert_allclose(centres, class_centres(2 * images, np.array([s[0] for s in SAMPLES]), 4),
                                   rtol=1e-6, equal_nan=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_check, args=(os.path.join(tmp, "pg_init"), 2), nprocs=2, join=True)


# --------------------------------------------------------------------------------------------------
# Sharded evaluation through the trainer's own path: build_loader(rank, world_size) and `mixtail eval`
# --------------------------------------------------------------------------------------------------

# Odd per-rank batches: one process sees 300, 300, 300, 100 test images; each of two ranks 300, 200.
EVAL_OVERRIDES = ["--data.eval_batch_size=300"]
TAUS = [0.5, 1.0]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_eval(ckpt: str, rank: int, world_size: int) -> dict:
    """evaluate() of the checkpoint's model on this rank's test shard, from build_loader(rank, world_size)."""
    from mixtail.pipelines.loader import build_loader
    from mixtail.trainer.checkpoint import load_checkpoint
    from mixtail.trainer.checkpoint_eval import posthoc_shift
    from mixtail.trainer.config import apply_overrides, config_from_dict
    from mixtail.trainer.models import build_model

    state = load_checkpoint(ckpt)
    cfg = apply_overrides(config_from_dict(state["config"], ckpt), EVAL_OVERRIDES)
    counts = np.asarray(state["class_counts"])
    loader = build_loader(cfg.data, cfg.aug, cfg.mix, split="test", rank=rank, world_size=world_size,
                          device=torch.device("cpu"), seed=cfg.train.seed)
    model = build_model(cfg.model, len(counts))
    model.load_state_dict(state["model"])
    r = evaluate(model, loader, counts, torch.device("cpu"), logit_shift=posthoc_shift(cfg, counts, TAUS),
                 return_outputs=True)
    loader.close()
    out = r.pop("outputs")
    r["outputs"] = {"labels": out.labels.tolist(), "preds": out.preds.tolist(), "logits": out.logits.tolist(),
                    "shifted": out.shifted_preds.tolist()}
    return r


def _eval_rank(rank: int, ckpt: str, tmp: str, ports: tuple[int, int]) -> None:
    import json

    from mixtail.trainer.checkpoint_eval import evaluate_checkpoint

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(ports[0]), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        r = _sharded_eval(ckpt, rank, 2)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(tmp, f"eval_rank{rank}.json"), "w") as f:
        json.dump(r, f)
    # `mixtail eval CKPT --posthoc-tau ... --report DIR` as torchrun would run it (it joins the group itself).
    os.environ["MASTER_PORT"] = str(ports[1])
    r = evaluate_checkpoint(ckpt, EVAL_OVERRIDES, report_dir=os.path.join(tmp, "report_2"), posthoc_taus=TAUS)
    with open(os.path.join(tmp, f"cli_rank{rank}.json"), "w") as f:
        json.dump(r, f)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """A checkpoint of a few smoke steps, evaluated by one process and by two gloo ranks (both ways)."""
    import json

    from mixtail.trainer.checkpoint_eval import evaluate_checkpoint
    from mixtail.trainer.config import load_config
    from mixtail.trainer.train import train

    tmp = tmp_path_factory.mktemp("sharded")
    run = tmp / "run"
    train(load_config("smoke_cpu", [f"--train.out_dir={run}", "--train.epochs=1", "--train.max_steps_per_epoch=6"]))
    ckpt = str(run / "checkpoint.pt")
    one = {"eval": _sharded_eval(ckpt, 0, 1),
           "cli": evaluate_checkpoint(ckpt, EVAL_OVERRIDES, report_dir=tmp / "report_1", posthoc_taus=TAUS)}
    mp.spawn(_eval_rank, args=(ckpt, str(tmp), (_free_port(), _free_port())), nprocs=2, join=True)
    two = {f"{kind}{r}": json.loads((tmp / f"{kind}_rank{r}.json").read_text())
           for kind in ("eval", "cli") for r in (0, 1)}
    return one, two, tmp


SUMMARY_KEYS = ("all", "many", "medium", "few", "per_class", "group_sizes", "num_test_images")


@pytest.mark.slow
def test_sharded_evaluation_equals_one_process(sharded_runs):
    import json

    one, two, tmp = sharded_runs
    single = one["eval"]
    assert single["num_test_images"] == 1000 and len(set(single["outputs"]["preds"])) > 1  # not a constant model
    for rank in (0, 1):
        r = two[f"eval{rank}"]
        # Per-class hit counts are all-reduced, so every number is the same, exactly.
        assert {k: r[k] for k in SUMMARY_KEYS} == {k: single[k] for k in SUMMARY_KEYS}
        assert [{k: s[k] for k in SUMMARY_KEYS} for s in r["shifted"]] == \
               [{k: s[k] for k in SUMMARY_KEYS} for s in single["shifted"]]
        # Rank r holds test images r, r + 2, ...: each image is seen once, with the same prediction.
        mine = {k: v[rank::2] for k, v in single["outputs"].items() if k != "shifted"}
        assert r["outputs"]["labels"] == mine["labels"] and r["outputs"]["preds"] == mine["preds"]
        np.testing.assert_allclose(r["outputs"]["logits"], mine["logits"], rtol=1e-4, atol=1e-4)
        assert [row[rank::2] for row in single["outputs"]["shifted"]] == r["outputs"]["shifted"]
    for rank in (0, 1):  # `mixtail eval` under two ranks prints and returns the one-process numbers
        cli = two[f"cli{rank}"]
        assert {k: cli[k] for k in SUMMARY_KEYS} == {k: one["cli"][k] for k in SUMMARY_KEYS}
        assert cli["posthoc"] == one["cli"]["posthoc"]
    # The report's accuracies and training-set class centres (all-reduced sums) are the one-process ones.
    a, b = (json.loads((tmp / d / "report.json").read_text()) for d in ("report_1", "report_2"))
    assert a["top1"] == b["top1"] and a["posthoc"] == b["posthoc"]
    assert [c["top1"] for c in a["per_class"]] == [c["top1"] for c in b["per_class"]]
    np.testing.assert_allclose(np.load(tmp / "report_2" / "class_centres.npy"),
                               np.load(tmp / "report_1" / "class_centres.npy"), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sharded_report_equals_one_process(sharded_runs):
    import json

    _, _, tmp = sharded_runs
    a, b = (json.loads((tmp / d / "report.json").read_text()) for d in ("report_1", "report_2"))
    assert sum(c["count"] for c in b["top_confusions"]) == sum(c["count"] for c in a["top_confusions"])
    assert a["top_confusions"] == b["top_confusions"]
