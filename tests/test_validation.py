"""The validation split (data.val_per_class): nothing a run reports is chosen on the test set.

The split itself (datasets.hold_out_validation): k per class, from the images the long-tailed subset left out,
the head class completing them from its own subset; reproducible for data.val_seed; the same in every backend
and source (folder, DALI file lists and FFCV .beton from `mixtail convert`, ImageNet-LT lists); the held-out
images are never in a training batch, shown per backend on the files or positions each executor reads. Then
what reads it: the trainer's val/test evaluation and val_split.json, `mixtail eval --posthoc-tau auto` (which
chooses T on val alone: permuting the test labels leaves its choice unchanged) and `mixtail sweep --rank-by val`.

    python -m pytest tests/test_validation.py -q
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixtail.errors import ConfigError, DataError, UsageError
from mixtail.pipelines.loader import loader_for_dataset
from mixtail.pipelines.config import AugConfig, DataConfig, MixConfig
from mixtail.pipelines.sources.build import build_dataset
from mixtail.pipelines.sources.subsets import hold_out_validation, long_tailed_indices, sample_per_class
from mixtail.pipelines.sources.folders import scan_image_folder
from mixtail.trainer import checkpoint_eval, sweep
from mixtail.trainer.config import load_config
from mixtail.trainer.train import train

REPO = Path(__file__).resolve().parent.parent
LISTS = REPO / "tests" / "fixtures" / "lists"
IMAGES = REPO / "tests" / "fixtures" / "images"
CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------------


def _labels(counts) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def test_held_out_from_what_the_subset_left_out_and_the_head_from_its_own():
    labels = np.tile(np.arange(4), 30)  # 4 classes x 30, interleaved like CIFAR
    kept = long_tailed_indices(labels, 10.0, 4)  # n_k = 30, 13, 6, 3
    held = hold_out_validation(labels, kept, 5, 0, list("abcd"))
    assert np.bincount(labels[held.val], minlength=4).tolist() == [5] * 4
    assert held.from_subset.tolist() == [5, 0, 0, 0]  # the head class kept all 30: its 5 come from its subset
    assert not set(held.val) & set(held.train)
    assert set(held.train) == set(kept) - set(held.val)
    assert np.bincount(labels[held.train], minlength=4).tolist() == [25, 13, 6, 3]
    assert not set(held.val[labels[held.val] > 0]) & set(kept)  # the others: only images left out of training
    assert held.train.tolist() == [i for i in kept if i not in set(held.val)]  # the subset's own order


def test_a_class_with_too_few_left_out_completes_from_its_subset():
    labels = _labels([10, 10])
    kept = np.array([0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12])  # class 0 leaves 2 out, class 1 leaves 7 out
    held = hold_out_validation(labels, kept, 4, 3, ["a", "b"])
    val0 = held.val[labels[held.val] == 0]
    assert {8, 9} <= set(val0) and len(val0) == 4 and held.from_subset.tolist() == [2, 0]


def test_the_split_is_reproducible_for_a_seed_and_moves_with_it():
    labels = np.tile(np.arange(3), 50)
    kept = long_tailed_indices(labels, 5.0, 3)
    a, b = (hold_out_validation(labels, kept, 6, 7, list("xyz")) for _ in range(2))
    assert np.array_equal(a.val, b.val) and np.array_equal(a.train, b.train)
    c = hold_out_validation(labels, kept, 6, 8, list("xyz"))
    assert not np.array_equal(a.val, c.val)


def test_a_class_left_without_training_images_is_refused_by_name():
    labels = _labels([5, 3])
    with pytest.raises(DataError, match="class 'b' .* 3 training image.*val_per_class=3"):
        hold_out_validation(labels, None, 3, 0, ["a", "b"])


@pytest.mark.data
def test_cifar100_lt_r100_head_class_gives_from_its_subset(cifar100_meta):
    meta = cifar100_meta
    labels, kept = meta["y_train"], meta["lt_r100_train_indices"]
    held = hold_out_validation(labels, kept, 20, 0, [str(k) for k in range(100)])
    assert held.from_subset.tolist() == [20] + [0] * 99  # only class 0 kept all of its 500 images
    n_k = np.bincount(labels[held.train], minlength=100)
    assert n_k[0] == 480 and np.array_equal(n_k[1:], meta["lt_r100_n_k"][1:]) and len(held.val) == 2000


# --------------------------------------------------------------------------------------------------
# Datasets and backends
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """train/ with 3 classes of 12 images (distinct pixels), test/ with 3 each; 32 px PNG."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 3)):
        for k in range(3):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return root


