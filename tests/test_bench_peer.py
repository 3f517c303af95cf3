"""benchmarks/bench_peer.py: the identical-subset check, the scaled schedule, and the side-by-side table.

    python -m pytest tests/test_bench_peer.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mixtail.benchmarks import bench_peer
from mixtail.trainer.config import load_config


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """3 classes of 20 train and 4 test noise PNGs (lossless, 32 px): a CIFAR-shaped image tree."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 4)):
        for c in ("ant", "bee", "cat"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i:04d}.png")
    return root


def test_the_subset_is_ldam_drws_and_the_peer_gets_its_pixels(tree):
    cfg = load_config("smoke_cpu", ["--data.dataset=folder", f"--data.root={tree}", "--data.imbalance_ratio=4"])
    files, labels = bench_peer.ldam_rebuild(tree, 4.0)
    assert np.bincount(labels).tolist() == [20, 10, 5]  # int(20·(1/4)^(k/2))
    # Not the first n_k files: LDAM-DRW's seeded shuffle picks them.
    assert [f.rsplit("/", 1)[1] for f in files[20:30]] != [f"{i:04d}.png" for i in range(10)]
    data = bench_peer.subset(cfg)
    assert data["check"]["files_order_labels_pixels_equal"] and data["check"]["num_train"] == 35
    assert data["check"]["num_test"] == 12 and np.array_equal(data["train"].labels, labels)
    with pytest.raises(SystemExit, match="differs from LDAM-DRW's recipe"):
        bench_peer.subset(load_config("smoke_cpu", ["--data.dataset=folder", f"--data.root={tree}",
                                                    "--data.imbalance_ratio=4", "--data.lt_subset=first"]))


def test_schedule_is_cmos_scaled():
    assert bench_peer.schedule(200) == {"epochs": 200, "warmup": 5, "milestones": [160, 180], "first_mixed": 1,
                                        "unmixed_last": 2}
    s = bench_peer.schedule(16)
    assert (s["warmup"], s["milestones"]) == (1, [13, 14])
    cfg = bench_peer.ours_config("/data", "resnet8", 16, 2, "/tmp/out")
    assert (cfg.optim.milestones, cfg.optim.warmup, cfg.mix.box, cfg.data.drop_last) == ((13, 14), "per_epoch",
                                                                                         "clipped", False)
    assert [e for e in range(16) if cfg.mix.active(e, 16)] == list(range(1, 14))  # CMO: 0 < e < 16 - 2


def test_table_reports_means_spreads_and_the_difference(tmp_path, capsys):
    def record(code, seed, all_):
        r = {"code": code, "seed": seed, "final": {"all": all_, "many": 1.0, "medium": 2.0, "few": None},
             "wall_s": 10.0, "schedule": bench_peer.schedule(16), "arch": "resnet8", "threads": 2,
             "subset": {"sha256_16": "x"}}
        if code == "peer":
            r["peer"] = {"commit": None}
            r["best"] = {"all": all_ + 1, "many": 1.0, "medium": 2.0, "few": None, "epoch": 15}
        (tmp_path / f"{code}_seed{seed}.json").write_text(json.dumps(r))

    for seed, (p, o) in enumerate([(50.0, 51.0), (52.0, 50.0), (49.0, 52.0)]):
        record("peer", seed, p)
        record("ours", seed, o)
    record("peer", 7, 40.0)  # no ours run of seed 7: left out
    out = bench_peer.table(tmp_path, peer_best=True, results_dir=tmp_path / "results")
    s = out["summary"]
    assert s["seeds"] == [0, 1, 2] and (s["peer_mean"], s["ours_mean"]) == (50.33, 51.0)
    assert (s["peer_spread"], s["ours_spread"], s["mean_diff"]) == (3.0, 2.0, 0.67) and s["within_spread"]
    assert [r["peer_best_all"] for r in out["rows"]] == [51.0, 53.0, 50.0]
    saved = json.loads(open(out["path"]).read())
    assert saved["config"]["summary"] == s and "torch" in saved["environment"]
    assert "ours - peer +0.67" in capsys.readouterr().out
