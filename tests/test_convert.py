"""Tests of `mixtail convert` (pipelines/convert.py) and converted outputs as a data source (pipelines/sources/manifest.py):
round trips of CIFAR-like JPEGs and photos to both targets, checked against build_dataset on the same source;
interrupted conversions; bad source files; tampering that --verify must catch; training from a converted output.

Sources are generated (tests/helpers/images.py): a CIFAR-10-style tree of 32×32 JPEGs and photo-like JPEGs of
varied sizes and encodings, copied into a temporary folder.

    python -m pytest tests/test_convert.py -q              # -m "not slow" leaves out the kill -9 test
"""

from __future__ import annotations

import errno
import functools
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.checks import cli_error_line, free_bytes
from mixtail import cli
from mixtail.errors import ConfigError, DataError, UsageError
from mixtail.pipelines import convert as cv
from mixtail.pipelines.convert import conversion, encoding, writers
from mixtail.pipelines.convert import sources as convert_sources
from mixtail.pipelines.config import DataConfig
from mixtail.pipelines.sources.types import ImageArrays
from mixtail.pipelines.sources.build import build_dataset
from mixtail.pipelines.sources.folders import scan_image_folder
from mixtail.pipelines.sources.file_lists import read_file_list
from mixtail.pipelines.sources.images import load_rgb
from mixtail.pipelines.sources.manifest import MANIFEST_NAME, Manifest, read_manifest, split_table

from helpers.images import jpeg_bytes, photo_pixels, write_photos

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["airplane", "cat", "frog", "ship"]
TRAIN_PER_CLASS, TEST_PER_CLASS = 12, 4


@pytest.fixture(scope="module")
def cifar_tree(cifar_like_root, tmp_path_factory) -> Path:
    """train/<class>/ and test/<class>/ with the 12 and 4 JPEGs of four classes of the generated CIFAR-like tree."""
    root = tmp_path_factory.mktemp("cifar_small")
    for split, n in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                shutil.copy(cifar_like_root / split / c / f"{i:04d}.jpg", root / split / c)
    return root


def _photo_tree(root: Path, photos_dir: Path, counts=(4, 3, 2)) -> Path:
    """root/<class>/<photo> with photos of varied sizes: the smallest (68×100) and the largest (2400×1600) of
    `photos_dir` first, then others in name order."""
    photos = sorted(photos_dir.iterdir())
    by_area = sorted(photos, key=lambda p: (Image.open(p).size[0] * Image.open(p).size[1], p.name))
    rest = [p for p in photos if p not in (by_area[0], by_area[-1])]
    picked = [by_area[0], by_area[-1], *rest[:sum(counts) - 2]]
    at = 0
    for k, n in enumerate(counts):
        (root / f"class{k}").mkdir(parents=True)
        for p in picked[at:at + n]:
            shutil.copy(p, root / f"class{k}" / p.name)
        at += n
    return root


@pytest.fixture(scope="module")
def photo_tree(photos_dir, tmp_path_factory) -> Path:
    return _photo_tree(tmp_path_factory.mktemp("photos") / "tree", photos_dir)


def _ffcv_or_skip() -> None:
    pytest.importorskip("ffcv", reason="FFCV is not installed (pip install -e '.[ffcv]' after .ci/run's Debian "
                                       "packages)")


@pytest.fixture(params=["dali", pytest.param("ffcv", marks=pytest.mark.ffcv)])
def to(request) -> str:
    """Each target; ffcv only where FFCV is installed."""
    if request.param == "ffcv":
        _ffcv_or_skip()
    return request.param


def _convert(source, out, to, **kw) -> Manifest:
    return cv.convert(cv.ConvertOptions(source=str(source), out=str(out), to=to, jobs=2, **kw), log=lambda m: None)


def _cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        cli.main(["convert", *argv])
    out, err = capsys.readouterr()
    return info.value.code, out, err


_one_line = functools.partial(cli_error_line, "convert")  # stderr is one `mixtail convert: error:` line


