"""`mixtail bench step | train | classic | compare` and the classic baseline, on the CPU at tiny
sizes (ResNet-8, batches of 8, a few steps): each bench runs and writes its JSON with the expected rows and the
environment, the numbers in a row agree with each other, the one-step check can fail, compare prints the right
ratios of two hand-written files, and the classic baseline runs with 0 and 2 workers. No absolute timing is
asserted. The graphed-vs-eager check itself needs CUDA (marked gpu).

    python -m pytest tests/test_bench_step.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixtail.benchmarks import bench_classic, bench_step, bench_train, common
from mixtail.benchmarks.classic_baseline import ClassicDataset
from mixtail.errors import DataError, UsageError
from mixtail.pipelines.sources.types import ImageArrays, ImageFiles
from mixtail.trainer.config import load_config

REPO = Path(__file__).resolve().parent.parent
TINY = ["--config", "smoke_cpu", "--model.arch=resnet8", "--data.batch_size=8", "--warmup", "0", "--windows", "2",
        "--window-steps", "1"]
ENV_KEYS = {"timestamp", "torch", "python", "gpu", "git_sha", "device"}


def _record(out: Path, bench: str) -> dict:
    (path,) = out.glob(f"{bench}_*.json")
    assert path.name.startswith(f"{bench}_cpu_") or torch.cuda.is_available()
    return json.loads(path.read_text())


def _check_rates(row: dict) -> None:
    """images/s, its spread and ms/step come from the same window times."""
    assert row["images_per_s_p20"] <= row["images_per_s"] <= row["images_per_s_p80"]
    assert row["ms_per_step_p20"] <= row["ms_per_step"] <= row["ms_per_step_p80"]
    assert row["images_per_s"] * row["ms_per_step"] / 1e3 == pytest.approx(row["images_per_step"], rel=1e-9)


# --------------------------------------------------------------------------------------------------
# bench step
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's skipped modes")
def test_bench_step_cpu_writes_eager_row_and_says_why_modes_were_skipped(tmp_path):
    result = bench_step.main([*TINY, "--out", str(tmp_path)])
    record = _record(tmp_path, "step")
    assert record["bench"] == "step" and ENV_KEYS <= set(record["environment"])
    assert [r["mode"] for r in record["rows"]] == ["eager"]
    assert set(record["config"]["skipped"]) == {"graphs", "compile"}
    assert "CUDA" in record["config"]["skipped"]["graphs"]
    row = record["rows"][0]
    assert (row["arch"], row["size_px"], row["pairs"], row["views"], row["images_per_step"]) == ("resnet8", 32, 8, 2, 16)
    assert (row["precision"], row["loss_impl"], row["windows"]) == ("fp32", "reference", 2)
    _check_rates(row)
    assert record["config"]["run_config"]["model"]["arch"] == "resnet8"
    assert record["config"]["keys"] == bench_step.KEYS and result["rows"] == record["rows"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's eager rows")
def test_bench_step_rows_per_number_of_experts(tmp_path):
    """--experts 1 3: one row per K, each built with model.experts=K, its cost over K = 1's."""
    bench_step.main([*TINY, "--modes", "eager", "--experts", "1", "3", "--out", str(tmp_path)])
    rows = _record(tmp_path, "step")["rows"]
    assert [(r["mode"], r["experts"]) for r in rows] == [("eager", 1), ("eager", 3)]
    assert rows[0]["cost_vs_1_expert"] == 1.0
    assert rows[1]["cost_vs_1_expert"] == pytest.approx(rows[1]["ms_per_step"] / rows[0]["ms_per_step"])
    with pytest.raises(UsageError, match="--experts"):
        bench_step.main([*TINY, "--experts", "0", "--out", str(tmp_path)])


def test_bench_step_rejects_a_stray_argument():
    with pytest.raises(UsageError, match="--nonsense"):
        bench_step.main([*TINY, "--nonsense"])


