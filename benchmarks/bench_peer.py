"""A peer's own code and mixtail's config of it, side by side on the identical long-tailed subset.

The peer is CMO (naver-ai/cmo, `cifar_train.py --loss_type BS --data_aug CMO`) against mixtail's `_cmo` config,
on CIFAR-10-LT given as an image tree (train/<class>/*.jpg, test/<class>/*.jpg: /work-style JPEG CIFAR-10).
Both train the same ResNet on the same images at a schedule scaled from CMO's 200 epochs to --epochs, on the
CPU, and report the final epoch's test top-1 (All / Many / Medium / Few), one seed per process:

    git --git-dir=<mirror of naver-ai/cmo> archive HEAD | tar -x -C /tmp/cmo        # the peer's code, never committed
    python -m mixtail.benchmarks.bench_peer run --code peer --peer /tmp/cmo --data /tmp/cifar10 --seed 0 --out runs/peer
    python -m mixtail.benchmarks.bench_peer run --code ours --data /tmp/cifar10 --seed 0 --out runs/peer
    ...                                                                                 # seeds 1, 2, ...
    python -m mixtail.benchmarks.bench_peer table --out runs/peer [--peer-best]        # table + JSON record

The subset is mixtail's (data.lt_subset ldam, the README recipe of LDAM-DRW's imbalance_cifar.py): the peer run
builds it with mixtail, checks it against an independent rebuild of that recipe over the sorted file names
(files, order, labels) and against a plain PIL decode of every file (pixels), and hands exactly those arrays,
in that order, to the peer's own dataset class (its IMBALANCECIFAR10, built without reading CIFAR pickles).

The peer's code runs unmodified on disk; this script changes, at run time and in its own process only:
- `.cuda()` on tensors and modules returns them unchanged (a CPU machine);
- `IMBALANCECIFAR100` and `datasets.CIFAR100` yield the subset and the test set above (CIFAR-10, 10 classes);
- `models.resnet8` is added: its own ResNet_s with one BasicBlock per stage (its file has resnet20 and up);
- `adjust_learning_rate` is its own rule with the milestones scaled: lr·(e+1)/W while e + 1 <= W, ×0.01 from
  epoch m1 and ×0.0001 from m2 (W = round(5·s), m1 = round(160·s), m2 = round(180·s), s = epochs/200);
- `tensorboardX` and `sklearn.metrics.confusion_matrix` (absent here) are stand-ins: a writer that drops
  everything, and a confusion matrix that also keeps each epoch's for the per-group accuracies.
Mixing runs in the same epochs in both: CMO's `start_data_aug < e < E − end_data_aug` with start 0 and end 2
is mixtail's mix.start_epoch 1 and mix.unmixed_last_epochs 2.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

CONFIG = "cifar10_lt_r100_cmo"


def schedule(epochs: int) -> dict:
    """CMO's 200-epoch schedule scaled to `epochs` (see the module docstring)."""
    s = epochs / 200
    return {"epochs": epochs, "warmup": max(1, round(5 * s)), "milestones": [round(160 * s), round(180 * s)],
            "first_mixed": 1, "unmixed_last": 2}


def ours_config(data_root: str, arch: str, epochs: int, seed: int, out_dir: str, config: str = CONFIG):
    from mixtail.trainer.config import load_config

    sch = schedule(epochs)
    return load_config(config, [
        "--data.dataset=folder", f"--data.root={data_root}", f"--model.arch={arch}", f"--train.epochs={epochs}",
        f"--optim.warmup_epochs={sch['warmup']}", f"--optim.milestones={sch['milestones']}",
        f"--mix.start_epoch={sch['first_mixed']}", f"--mix.unmixed_last_epochs={sch['unmixed_last']}",
        f"--train.seed={seed}", "--train.device=cpu", "--train.precision=fp32", f"--train.eval_every_epochs={epochs}",
        f"--train.out_dir={out_dir}", "--train.tensorboard=false"])


# --------------------------------------------------------------------------------------------------
# The identical subset
# --------------------------------------------------------------------------------------------------


def ldam_rebuild(root: Path, imbalance_ratio: float) -> tuple[list[str], np.ndarray]:
    """LDAM-DRW's imbalance_cifar.py over the sorted file names, written out here: n_k = int(n_max·(1/ρ)^(k/(K−1)))
    per class in sorted order; np.random.seed(0) once, then per class shuffle its positions, keep the first n_k."""
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    files, labels = [], []
    for k, c in enumerate(classes):
        names = sorted(p.name for p in (root / "train" / c).iterdir())
        files += [str((root / "train" / c / n).resolve()) for n in names]
        labels += [k] * len(names)
    labels = np.array(labels)
    n_max = len(labels) / len(classes)
    np.random.seed(0)
    keep_files, keep_labels = [], []
    for k in range(len(classes)):
        n_k = int(n_max * ((1 / imbalance_ratio) ** (k / (len(classes) - 1.0))))
        idx = np.where(labels == k)[0]
        np.random.shuffle(idx)
        keep_files += [files[i] for i in idx[:n_k]]
        keep_labels += [k] * n_k
    return keep_files, np.array(keep_labels)