def _stored_order(out: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, source indices) of a converted split as the data itself holds them (.beton or list)."""
    m = read_manifest(out)
    if m.target == "ffcv":
        from mixtail.pipelines.sources.beton import beton_info

        info = beton_info(out / m.splits[split].data)
        return info.labels, info.indices
    t = split_table(m, split)
    return t.labels, t.source_index


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("to,mode", [pytest.param("ffcv", "raw", marks=[pytest.mark.ffcv, pytest.mark.slow]),
                                     pytest.param("ffcv", "jpg", marks=[pytest.mark.ffcv, pytest.mark.slow]),
                                     ("dali", "smart"),
                                     ("dali", "jpg")])
def test_cifar_tree_round_trip_matches_build_dataset(cifar_tree, tmp_path, to, mode):
    if to == "ffcv":
        _ffcv_or_skip()
    out = tmp_path / "out"
    m = _convert(cifar_tree, out, to, write_mode=mode, imbalance_ratio=4.0)
    ref = {s: build_dataset(DataConfig(dataset="folder", root=str(cifar_tree), imbalance_ratio=4.0), s, decoded=False)
           for s in ("train", "test")}
    assert m.classes == ref["train"].classes == CLASSES
    n_k = [12, 7, 4, 3]  # int(12 · (1/4)^(k/3))
    assert m.splits["train"].class_counts == n_k and m.splits["test"].class_counts == [TEST_PER_CLASS] * 4
    for split in ("train", "test"):
        labels, index = _stored_order(out, split)
        source = scan_image_folder(cifar_tree / split, CLASSES if split == "test" else None)
        # The same files, in the same order, with the same labels as build_dataset takes from the source.
        assert [source.files[i] for i in index] == ref[split].files
        assert np.array_equal(labels, ref[split].labels)
    assert "ok: train 26 images, test 16 images" in cv.verify(out, sample=None)
    stored = m.splits["train"].stored
    assert stored == ({"raw": 26} if mode == "raw" else {"jpeg": 26} if mode == "jpg" else {"original": 26})


def test_unsubsetted_dali_output_takes_any_ratio_like_the_source(cifar_tree, tmp_path):
    out = tmp_path / "all"
    _convert(cifar_tree, out, "dali")
    for ratio, rule in ((1.0, "ldam"), (3.0, "ldam"), (12.0, "ldam"), (4.0, "first")):
        direct = build_dataset(DataConfig(dataset="folder", root=str(cifar_tree), imbalance_ratio=ratio,
                                          lt_subset=rule), "train", decoded=False)
        conv = build_dataset(DataConfig(dataset="converted", root=str(out), imbalance_ratio=ratio, lt_subset=rule),
                             "train", decoded=False)
        assert conv.classes == direct.classes and np.array_equal(conv.labels, direct.labels)
        assert np.array_equal(conv.sizes, direct.sizes)
        assert [load_rgb(f).tobytes() for f in conv.files[:5]] == [load_rgb(f).tobytes() for f in direct.files[:5]]
    test = build_dataset(DataConfig(dataset="converted", root=str(out)), "test", decoded=True)
    direct = build_dataset(DataConfig(dataset="folder", root=str(cifar_tree)), "test", decoded=True)
    assert isinstance(test, ImageArrays) and np.array_equal(test.images, direct.images)
    assert np.array_equal(test.labels, direct.labels)


def test_a_subsetted_output_refuses_another_ratio(cifar_tree, tmp_path):
    _convert(cifar_tree, tmp_path / "r4", "dali", imbalance_ratio=4.0)
    with pytest.raises(ConfigError, match=r"data.imbalance_ratio.*ρ=4 .*set data.imbalance_ratio=4"):
        build_dataset(DataConfig(dataset="converted", root=str(tmp_path / "r4"), imbalance_ratio=100.0), "train")
    ds = build_dataset(DataConfig(dataset="converted", root=str(tmp_path / "r4"), imbalance_ratio=4.0), "train",
                       decoded=False)
    assert np.bincount(ds.labels).tolist() == [12, 7, 4, 3]


def test_photos_bounded_resolution_round_trip(photo_tree, tmp_path, to):
    out = tmp_path / "out"
    m = _convert(photo_tree, out, to, write_mode="raw", max_resolution=96)
    assert list(m.splits) == ["train"] and m.splits["train"].class_counts == [4, 3, 2]
    table = split_table(m, "train")
    source = scan_image_folder(photo_tree)
    for i, src in enumerate(source.files):
        h, w = load_rgb(src).shape[:2]
        assert tuple(table.sizes[i]) == encoding.bounded_size(h, w, 96) and max(table.sizes[i]) <= 96
    # raw: the resized pixels, exactly (verify compares every image with the source).
    assert "pixels of 9 images match (exactly)" in cv.verify(out, sample=None)
    if to == "dali":
        assert all(f.endswith(".png") for f in table.files)  # every photo is larger than 96 px: resized


def test_file_list_and_inat_json_sources(cifar_tree, tmp_path):
    files = scan_image_folder(cifar_tree / "train")
    rel = [str(Path(f).relative_to(cifar_tree)) for f in files.files]
    order = np.random.default_rng(1).permutation(len(rel))  # lists are in any order; the output keeps it
    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"{rel[i]} {files.labels[i]}\n" for i in order))
    out = tmp_path / "from_list"
    m = _convert(lst, out, "dali", image_root=str(cifar_tree))
    ref = read_file_list(lst, cifar_tree)
    assert m.source["format"] == "filelist" and m.classes == ref.classes == CLASSES  # named by parent folder
    labels, index = _stored_order(out, "train")
    assert np.array_equal(index, np.arange(len(ref))) and np.array_equal(labels, ref.labels)
    # A listed source is long-tailed already: data.imbalance_ratio does not subset it (as build_dataset does not).
    conv = build_dataset(DataConfig(dataset="converted", root=str(out), imbalance_ratio=100.0), "train", decoded=False)
    assert len(conv) == len(ref)
    cv.verify(out)

    doc = {"images": [{"id": 10 + int(i), "file_name": rel[i]} for i in order],
           "annotations": [{"id": k, "image_id": 10 + int(i), "category_id": str(100 + files.labels[i])}
                           for k, i in enumerate(order)],
           "categories": [{"id": str(100 + k), "name": c} for k, c in enumerate(CLASSES)]}
    (tmp_path / "train.json").write_text(json.dumps(doc))
    out = tmp_path / "from_json"
    m = _convert(tmp_path / "train.json", out, "dali", image_root=str(cifar_tree), imbalance_ratio=2.0)
    assert m.source["format"] == "inat-json" and m.classes == CLASSES
    assert m.splits["train"].class_counts == [12, 9, 7, 6]  # int(12 · (1/2)^(k/3))
    cv.verify(out)


@pytest.mark.ffcv
def test_in_memory_cifar_arrays(tmp_path, monkeypatch, cifar_tree):
    """The CIFAR reader's arrays (torchvision's layout cannot be built offline: its files are checksummed),
    here the decoded JPEG tree: raw stores exactly the pixels in both targets (PNG files for dali)."""
    _ffcv_or_skip()
    arrays = {s: ImageArrays(np.stack([load_rgb(f) for f in d.files]), d.labels, d.classes)
              for s, d in (("train", scan_image_folder(cifar_tree / "train")),
                           ("test", scan_image_folder(cifar_tree / "test", CLASSES)))}
    monkeypatch.setattr(convert_sources, "cifar_dataset", lambda name, root, split, download: arrays[split])
    root = tmp_path / "torchvision"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    assert convert_sources.detect_format(str(root)) == "cifar"
    for to in ("dali", "ffcv"):
        m = _convert(root, tmp_path / to, to, write_mode="raw", imbalance_ratio=4.0)
        assert m.source["format"] == "cifar" and m.splits["train"].class_counts == [12, 7, 4, 3]
        assert set(m.splits["train"].stored) == {"png" if to == "dali" else "raw"}
        assert "(exactly)" in cv.verify(tmp_path / to, sample=None)


# --------------------------------------------------------------------------------------------------
# Interrupted conversions
# --------------------------------------------------------------------------------------------------


def _killed_child(source: Path, out: Path, where: str) -> int:
    """Run a conversion in a forked child that dies (os._exit, no clean-up) at `where`; its exit status."""
    def child():
        if where == "mid-write":
            writer = conversion._write_dali
            conversion._write_dali = lambda split, tmp, opts: os._exit(9) if split.name == "test" else writer(split, tmp, opts)
        else:
            conversion._publish = lambda tmp, out, overwrite: os._exit(9)
        _convert(source, out, "dali")
        os._exit(0)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(60)
    return proc.exitcode


@pytest.mark.parametrize("where", ["mid-write", "before the rename"])
def test_an_interrupted_conversion_leaves_nothing_verify_accepts(cifar_tree, tmp_path, capsys, where):
    out = tmp_path / "out"
    assert _killed_child(cifar_tree, out, where) == 9
    assert not out.exists()
    leftovers = list(tmp_path.glob(".out.partial-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "train.txt").is_file()
    code, _, err = _cli(capsys, "--verify", str(out))
    assert code == 2
    _one_line(err, str(out), "no converted output", "interrupted conversion")
    code, _, err = _cli(capsys, "--verify", str(leftovers[0]))
    assert code == 2
    _one_line(err, "interrupted conversion's temporary folder")
    with pytest.raises(DataError):
        build_dataset(DataConfig(dataset="converted", root=str(leftovers[0])), "train")
    # The next run starts clean: the leftover is removed, the output complete.
    code, stdout, _ = _cli(capsys, str(cifar_tree), "--to", "dali", "--out", str(out))
    assert code == 0 and f"removed {leftovers[0]}" in stdout
    assert not list(tmp_path.glob(".out.*")) and (out / MANIFEST_NAME).is_file()
    assert "ok: train 48 images, test 16 images" in cv.verify(out)


@pytest.mark.slow
def test_kill_9_mid_conversion(tmp_path):
    """A real SIGKILL of the CLI while it writes (photos, one thread): no output, --verify refuses, a rerun works."""
    write_photos(tmp_path / "photos", 80)
    source = _photo_tree(tmp_path / "src", tmp_path / "photos", counts=(40, 40))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mixtail", "convert", str(source), "--to", "dali", "--out", str(out),
           "--write-mode", "jpg", "--jobs", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        written = list(tmp_path.glob(".out.partial-*/images/train/*/*.jpg"))
        if len(written) >= 5:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the conversion ended before it could be killed: give it more images"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and list(tmp_path.glob(".out.partial-*"))
    res = subprocess.run([sys.executable, "-m", "mixtail", "convert", "--verify", str(out)], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "interrupted conversion" in res.stderr
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "removed" in res.stdout and not list(tmp_path.glob(".out.partial-*"))
    assert "ok: train 80 images" in cv.verify(out, sample=5)


def test_a_second_conversion_to_one_out_is_refused_naming_the_pid(cifar_tree, tmp_path, capsys):
    """While a conversion holds --out (its lock beside it, mixtail/locks.py, shared with mixtail train) another is
    refused in one line naming the holder's pid; nothing is written. A lock a dead process left is taken over."""
    from mixtail.locks import DirectoryLock

    out = tmp_path / "out"
    with DirectoryLock(tmp_path / ".out.lock", what="mixtail convert", where=f"--out {out}", advice="x"):
        code, _, err = _cli(capsys, str(cifar_tree), "--to", "dali", "--out", str(out))
    assert code == 2
    _one_line(err, f"--out {out} is in use by another mixtail convert (pid {os.getpid()} on host ", "choose another --out")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".out.lock").write_text(f"{dead.pid} host 2026-01-01T00:00:00+0000\n")
    code, stdout, _ = _cli(capsys, str(cifar_tree), "--to", "dali", "--out", str(out))
    assert code == 0 and f"taking over the lock of a mixtail convert that is no longer running (pid {dead.pid} " in stdout
    assert not list(tmp_path.glob(".out.*")) and (out / MANIFEST_NAME).is_file()