def test_synthetic_batches_have_the_trainers_shapes():
    cfg = load_config("smoke_cpu", ["--data.batch_size=5"])
    batches = bench_step.synthetic_batches(cfg, 7, torch.device("cpu"), count=2)
    for batch in batches:
        assert batch.images.shape == (10, 3, 32, 32) and batch.images.is_contiguous(memory_format=torch.channels_last)
        assert batch.y_f.dtype == batch.y_b.dtype == torch.int64 and int(batch.y_f.max()) < 7
        lo, hi = cfg.mix.ratio_range
        assert bool(((batch.lam >= lo) & (batch.lam <= hi)).all())
    assert not torch.equal(batches[0].images, batches[1].images)


def test_one_step_check_measures_the_difference_it_should():
    """Two eager steps from the same weights agree exactly on the CPU; a step at twice the lr does not."""
    cfg = load_config("smoke_cpu", ["--data.batch_size=6"])
    counts = bench_step.synthetic_counts(10, cfg.data.imbalance_ratio)
    batch = bench_step.synthetic_batches(cfg, 10, torch.device("cpu"), count=1)[0]
    steps = [bench_step.first_step(bench_step.build(cfg, 10, counts, torch.device("cpu")), batch, lr)
             for lr in (0.1, 0.1, 0.2)]
    same = bench_step.step_difference(steps[0], steps[1])
    assert same == {"parts_rel": 0.0, "update_rel": 0.0, "buffers_rel": 0.0, "counters_equal": True}
    off = bench_step.step_difference(steps[0], steps[2])
    # The loss and the BatchNorm statistics come before the update; the first SGD step is lr·d, so twice the lr
    # moves every weight twice as far: the update differs by its own size.
    assert off["parts_rel"] == 0.0 and off["buffers_rel"] == 0.0 and off["counters_equal"]
    assert off["update_rel"] == pytest.approx(1.0, rel=1e-3)
    assert off["update_rel"] > bench_step.VERIFY_TOL["bf16"][1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (graph capture is CUDA-only)")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_graphed_step_equals_eager_step(precision):
    cfg = load_config("cifar10_lt_r100", ["--train.device=cuda", f"--train.precision={precision}",
                                          "--data.batch_size=32", "--model.arch=resnet8"])
    counts = bench_step.synthetic_counts(10, 100.0)
    rows, verify = bench_step.bench_modes(cfg, ["eager", "graphs"], num_classes=10, counts=counts,
                                          device=torch.device("cuda"), warmup=1, windows=2, window_steps=2,
                                          log=lambda *_: None)
    assert verify["graphs"]["within"] and verify["graphs"]["enforced"]
    assert [r["mode"] for r in rows] == ["eager", "graphs"]
    assert rows[0]["loss_impl"] == "triton"


# --------------------------------------------------------------------------------------------------
# bench train and the classic baseline
# --------------------------------------------------------------------------------------------------


def test_bench_train_synthetic_with_classic_baseline_at_0_and_2_workers(tmp_path):
    result = bench_train.main([*TINY, "--synthetic", "48", "--backend", "torch", "ffcv", "--baseline", "classic",
                               "--workers", "0", "2", "--out", str(tmp_path)])
    record = _record(tmp_path, "train")
    assert ENV_KEYS <= set(record["environment"]) and record["rows"] == result["rows"]
    rows = record["rows"]
    assert [(r["backend"], r["workers"]) for r in rows] == [("none (step alone)", None), ("torch", None),
                                                           ("classic", 0), ("classic", 2)]
    assert "ffcv" in record["config"]["skipped"]
    step_alone, ours, classic = rows[0], rows[1], rows[2:]
    assert ours["of_step"] == pytest.approx(ours["images_per_s"] / step_alone["images_per_s"])
    assert ours["mode"] == step_alone["mode"] == "eager" and ours["views"] == 2
    # 48 images with the smoke config's long tail hold fewer than 48; every loop sees len // 8 batches per epoch.
    n = len(bench_train.synthetic_dataset(load_config("smoke_cpu"), 48, 10).labels)
    assert ours["steps_per_epoch"] == n // 8 and all(c["steps_per_epoch"] == n // 8 for c in classic)
    for row in rows[1:]:
        assert row["epoch_s"] == pytest.approx(row["steps_per_epoch"] * row["ms_per_step"] / 1e3)
        assert row["classic_speedup"] == pytest.approx(min(c["epoch_s"] for c in classic) / row["epoch_s"])
    for row in rows:
        _check_rates(row)
    for c in classic:
        assert (c["views"], c["precision"], c["loss_impl"], c["images_per_step"]) == (1, "fp32", "ce", 8)
    assert max(c["classic_speedup"] for c in classic) == pytest.approx(1.0)


def test_synthetic_dataset_is_long_tailed_and_fits():
    cfg = load_config("smoke_cpu", ["--data.imbalance_ratio=10"])
    ds = bench_train.synthetic_dataset(cfg, 200, 5)
    counts = np.bincount(ds.labels, minlength=5)
    assert len(ds) <= 200 and counts[0] / counts[-1] == pytest.approx(10, rel=0.2)
    assert ds.images.shape[1:] == (32, 32, 3) and ds.images.dtype == np.uint8


def test_backend_skip_reasons():
    assert bench_train.backend_unavailable("torch", synthetic=True) is None
    assert "ffcv" in (bench_train.backend_unavailable("ffcv", synthetic=False) or "ffcv").lower()


def test_classic_dataset_reads_files_and_canvases_as_the_same_pixels(tmp_path):
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (3, 12, 10, 3), dtype=np.uint8)
    files = []
    for i, a in enumerate(arrays):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(a).save(files[-1])
    canvas = np.zeros((3, 16, 16, 3), np.uint8)
    canvas[:, :12, :10] = arrays
    sizes = np.full((3, 2), (12, 10), np.int32)
    labels = np.array([0, 1, 0])
    as_tensor = lambda img: torch.from_numpy(np.asarray(img).copy())  # noqa: E731
    from_files = ClassicDataset(ImageFiles(files, labels, ["a", "b"]), as_tensor)
    from_canvas = ClassicDataset(ImageArrays(canvas, labels, ["a", "b"], sizes=sizes), as_tensor)
    for i in range(3):
        (x, y), (x2, y2) = from_files[i], from_canvas[i]
        assert torch.equal(x, torch.from_numpy(arrays[i])) and torch.equal(x, x2) and y == y2 == labels[i]