def _data(tree: Path, **kw) -> DataConfig:
    base = dict(dataset="folder", root=str(tree), imbalance_ratio=4.0, val_per_class=2, batch_size=4,
                eval_batch_size=8)
    return DataConfig(**{**base, **kw})


def test_folder_val_split_is_named_and_disjoint(tree):
    data = _data(tree)
    val, train_set = (build_dataset(data, s, decoded=False) for s in ("val", "train"))
    assert np.bincount(val.labels).tolist() == [2, 2, 2] and np.bincount(train_set.labels).tolist() == [10, 6, 3]
    assert not set(val.files) & set(train_set.files) and val.classes == train_set.classes == ["c0", "c1", "c2"]
    assert all("/train/" in f for f in val.files)
    full = build_dataset(dataclasses.replace(data, val_per_class=0), "train", decoded=False)
    assert set(train_set.files) | set(val.files) >= set(full.files)  # c1, c2's come from what the subset left out
    assert len(set(val.files) & set(full.files)) == 2  # only the head class's two


def test_no_validation_split_without_the_key(tree):
    with pytest.raises(ConfigError, match="val_per_class"):
        build_dataset(_data(tree, val_per_class=0), "val")


def _files_read_by_training(loader, files: list[str]) -> set[str]:
    """Every file a training epoch's plans name (backgrounds, and foregrounds of mixed pairs)."""
    seen = set()
    for b in range(len(loader)):
        plan = loader.planner.plan(5, b)
        seen |= {files[i] for i in plan["bg_index"]}
        if plan.mixed:
            seen |= {files[i] for i in plan["fg_index"]}
    return seen


ALWAYS = MixConfig(mix_prob=1.0, start_epoch=0, unmixed_last_epochs=0)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_held_out_images_never_reach_a_training_batch(tree, backend, monkeypatch):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    data = _data(tree, backend=backend, num_threads=1)
    val = build_dataset(data, "val", decoded=False)
    train_set = build_dataset(data, "train", decoded=False)
    read = []
    if backend == "dali":  # record what the DALI graph is fed: the encoded files themselves
        from mixtail.pipelines.backends import dali_executor as dali_loader

        real_init, real_call = dali_loader.Sources.__init__, dali_loader.Sources.__call__

        def init(self, dataset):
            real_init(self, dataset)
            self.recorded_files = list(dataset.files)

        def call(self, idx):
            read.extend(self.recorded_files[i] for i in idx)
            return real_call(self, idx)

        monkeypatch.setattr(dali_loader.Sources, "__init__", init)
        monkeypatch.setattr(dali_loader.Sources, "__call__", call)
    loader = loader_for_dataset(train_set, data, AugConfig(), ALWAYS, split="train", rank=0, world_size=1,
                                device=CPU, seed=0, num_epochs=8)
    try:
        planned = _files_read_by_training(loader, train_set.files)
        loader.set_epoch(5)
        batches = list(loader)
        assert len(batches) == len(loader)
    finally:
        loader.close()
    assert planned and not planned & set(val.files)
    if backend == "dali":
        assert read and not set(read) & set(val.files)
    else:  # the torch executor holds the decoded training images: none of them is a validation image
        val_pixels = {np.asarray(Image.open(f).convert("RGB")).tobytes() for f in val.files}
        held = loader.executor.images.permute(0, 2, 3, 1).contiguous().numpy()
        assert len(held) == len(train_set) and not {x.tobytes() for x in held} & val_pixels