def subset(cfg) -> dict:
    """mixtail's train and test arrays for cfg.data, checked against the recipe and a plain PIL decode."""
    from PIL import Image

    from mixtail.pipelines.sources.build import build_dataset

    files = build_dataset(cfg.data, "train", decoded=False)
    train = build_dataset(cfg.data, "train")
    test = build_dataset(cfg.data, "test")
    ref_files, ref_labels = ldam_rebuild(Path(cfg.data.root), cfg.data.imbalance_ratio)
    same_files = [str(Path(f).resolve()) for f in files.files] == ref_files
    same_labels = bool(np.array_equal(files.labels, ref_labels) and np.array_equal(train.labels, ref_labels))
    def pil(paths):
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in paths])

    test_files = sorted((c.name, f.name) for c in (Path(cfg.data.root) / "test").iterdir() for f in c.iterdir())
    test_labels = np.array([test.classes.index(c) for c, _ in test_files])
    same_labels = same_labels and bool(np.array_equal(test.labels, test_labels))
    same_pixels = bool(np.array_equal(pil(ref_files), train.images)) and bool(np.array_equal(
        pil([Path(cfg.data.root) / "test" / c / f for c, f in test_files]), test.images))
    if not (same_files and same_labels and same_pixels):
        raise SystemExit(f"the subset differs from LDAM-DRW's recipe: files {same_files}, labels {same_labels}, "
                         f"pixels {same_pixels}")
    digest = hashlib.sha256(train.images.tobytes() + train.labels.astype(np.int64).tobytes()).hexdigest()[:16]
    return {"train": train, "test": test, "check": {"files_order_labels_pixels_equal": True, "sha256_16": digest,
                                                    "num_train": len(train.labels), "num_test": len(test.labels)}}


# --------------------------------------------------------------------------------------------------
# One run of each code
# --------------------------------------------------------------------------------------------------


def run_ours(args) -> dict:
    import torch

    from mixtail.trainer.train import train

    torch.set_num_threads(args.threads)
    cfg = ours_config(args.data, args.arch, args.epochs, args.seed, str(Path(args.out) / f"ours_seed{args.seed}"))
    data = subset(cfg)  # the check; the trainer builds the same subset itself
    t0 = time.perf_counter()
    results = train(cfg, overwrite=True)
    return {"code": "ours", "config": CONFIG, "final": _groups(results), "wall_s": time.perf_counter() - t0,
            "subset": data["check"]}


def _stubs(confusions: list) -> None:
    """tensorboardX and sklearn stand-ins (neither is installed here), and a record of each confusion matrix."""
    tbx = types.ModuleType("tensorboardX")

    class SummaryWriter:
        def __init__(self, *a, **k): ...
        def __getattr__(self, name): return lambda *a, **k: None

    tbx.SummaryWriter = SummaryWriter
    metrics, multiclass = types.ModuleType("sklearn.metrics"), types.ModuleType("sklearn.utils.multiclass")

    def confusion_matrix(y_true, y_pred):
        y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
        labels = np.unique(np.concatenate([y_true, y_pred]))
        pos = {v: i for i, v in enumerate(labels)}
        cm = np.zeros((len(labels), len(labels)), np.int64)
        np.add.at(cm, ([pos[v] for v in y_true], [pos[v] for v in y_pred]), 1)
        confusions.append(cm)
        return cm

    metrics.confusion_matrix = confusion_matrix
    multiclass.unique_labels = lambda *ys: np.unique(np.concatenate([np.asarray(y) for y in ys]))
    sklearn, utils = types.ModuleType("sklearn"), types.ModuleType("sklearn.utils")
    stubs = {"tensorboardX": tbx, "sklearn": sklearn, "sklearn.metrics": metrics, "sklearn.utils": utils,
             "sklearn.utils.multiclass": multiclass}
    for name, module in stubs.items():  # a spec, so importlib.util.find_spec (torch._dynamo asks) accepts them
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules.update(stubs)