# --------------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------------


def _write(path: Path, rows: list[dict], **config) -> Path:
    path.write_text(json.dumps({"bench": "step", "config": config, "environment": {"gpu": None}, "rows": rows}))
    return path


def test_compare_prints_the_ratios_of_matching_rows(tmp_path, capsys):
    keys = {"keys": ["mode", "arch"], "metrics": ["images_per_s", "ms_per_step"]}
    a = _write(tmp_path / "a.json", [
        {"mode": "eager", "arch": "resnet32", "images_per_s": 100.0, "ms_per_step": 10.0, "windows": 5},
        {"mode": "graphs", "arch": "resnet32", "images_per_s": 200.0, "ms_per_step": 5.0},
        {"mode": "compile", "arch": "resnet32", "images_per_s": 300.0, "ms_per_step": 3.0}], **keys)
    b = _write(tmp_path / "b.json", [
        {"mode": "graphs", "arch": "resnet32", "images_per_s": 500.0, "ms_per_step": 2.0},
        {"mode": "eager", "arch": "resnet32", "images_per_s": 150.0, "ms_per_step": 8.0},
        {"mode": "eager", "arch": "resnet50", "images_per_s": 10.0, "ms_per_step": 100.0}], **keys)
    result = common.main([str(a), str(b)])
    ratios = {(r["mode"], r["metric"]): r["ratio"] for r in result["rows"]}
    assert ratios == {("eager", "images_per_s"): 1.5, ("eager", "ms_per_step"): 0.8,
                      ("graphs", "images_per_s"): 2.5, ("graphs", "ms_per_step"): 0.4}
    assert result["only_a"] == [("compile", "resnet32")] and result["only_b"] == [("eager", "resnet50")]
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["mode", "arch", "metric"])
    table = lines[header:header + 6]
    assert [line.split() for line in table[2:]] == [["eager", "resnet32", "images_per_s", "100", "150", "1.5"],
                                                    ["eager", "resnet32", "ms_per_step", "10", "8", "0.8"],
                                                    ["graphs", "resnet32", "images_per_s", "200", "500", "2.5"],
                                                    ["graphs", "resnet32", "ms_per_step", "5", "2", "0.4"]]
    # Aligned: the last column is right-aligned numbers, so every line of the table ends where its header does.
    assert {len(line) for line in table} == {len(table[0])}
    assert any(line.startswith("only in A: mode=compile, arch=resnet32") for line in lines)
    assert any(line.startswith("only in B: mode=eager, arch=resnet50") for line in lines)