@pytest.mark.ffcv
def test_converted_outputs_hold_out_the_same_images(tree, tmp_path):
    """`mixtail convert` to DALI lists and to a .beton (the whole training split, no --imbalance-ratio): the
    validation split of each names the same source images as the folder's, and the FFCV executor's training
    positions never include them."""
    pytest.importorskip("ffcv")
    from mixtail.commands.convert import main as convert_main
    from mixtail.pipelines.sources.manifest import read_manifest, split_table

    folder_val = build_dataset(_data(tree), "val", decoded=False)
    want = sorted(Path(f).relative_to(tree / "train").as_posix() for f in folder_val.files)
    for to in ("dali", "ffcv"):
        out = tmp_path / to
        assert convert_main([str(tree), "--to", to, "--out", str(out), "--jobs", "1"]) in (0, None)
        data = _data(tree, dataset="converted", root=str(out), backend="torch" if to == "dali" else "ffcv",
                     num_threads=1)
        source = [Path(f).relative_to(tree / "train").as_posix() for f in scan_image_folder(tree / "train").files]
        table = split_table(read_manifest(out), "train")
        val, train_set = (build_dataset(data, s, decoded=False) for s in ("val", "train"))
        if to == "dali":
            names = lambda ds: sorted(source[table.source_index[table.files.index(f)]] for f in ds.files)  # noqa: E731
        else:
            names = lambda ds: sorted(source[table.source_index[p]] for p in ds.positions)  # noqa: E731
        assert names(val) == want, to
        assert not set(names(val)) & set(names(train_set))
        if to == "ffcv":
            loader = loader_for_dataset(train_set, data, AugConfig(), ALWAYS, split="train", rank=0, world_size=1,
                                        device=CPU, seed=0, num_epochs=8)
            try:
                positions = {int(train_set.positions[i]) for b in range(len(loader))
                             for i in loader.planner.plan(5, b)["bg_index"]}
            finally:
                loader.close()
            assert positions and not positions & {int(p) for p in val.positions}


def test_listed_datasets_take_k_per_class_of_their_validation_list(tmp_path):
    val_list = tmp_path / "val.txt"  # the fixture's test images, under another name: a validation list
    val_list.write_text((LISTS / "imagenet_lt_test.txt").read_text())
    data = DataConfig(dataset="imagenet_lt", root=str(IMAGES), train_list=str(LISTS / "imagenet_lt_train.txt"),
                      test_list=str(LISTS / "imagenet_lt_test.txt"), val_list=str(val_list), val_per_class=1)
    val = build_dataset(data, "val", decoded=False)
    assert np.bincount(val.labels).tolist() == [1, 1, 1] and all("/test/" in f for f in val.files)
    assert len(build_dataset(data, "train", decoded=False)) == 10  # the training list is untouched
    assert np.array_equal(sample_per_class(val.labels, 1, 0, 3), np.arange(3))
    with pytest.raises(ConfigError, match="data.val_list"):
        dataclasses.replace(data, val_list="").validate()
    with pytest.raises(ConfigError, match="data.val_list.*test list"):
        dataclasses.replace(data, val_list=data.test_list).validate()


# --------------------------------------------------------------------------------------------------
# Training, eval --posthoc-tau auto, sweep --rank-by val
# --------------------------------------------------------------------------------------------------

RUN = ["--train.epochs=2", "--train.max_steps_per_epoch=3", "--data.val_per_class=20", "--train.eval_every_epochs=1"]


@pytest.fixture(scope="module")
def val_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("valrun")
    train(load_config("smoke_cpu", [*RUN, f"--train.out_dir={out}"]))
    return out