def run_peer(args) -> dict:
    import torch
    import torch.nn as nn

    from mixtail.trainer.evaluate import accuracy_summary

    peer = Path(args.peer).resolve()
    if not (peer / "cifar_train.py").is_file():
        raise SystemExit(f"--peer {str(peer)[:200]!r} has no cifar_train.py: give a work tree of naver-ai/cmo")
    cfg = ours_config(args.data, args.arch, args.epochs, args.seed, "unused")
    data = subset(cfg)
    train, test = data["train"], data["test"]
    counts = np.bincount(train.labels, minlength=len(train.classes))
    import torchvision  # noqa: F401 - before the stand-ins: torchvision's import walks torch._dynamo's rules

    confusions: list = []
    _stubs(confusions)
    work = Path(tempfile.mkdtemp(prefix="bench_peer_"))
    sch = schedule(args.epochs)
    sys.argv = ["cifar_train.py", "--arch", args.arch, "--num_classes", str(len(train.classes)),
                "--imb_factor", str(1 / cfg.data.imbalance_ratio), "--loss_type", "BS", "--data_aug", "CMO",
                "--epochs", str(args.epochs), "--start_data_aug", str(sch["first_mixed"] - 1),
                "--end_data_aug", str(sch["unmixed_last"]), "--seed", str(args.seed), "--workers", str(args.workers),
                "--batch_size", str(cfg.data.batch_size), "--root", str(work), "--root_log", str(work / "log"),
                "--root_model", str(work / "ckpt"), "--print_freq", "100000"]
    sys.path.insert(0, str(peer))
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    import cifar_train
    import models
    from imbalance_data.imbalance_cifar import IMBALANCECIFAR10
    import torchvision

    def lt_train(root, imb_factor, rand_number, weighted_alpha, train, download, transform, use_randaug):
        ds = IMBALANCECIFAR10.__new__(IMBALANCECIFAR10)
        ds.root, ds.train, ds.transform, ds.target_transform = root, True, transform, None
        ds.data, ds.targets = train_arrays.images.copy(), [int(y) for y in train_arrays.labels]
        ds.num_per_cls_dict = {k: int(n) for k, n in enumerate(counts)}
        ds.weighted_alpha, ds.use_randaug = weighted_alpha, use_randaug
        return ds

    def test_set(root, train, download, transform):
        ds = torchvision.datasets.CIFAR10.__new__(torchvision.datasets.CIFAR10)
        ds.root, ds.train, ds.transform, ds.target_transform = root, False, transform, None
        ds.data, ds.targets = test.images.copy(), [int(y) for y in test.labels]
        return ds

    train_arrays = train
    cifar_train.IMBALANCECIFAR100 = lt_train
    cifar_train.datasets.CIFAR100 = test_set
    rc = models.resnet_cifar
    models.resnet8 = lambda num_classes=10, use_norm=False: rc.ResNet_s(rc.BasicBlock, [1, 1, 1], num_classes, use_norm)
    w, (m1, m2) = sch["warmup"], sch["milestones"]

    def adjust_learning_rate(optimizer, epoch, args):
        e = epoch + 1
        lr = args.lr * e / w if e <= w else args.lr * (0.0001 if e > m2 else 0.01 if e > m1 else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr

    cifar_train.adjust_learning_rate = adjust_learning_rate
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        cifar_train.main()
    finally:
        os.chdir(cwd)
    wall = time.perf_counter() - t0
    epochs = [accuracy_summary(np.diag(cm).astype(float), cm.sum(1).astype(float), counts) for cm in confusions]
    if len(epochs) != args.epochs:
        raise SystemExit(f"the peer evaluated {len(epochs)} times in {args.epochs} epochs")
    best = int(np.argmax([e["all"] for e in epochs]))
    return {"code": "peer", "peer": _peer_id(peer), "final": _groups(epochs[-1]),
            "best": {**_groups(epochs[best]), "epoch": best + 1}, "wall_s": wall, "subset": data["check"]}


def _peer_id(peer: Path) -> dict:
    digest = hashlib.sha256((peer / "cifar_train.py").read_bytes()).hexdigest()[:16]
    commit = None
    try:
        commit = subprocess.run(["git", "-C", str(peer), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except OSError:
        pass
    return {"path": str(peer), "cifar_train_sha256_16": digest, "commit": commit}


def _groups(r: dict) -> dict:
    return {k: (None if r.get(k) is None else round(float(r[k]), 2)) for k in ("all", "many", "medium", "few")}


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


def table(out: Path, peer_best: bool, results_dir: Path | None, peer_commit: str | None = None) -> dict:
    from mixtail.benchmarks.common import environment, format_table, write_json

    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*_seed*.json"))]
    by = {(r["code"], r["seed"]): r for r in runs}
    seeds = sorted({s for c, s in by if (("peer", s) in by and ("ours", s) in by)})
    if not seeds:
        raise SystemExit(f"no seed in {out} has both a peer and an ours run")
    rows = []
    for s in seeds:
        p, o = by[("peer", s)], by[("ours", s)]
        row = {"seed": s}
        for g in ("all", "many", "medium", "few"):
            row[f"peer_{g}"] = p["final"][g]
        if peer_best:
            row["peer_best_all"], row["peer_best_epoch"] = p["best"]["all"], p["best"]["epoch"]
        for g in ("all", "many", "medium", "few"):
            row[f"ours_{g}"] = o["final"][g]
        row["diff_all"] = round(o["final"]["all"] - p["final"]["all"], 2)
        row["peer_wall_s"], row["ours_wall_s"] = round(p["wall_s"]), round(o["wall_s"])
        rows.append(row)
    peer_all = np.array([r["peer_all"] for r in rows])
    ours_all = np.array([r["ours_all"] for r in rows])
    summary = {"seeds": seeds, "peer_mean": round(float(peer_all.mean()), 2),
               "peer_spread": round(float(peer_all.max() - peer_all.min()), 2),
               "peer_std": round(float(peer_all.std(ddof=1)), 2) if len(seeds) > 1 else None,
               "ours_mean": round(float(ours_all.mean()), 2),
               "ours_spread": round(float(ours_all.max() - ours_all.min()), 2),
               "ours_std": round(float(ours_all.std(ddof=1)), 2) if len(seeds) > 1 else None,
               "mean_diff": round(float((ours_all - peer_all).mean()), 2),
               "diff_std": round(float((ours_all - peer_all).std(ddof=1)), 2) if len(seeds) > 1 else None,
               "seeds_ours_higher": int((ours_all > peer_all).sum())}
    summary["within_spread"] = abs(summary["mean_diff"]) <= max(summary["peer_spread"], summary["ours_spread"])
    print(format_table([{k: f"{v:.2f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]))
    print(f"mean All: peer {summary['peer_mean']} (spread {summary['peer_spread']}), ours {summary['ours_mean']} "
          f"(spread {summary['ours_spread']}); ours - peer {summary['mean_diff']:+.2f}, within the seed spread: "
          f"{summary['within_spread']}")
    first = runs[0]
    peer = next(r["peer"] for r in runs if r["code"] == "peer")
    if peer_commit:  # an exported work tree has no git metadata: the commit it was exported from
        peer = {**peer, "commit": peer_commit}
    config = {"keys": ["seed"], "config": CONFIG, "schedule": first["schedule"], "arch": first["arch"],
              "peer": peer, "subset": first["subset"],
              "summary": summary, "metric": "final-epoch test top-1 %, 10,000 test images"}
    path = write_json("peer_cmo", rows, config=config, env=environment({"torch_threads": first.get("threads")}),
                      out_dir=results_dir)
    print(f"wrote {path}")
    return {"rows": rows, "summary": summary, "path": str(path)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench_peer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one run of one code at one seed")
    r.add_argument("--code", choices=("peer", "ours"), required=True)
    r.add_argument("--peer", help="a work tree of naver-ai/cmo (fetched; never part of this repository)")
    r.add_argument("--data", required=True, help="image tree with train/<class>/ and test/<class>/")
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--epochs", type=int, default=16)
    r.add_argument("--arch", default="resnet8")
    r.add_argument("--workers", type=int, default=2, help="the peer's DataLoader workers")
    r.add_argument("--threads", type=int, default=2, help="torch threads of either run")
    r.add_argument("--out", required=True)
    t = sub.add_parser("table", help="the side-by-side table of the runs in --out, and its JSON record")
    t.add_argument("--out", required=True)
    t.add_argument("--peer-best", action="store_true", help="also print the peer's best test epoch (its own report)")
    t.add_argument("--results", default=None, help="folder for the JSON record (default benchmarks/results)")
    t.add_argument("--peer-commit", default=None, help="the peer commit its work tree was exported from")
    args = p.parse_args(argv)
    if args.cmd == "table":
        results = Path(args.results) if args.results else Path(__file__).resolve().parent / "results"
        table(Path(args.out), args.peer_best, results, args.peer_commit)
        return
    if args.code == "peer" and not args.peer:
        p.error("--code peer needs --peer PATH")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = run_peer(args) if args.code == "peer" else run_ours(args)
    record.update(seed=args.seed, arch=args.arch, schedule=schedule(args.epochs), threads=args.threads)
    (out / f"{args.code}_seed{args.seed}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("code", "seed", "final", "wall_s")}))


if __name__ == "__main__":
    main()