def test_existing_outputs_are_replaced_only_with_overwrite(cifar_tree, tmp_path, capsys):
    out = tmp_path / "out"
    _convert(cifar_tree, out, "dali", split="test")
    code, _, err = _cli(capsys, str(cifar_tree), "--to", "dali", "--out", str(out))
    assert code == 2
    _one_line(err, f"{out} exists", "--overwrite")
    _convert(cifar_tree, out, "dali", overwrite=True)
    assert set(read_manifest(out).splits) == {"train", "test"}
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not a mixtail convert output"):
        _convert(cifar_tree, other, "dali", overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------------
# Bad source files
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def bad_tree(cifar_tree, tmp_path) -> tuple[Path, dict[str, str]]:
    """The CIFAR tree with a zero-byte, a truncated and a non-image file added, and the reason each gives."""
    root = tmp_path / "bad"
    shutil.copytree(cifar_tree, root)
    good = (root / "train" / "cat" / "0000.jpg").read_bytes()
    bad = {"zero.jpg": b"", "truncated.jpg": good[: len(good) // 2], "notes.jpg": b"not an image at all\n"}
    for name, data in bad.items():
        (root / "train" / "frog" / name).write_bytes(data)
    return root, {str(root / "train" / "frog" / n): r for n, r in
                  (("zero.jpg", "zero-byte"), ("truncated.jpg", "truncated"), ("notes.jpg", "not an image"))}


def test_bad_files_stop_before_anything_is_written(bad_tree, tmp_path, capsys, to):
    root, bad = bad_tree
    out = tmp_path / "out"
    code, _, err = _cli(capsys, str(root), "--to", to, "--out", str(out))
    assert code == 2
    line = _one_line(err, "3 of 51 train images", "--on-error skip", "nothing was written")
    for path, reason in bad.items():
        assert f"{path}: {reason}" in line
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_bad_files_skipped_are_counted_and_listed(bad_tree, tmp_path, capsys):
    root, bad = bad_tree
    out = tmp_path / "out"
    code, stdout, _ = _cli(capsys, str(root), "--to", "dali", "--out", str(out), "--on-error", "skip")
    assert code == 0 and "skipped 3 bad file(s), listed in manifest.json" in stdout
    m = read_manifest(out)
    assert sorted(s["path"] for s in m.skipped) == sorted(bad) and {s["split"] for s in m.skipped} == {"train"}
    for s in m.skipped:
        assert bad[s["path"]] in s["reason"]
    assert m.splits["train"].num_images == 48 and m.splits["train"].source_images == 51
    ds = build_dataset(DataConfig(dataset="folder", root=str(root), on_error="skip", imbalance_ratio=1.0), "train",
                       decoded=False)
    conv = build_dataset(DataConfig(dataset="converted", root=str(out), imbalance_ratio=1.0), "train", decoded=False)
    assert np.array_equal(conv.labels, ds.labels) and sorted(p for p, _ in ds.skipped) == sorted(bad)
    assert "ok: train 48 images" in cv.verify(out)


def test_a_symlink_loop_named_like_an_image_is_a_bad_file(cifar_tree, tmp_path, capsys):
    """ELOOP must not abort the conversion under --on-error skip."""
    root = tmp_path / "loops"
    shutil.copytree(cifar_tree, root)
    loop = root / "train" / "cat" / "loop.jpg"
    loop.symlink_to("loop.jpg")
    out = tmp_path / "out"
    code, _, err = _cli(capsys, str(root), "--to", "dali", "--out", str(out))
    assert code == 2
    _one_line(err, f"{loop}: a symbolic link loop (ELOOP)", "nothing was written")
    assert not out.exists()
    code, stdout, _ = _cli(capsys, str(root), "--to", "dali", "--out", str(out), "--on-error", "skip")
    assert code == 0 and "skipped 1 bad file(s)" in stdout
    m = read_manifest(out)
    assert [s["path"] for s in m.skipped] == [str(loop)] and m.splits["train"].num_images == 48


def test_files_of_other_extensions_are_reported_by_convert(cifar_tree, tmp_path):
    root = tmp_path / "gif"
    shutil.copytree(cifar_tree, root)
    (root / "train" / "cat" / "odd.gif").write_bytes(b"GIF89a")
    lines = []
    cv.convert(cv.ConvertOptions(source=str(root), out=str(tmp_path / "out"), to="dali", jobs=1), log=lines.append)
    assert lines[0] == (f"train split of {root}: 1 of 49 files left out for their extension (1 .gif); images are "
                        ".jpg .jpeg .png .bmp .webp .ppm .tif .tiff")
    assert not any(line.startswith("test split") for line in lines)


@pytest.mark.slow
def test_a_file_that_fails_only_when_decoded(cifar_tree, tmp_path, capsys, to):
    """Complete JPEG markers around broken data: the header check passes, the decode does not."""
    root = tmp_path / "late"
    shutil.copytree(cifar_tree, root)
    data = bytearray(jpeg_bytes(photo_pixels(np.random.default_rng(0), 375, 500)))
    data[2000:2400] = b"\xff" * 400
    broken = root / "train" / "ship" / "broken.jpg"
    broken.write_bytes(bytes(data))
    out = tmp_path / "out"
    code, _, err = _cli(capsys, str(root), "--to", to, "--out", str(out), "--write-mode", "jpg")
    assert code == 2
    _one_line(err, str(broken), "cannot be decoded", "nothing was written")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    code, stdout, _ = _cli(capsys, str(root), "--to", to, "--out", str(out), "--write-mode", "jpg",
                           "--on-error", "skip")
    assert code == 0 and f"skipping {broken}" in stdout and "skipped 1 bad file(s)" in stdout
    m = read_manifest(out)
    assert [s["path"] for s in m.skipped] == [str(broken)] and m.splits["train"].num_images == 48
    cv.verify(out, sample=3)


def test_a_full_disk_names_the_output_and_what_was_written(photo_tree, mount_tmpfs, capsys, to):
    """A real 256 KiB tmpfs, filled part-way through the split (the OS's message names no path, so ours must)."""
    disk = mount_tmpfs("256k")
    free = free_bytes(disk)
    out = disk / "out"
    code, _, err = _cli(capsys, str(photo_tree), "--to", to, "--out", str(out))
    assert code == 2
    line = _one_line(err, f"converting to {out}: No space left on device (ENOSPC) after ",
                     "the partial output was removed, nothing was written to")
    written = int(line.split(" after ", 1)[1].split(" bytes", 1)[0].replace(",", ""))
    assert 0 < written <= free
    assert list(disk.iterdir()) == [] and free_bytes(disk) == free  # nothing left, the space given back


def test_a_full_disk_simulated_counts_the_bytes_of_the_files_written(cifar_tree, tmp_path, monkeypatch, capsys):
    """Everywhere (no mount needed): the third encoded image hits ENOSPC; the message counts the two before it."""
    real, sizes = encoding.encode, []

    def encode(rgb, kind, quality):
        if len(sizes) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        sizes.append(len(data := real(rgb, kind, quality)))
        return data

    monkeypatch.setattr(writers, "encode", encode)
    out = tmp_path / "out"
    code, _, err = _cli(capsys, str(cifar_tree), "--to", "dali", "--out", str(out), "--write-mode", "jpg",
                        "--jobs", "1")
    assert code == 2
    _one_line(err, f"converting to {out}: No space left on device (ENOSPC) after {sum(sizes):,} bytes")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


# --------------------------------------------------------------------------------------------------
# --verify catches differences
# --------------------------------------------------------------------------------------------------


def _verify_fails(capsys, out: Path, *fragments: str, sample: str = "all") -> str:
    code, _, err = _cli(capsys, "--verify", str(out), "--sample", sample)
    assert code == 2
    return _one_line(err, *fragments)


def test_verify_catches_tampered_dali_outputs(cifar_tree, tmp_path, capsys):
    out = tmp_path / "out"
    _convert(cifar_tree, out, "dali", write_mode="raw", imbalance_ratio=4.0)
    code, stdout, _ = _cli(capsys, "--verify", str(out))
    assert code == 0 and "ok" in stdout
    clean = tmp_path / "clean"
    shutil.copytree(out, clean)

    def fresh():
        shutil.rmtree(out)
        shutil.copytree(clean, out)

    # A label changed in the list the DALI backend reads.
    lines = (out / "train.txt").read_text().splitlines()
    path, label = lines[5].rsplit(" ", 1)
    lines[5] = f"{path} {(int(label) + 1) % 4}"
    (out / "train.txt").write_text("\n".join(lines) + "\n")
    _verify_fails(capsys, out, "train.txt:6", "label")
    # The same label changed consistently in the list and the table: the source says otherwise.
    with np.load(out / "train.index.npz") as npz:
        table = {k: npz[k] for k in npz.files}
    table["labels"][5] = (table["labels"][5] + 1) % 4
    np.savez(out / "train.index.npz", **table)
    _verify_fails(capsys, out, "train image 5", "in the output", "in the source")
    fresh()
    # One byte of a stored original.
    victim = Path(split_table(read_manifest(out), "test").files[7])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    _verify_fails(capsys, out, "test image 7", str(victim), "source file's bytes")
    # The same, in an image the sample does not decode: the checksum catches it.
    _verify_fails(capsys, out, "images/test", "checksum", sample="1")
    fresh()
    # A file gone.
    Path(split_table(read_manifest(out), "train").files[0]).unlink()
    _verify_fails(capsys, out, "train image 0", "stored file", "does not exist")


@pytest.mark.ffcv
def test_verify_catches_tampered_beton(photo_tree, tmp_path, capsys):
    _ffcv_or_skip()
    from ffcv.reader import Reader

    out = tmp_path / "out"
    _convert(photo_tree, out, "ffcv", write_mode="raw", max_resolution=40)
    beton = out / "train.beton"
    clean = beton.read_bytes()
    reader = Reader(str(beton))
    from ffcv.types import HeaderType

    meta_at = HeaderType.itemsize + reader.field_descriptors.nbytes
    label_at = meta_at + 3 * reader.metadata.dtype.itemsize + reader.metadata.dtype.fields["f1"][1]
    data = bytearray(clean)
    old = int(np.frombuffer(clean, np.int64, 1, label_at)[0])
    data[label_at:label_at + 8] = np.int64((old + 1) % 3).tobytes()
    beton.write_bytes(bytes(data))
    _verify_fails(capsys, out, "train image 3", "in the output", "in the source")
    # One pixel of a raw image, in place: the image's pixels are found in the file by their bytes.
    image = encoding.bound(load_rgb(scan_image_folder(photo_tree).files[2]), 40)
    at = clean.find(image.tobytes())
    assert at > 0
    data = bytearray(clean)
    data[at + 100] ^= 0x80
    beton.write_bytes(bytes(data))
    _verify_fails(capsys, out, "train image 2", "pixel (y=", "exactly")
    # The table beside the .beton, which mixtail train reads for counts, must agree with it.
    beton.write_bytes(clean)
    with np.load(out / "train.index.npz") as npz:
        table = {k: npz[k] for k in npz.files}
    table["sizes"][4, 1] += 1
    np.savez(out / "train.index.npz", **table)
    _verify_fails(capsys, out, "train image 4", "train.index.npz gives size")


def test_manifest_edits_are_refused(cifar_tree, tmp_path):
    out = tmp_path / "out"
    _convert(cifar_tree, out, "dali", split="test")
    doc = json.loads((out / MANIFEST_NAME).read_text())
    doc["outputs"]["test.txt"]["sha256"] = "0" * 64
    (out / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(DataError, match="'checksum' does not match"):
        read_manifest(out)
    doc["format_version"] = 99
    (out / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(DataError, match="format_version 99"):
        read_manifest(out)


# --------------------------------------------------------------------------------------------------
# Options and the data source
# --------------------------------------------------------------------------------------------------


def test_option_errors_are_one_line(cifar_tree, photo_tree, tmp_path, capsys):
    cases = [
        ((str(cifar_tree), "--to", "dali", "--out", str(tmp_path / "o"), "--write-mode", "proportion"),
         "proportion is FFCV's"),
        ((str(cifar_tree), "--to", "dali", "--out", str(cifar_tree / "conv")), "inside the source folder"),
        ((str(photo_tree), "--to", "dali", "--out", str(tmp_path / "o"), "--split", "test"), "has no test split"),
        ((str(tmp_path / "nothing"), "--to", "dali", "--out", str(tmp_path / "o")), "no such file or folder"),
        ((str(cifar_tree), "--out", str(tmp_path / "o")), "--to ffcv|dali"),
        (("--verify", str(tmp_path / "o"), "--sample", "0"), "--sample must be at least 1"),
    ]
    for argv, fragment in cases:
        code, _, err = _cli(capsys, *argv)
        assert code == 2, argv
        _one_line(err, fragment)
    assert not (tmp_path / "o").exists()


def test_converted_data_config_is_validated():
    with pytest.raises(ConfigError, match="data.root.*mixtail convert"):
        DataConfig(dataset="converted").validate()
    DataConfig(dataset="converted", root="/x").validate()


@pytest.mark.dali
@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.slow
def test_train_from_a_converted_dali_output(cifar_tree, tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    out = tmp_path / "conv"
    _convert(cifar_tree, out, "dali")
    res = subprocess.run([sys.executable, "-m", "mixtail", "train", "smoke_cpu", "--data.dataset=converted",
                          f"--data.root={out}", f"--data.backend={backend}", "--data.imbalance_ratio=4",
                          "--data.batch_size=8", "--data.eval_batch_size=8", "--train.epochs=1",
                          "--train.max_steps_per_epoch=2", f"--train.out_dir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "26 training images in 4 classes (12..3 per class)" in res.stdout
    final = json.loads((tmp_path / "run" / "final_eval.json").read_text())
    assert final["num_test_images"] == 16


@pytest.mark.ffcv
def test_a_converted_beton_is_the_ffcv_backends_data_source(cifar_tree, tmp_path):
    """build_dataset gives the FFCV backend's BetonDataset (pipelines/backends/ffcv_executor.py) with the labels,
    sizes and LT subset build_dataset takes from the source, at .beton positions that hold those images."""
    _ffcv_or_skip()
    beton = pytest.importorskip("mixtail.pipelines.sources.beton", reason="FFCV is not installed")
    out = tmp_path / "beton"
    _convert(cifar_tree, out, "ffcv", write_mode="raw")
    with pytest.raises(ConfigError, match="data.backend.*--to ffcv.*data.backend=ffcv"):
        build_dataset(DataConfig(dataset="converted", root=str(out)), "train")
    for split in ("train", "test"):
        direct = build_dataset(DataConfig(dataset="folder", root=str(cifar_tree), imbalance_ratio=4.0), split,
                               decoded=False)
        conv = build_dataset(DataConfig(dataset="converted", root=str(out), backend="ffcv", imbalance_ratio=4.0),
                             split, decoded=False)
        assert isinstance(conv, beton.BetonDataset) and conv.classes == direct.classes
        assert np.array_equal(conv.labels, direct.labels) and np.array_equal(conv.sizes, direct.sizes)
        _, index = _stored_order(out, split)
        source = scan_image_folder(cifar_tree / split, CLASSES if split == "test" else None)
        assert [source.files[i] for i in index[conv.positions]] == direct.files


@pytest.mark.slow
@pytest.mark.ffcv
def test_train_from_a_converted_beton(cifar_tree, tmp_path):
    _ffcv_or_skip()
    pytest.importorskip("mixtail.pipelines.backends.ffcv_executor", reason="the FFCV backend is not merged yet")
    out = tmp_path / "beton"
    _convert(cifar_tree, out, "ffcv", write_mode="jpg", imbalance_ratio=4.0)
    res = subprocess.run([sys.executable, "-m", "mixtail", "train", "smoke_cpu", "--data.dataset=converted",
                          f"--data.root={out}", "--data.backend=ffcv", "--data.num_threads=1",
                          "--data.imbalance_ratio=4", "--data.batch_size=8", "--data.eval_batch_size=8",
                          "--train.epochs=1", "--train.max_steps_per_epoch=2", f"--train.out_dir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "26 training images in 4 classes (12..3 per class)" in res.stdout
    assert json.loads((tmp_path / "run" / "final_eval.json").read_text())["num_test_images"] == 16


def test_bench_convert_writes_a_table_and_json(cifar_tree, tmp_path, capsys):
    from mixtail.benchmarks import bench_convert

    bench_convert.main(["--source", str(cifar_tree / "train"), "--targets", "dali", "--modes", "raw,jpg",
                        "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "dali" in out and "img_per_s" in out
    record = json.loads(next(tmp_path.glob("convert_*.json")).read_text())
    rows = record["rows"]
    assert [(r["target"], r["write_mode"]) for r in rows] == [("dali", "raw"), ("dali", "jpg")]
    assert all(r["images"] == 48 and r["img_per_s"] > 0 and r["mib"] > 0 and r["verified"] for r in rows)