def test_training_reports_val_beside_test_and_records_the_split(val_run, capsys):
    final = json.loads((val_run / "final_eval.json").read_text())
    assert final["val"]["num_test_images"] == 200 and final["num_test_images"] == 1000
    evals = [json.loads(x) for x in (val_run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(evals) == 2 and all(set(e["val"]) == {"all", "many", "medium", "few"} for e in evals)
    record = json.loads((val_run / "val_split.json").read_text())
    assert record["val_per_class"] == 20 and record["counts"] == [20] * 10
    cfg = load_config("smoke_cpu", RUN)
    val = build_dataset(cfg.data, "val")
    assert record["train_split_index"] == val.origin.tolist()  # names the images: the split can be rebuilt
    assert not set(val.origin) & set(build_dataset(cfg.data, "train").origin)


def test_resume_refuses_another_validation_split(val_run):
    cfg = load_config("smoke_cpu", [*RUN, "--data.val_per_class=10", f"--train.out_dir={val_run}"])
    with pytest.raises(ConfigError, match="data.val_per_class"):
        train(cfg, resume=True)


def test_choose_tau_prefers_the_least_shift_on_a_tie():
    rows = [{"all": a} for a in (50.0, 52.0, 52.0, 51.0)]
    assert checkpoint_eval.choose_tau([0.0, 0.5, 1.0, 1.5], rows) == 0.5
    assert checkpoint_eval.choose_tau([1.0, 0.0], [{"all": 3.0}, {"all": 3.0}]) == 0.0


def test_posthoc_auto_chooses_on_val_and_never_reads_test_labels(val_run, monkeypatch, capsys):
    ckpt = val_run / "checkpoint.pt"
    first = checkpoint_eval.evaluate_checkpoint(ckpt, posthoc_auto=True)
    auto = first["posthoc_auto"]
    assert [r["tau"] for r in auto["grid"]] == list(checkpoint_eval.AUTO_TAUS)
    best = max(r["all"] for r in auto["grid"])
    assert next(r for r in auto["grid"] if r["tau"] == auto["tau"])["all"] == best
    out = capsys.readouterr().out
    assert "<- chosen" in out and f"test at T = {auto['tau']:g}" in out

    real = checkpoint_eval.build_loader

    def permuted_test(data, aug, mix, *, split, **kw):  # the test set with its labels shuffled
        if split != "test":
            return real(data, aug, mix, split=split, **kw)
        ds = build_dataset(data, "test", decoded=False)
        perm = np.random.default_rng(0).permutation(len(ds))
        return loader_for_dataset(dataclasses.replace(ds, labels=ds.labels[perm]), data, aug, mix, split=split, **kw)

    monkeypatch.setattr(checkpoint_eval, "build_loader", permuted_test)
    second = checkpoint_eval.evaluate_checkpoint(ckpt, posthoc_auto=True)
    assert second["posthoc_auto"]["tau"] == auto["tau"] and second["posthoc_auto"]["grid"] == auto["grid"]
    assert second["all"] != first["all"]  # the test labels did change what test accuracy is


def test_posthoc_auto_needs_a_validation_split_and_eval_keeps_the_trained_one(val_run, tmp_path):
    ckpt = val_run / "checkpoint.pt"
    with pytest.raises(ConfigError, match="data.val_per_class.*trained with 20"):
        checkpoint_eval.evaluate_checkpoint(ckpt, ["--data.val_per_class=5"])
    with pytest.raises(ConfigError, match="data.val_seed"):
        checkpoint_eval.evaluate_checkpoint(ckpt, ["--data.val_seed=3"])
    plain = tmp_path / "plain"
    train(load_config("smoke_cpu", ["--train.epochs=1", "--train.max_steps_per_epoch=1", f"--train.out_dir={plain}"]))
    with pytest.raises(ConfigError, match="--posthoc-tau auto.*val_per_class"):
        checkpoint_eval.evaluate_checkpoint(plain / "checkpoint.pt", posthoc_auto=True)


def test_report_shows_val_and_the_epoch_chosen_on_it(val_run, tmp_path):
    checkpoint_eval.evaluate_checkpoint(val_run / "checkpoint.pt", report_dir=tmp_path / "r", posthoc_auto=True)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["val_top1"]["all"] is not None and report["best_epoch"]["chosen_on"] == "val"
    md = (tmp_path / "r" / "report.md").read_text()
    assert "final epoch, validation split" in md and "chosen on the validation split" in md


def _row(name: str, val: float | None, test: float) -> dict:
    return {"name": name, "label": name, "status": "done", "top1": {g: test for g in sweep.GROUPS},
            "val": None if val is None else {g: val for g in sweep.GROUPS}, "epochs": 2, "wall_s": 1.0,
            "paper": None, "error": None}


def test_sweep_ranks_by_val_and_marks_the_column():
    rows = [_row("a", 40.0, 90.0), _row("b", 60.0, 10.0), _row("c", None, 99.0), _row("d", 50.0, 50.0)]
    assert [r["name"] for r in sweep.ranked(rows, "val")] == ["b", "d", "a", "c"]
    assert [r["name"] for r in sweep.ranked(rows, None)] == ["a", "b", "c", "d"]
    md = sweep.format_markdown(rows, "mixtail sweep x", "val")
    assert "val All ▼ (ranks the rows)" in md and "the test columns chose nothing" in md
    assert md.index("| b |") < md.index("| d |") < md.index("| a |")
    assert "nothing is ranked" in sweep.format_markdown(rows, "mixtail sweep x")


def test_sweep_rank_by_val_needs_a_validation_split(tmp_path):
    runs = sweep.expand_grid(["smoke_cpu"], ["loss.eta=0,0.1"], [], tmp_path)
    with pytest.raises(UsageError, match="--rank-by val.*val_per_class"):
        sweep.Sweep(runs, tmp_path, rank_by="val")
    with_val = sweep.expand_grid(["smoke_cpu"], ["loss.eta=0,0.1"], ["--data.val_per_class=5"], tmp_path)
    assert sweep.Sweep(with_val, tmp_path, rank_by="val").rank_by == "val"