def test_compare_without_named_keys_matches_on_text_columns_and_every_shared_number(tmp_path):
    a = _write(tmp_path / "a.json", [{"impl": "x", "N": 4, "t": 2.0}, {"impl": "y", "N": 4, "t": 4.0}])
    b = _write(tmp_path / "b.json", [{"impl": "y", "N": 4, "t": 1.0}])
    result = common.compare(common.read_result(a), common.read_result(b))
    assert result["keys"] == ["impl"]
    assert [(r["impl"], r["metric"], r["ratio"]) for r in result["rows"]] == [("y", "N", 1.0), ("y", "t", 0.25)]


def test_compare_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"runs": []}')
    with pytest.raises(DataError, match="bad.json has no 'rows'"):
        common.read_result(bad)
    dup = _write(tmp_path / "dup.json", [{"mode": "a", "v": 1.0}, {"mode": "a", "v": 2.0}], keys=["mode"])
    with pytest.raises(DataError, match="two rows share the key"):
        common.compare(common.read_result(dup), common.read_result(dup), names=("dup.json", "dup.json"))


def test_cli_lists_the_new_benches():
    from mixtail.cli import BENCHES

    assert {"step", "train", "compare"} <= set(BENCHES)
    for name in ("step", "train", "compare"):
        assert callable(getattr(__import__(BENCHES[name], fromlist=["main"]), "main"))


# --------------------------------------------------------------------------------------------------
# bench classic: whole epochs, extrapolated
# --------------------------------------------------------------------------------------------------


def test_evaluations_follow_the_trainers_cadence():
    assert bench_classic.evaluations_in(200, 10) == 20
    assert bench_classic.evaluations_in(16, 5) == 4  # 5, 10, 15 and the last
    assert bench_classic.evaluations_in(2, 10) == 1


def test_bench_classic_times_whole_epochs_and_extrapolates(tmp_path):
    result = bench_classic.main(["--config", "smoke_cpu", "--model.arch=resnet8", "--data.batch_size=8",
                                 "--train.max_steps_per_epoch=3", "--train.epochs=7", "--train.eval_every_epochs=3",
                                 "--data.eval_batch_size=250", "--epochs", "2", "--workers", "0",
                                 "--out", str(tmp_path)])
    record = _record(tmp_path, "classic")
    (row,) = record["rows"]
    assert row == result["rows"][0] and ENV_KEYS <= set(record["environment"])
    assert row["epochs_timed"] == 2 and row["steps_per_epoch"] == 3 and len(row["epoch_times_s"]) == 2
    assert row["epoch_s"] == row["epoch_times_s"][1]  # the median of the epochs after the first
    assert row["evaluations"] == 3  # epochs 3, 6 and 7
    assert row["extrapolated_s"] == pytest.approx(7 * row["epoch_s"] + 3 * row["test_pass_s"])
    assert row["extrapolated"].startswith("extrapolated: 7 x median of 1 timed epoch(s) + 3 x one timed test pass")


def test_bench_classic_refuses_no_epochs():
    with pytest.raises(UsageError, match="--epochs"):
        bench_classic.main(["--config", "smoke_cpu", "--epochs", "0"])
