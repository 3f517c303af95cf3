"""Tests of trainer/checkpoint.py: checksums, rotation, fallback to the previous checkpoint, kill -9 during a
write, a crash at every step of a save, full and read-only disks (a real tiny tmpfs where this machine may
mount one, else simulated), stale temporary files and non-finite models.

    python -m pytest tests/test_checkpoint.py -q
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.checks import Payload, free_bytes
from mixtail.errors import CheckpointError, MixtailError, NonFiniteCheckpointError
from mixtail.trainer import checkpoint as ckpt
from mixtail.trainer.checkpoint import (CheckpointStore, load_checkpoint, nonfinite_tensors, save_checkpoint,
                                        verify_checkpoint)

REPO = Path(__file__).resolve().parent.parent


def _state(marker: int, numel: int = 64) -> dict:
    """A checkpoint-shaped state whose every value depends on marker, so a mix-up cannot pass."""
    g = torch.Generator().manual_seed(marker)
    return {"model": {"w": torch.randn(numel, generator=g), "b": torch.randn(3, generator=g),
                      "steps": torch.tensor(marker)},
            "optimizer": {"state": {0: {"momentum_buffer": torch.randn(numel, generator=g)}}},
            "epoch": marker, "class_counts": list(range(marker + 3)), "classes": [f"c{marker}"]}


def _assert_is(state: dict, marker: int) -> None:
    want = _state(marker, numel=state["model"]["w"].numel())
    assert state["epoch"] == marker
    for k, v in want["model"].items():
        assert torch.equal(state["model"][k], v), k
    assert state["class_counts"] == want["class_counts"] and state["classes"] == want["classes"]


def _store(run_dir: Path, keep: int = 2) -> tuple[CheckpointStore, list[str]]:
    messages: list[str] = []
    return CheckpointStore(run_dir, keep=keep, log=messages.append), messages


def _temporaries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if ".tmp" in p.name)


def _one_line(text: str) -> None:
    assert "\n" not in text and text.strip() == text, repr(text)


# --------------------------------------------------------------------------------------------------
# One file
# --------------------------------------------------------------------------------------------------


def test_roundtrip_is_verified_and_still_a_plain_torch_file(tmp_path):
    path = tmp_path / "sub" / "c.pt"
    save_checkpoint(path, _state(7))
    assert verify_checkpoint(path) is True
    _assert_is(load_checkpoint(path), 7)
    _assert_is(torch.load(path, weights_only=False), 7)  # users and older scripts read it with torch.load
    assert _temporaries(path.parent) == []


def test_every_single_byte_flip_is_detected(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, _state(1, numel=16))
    good = path.read_bytes()
    kinds = set()
    with open(path, "r+b") as f:
        for i in range(len(good)):  # exhaustive: ~3 KB, each check hashes the file
            f.seek(i)
            f.write(bytes([good[i] ^ (1 << (i % 8))]))
            f.flush()
            with pytest.raises(CheckpointError) as info:
                verify_checkpoint(path)
            f.seek(i)
            f.write(good[i:i + 1])
            f.flush()
            msg = str(info.value)
            _one_line(msg)
            assert str(path) in msg
            kinds.add(msg.split(" is ", 1)[1].split(" (")[0])
    assert verify_checkpoint(path) is True  # restored byte by byte: the loop changed one byte at a time
    # the body and the checksum itself (mismatch), the end record (damaged at its end), the first bytes
    assert kinds == {"corrupt", "truncated or damaged at its end", "not a checkpoint"}


@pytest.mark.parametrize("keep_bytes", [0, 1, 100, "half", "all_but_one"])
def test_truncated_file_is_an_error_naming_it(tmp_path, keep_bytes):
    path = tmp_path / "c.pt"
    save_checkpoint(path, _state(2, numel=1000))
    data = path.read_bytes()
    n = {"half": len(data) // 2, "all_but_one": len(data) - 1}.get(keep_bytes, keep_bytes)
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    _one_line(msg)
    assert str(path) in msg
    assert ("empty" if n == 0 else "not a checkpoint" if n < 4 else "truncated") in msg


def test_unreadable_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "text.pt").write_text("this is not a checkpoint\n")
    cases = {tmp_path / "missing.pt": "does not exist", tmp_path: "is a directory",
             tmp_path / "text.pt": "not a checkpoint"}
    for path, why in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        _one_line(str(info.value))
        assert str(path) in str(info.value) and why in str(info.value)
        assert isinstance(info.value, MixtailError)


def test_zip_that_is_not_a_checkpoint_is_an_error(tmp_path):
    import zipfile
    plain = tmp_path / "other.pt"
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr("hello.txt", "hi")
    assert verify_checkpoint(plain) is False  # a zip without our checksum, like torch.save's own output
    messages = []
    with pytest.raises(CheckpointError, match="could not be read") as info:
        load_checkpoint(plain, log=messages.append)
    _one_line(str(info.value))
    assert messages == []  # a refused file gets its one line and no other


def test_checkpoint_without_checksum_loads_with_a_message(tmp_path):
    path = tmp_path / "old.pt"
    torch.save(_state(4), path)  # what mixtail wrote before checksums
    messages = []
    _assert_is(load_checkpoint(path, log=messages.append), 4)
    assert len(messages) == 1 and str(path) in messages[0] and "unverified" in messages[0]


# --------------------------------------------------------------------------------------------------
# Loading never runs code from the file
# --------------------------------------------------------------------------------------------------


def _payload_state(marker: Path) -> dict:
    state = _state(3)
    state["optimizer"]["state"][0]["note"] = Payload(marker)  # deep inside, where a user would not look
    return state


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    from mixtail import cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        cli.main(list(argv))
    return code.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("checksummed", [True, False])
def test_a_payload_checkpoint_never_runs_under_eval(tmp_path, capsys, checksummed):
    """`mixtail eval` unpickled checkpoints (weights_only=False): a payload ran, rc 0. Now it is refused in one
    line naming the file, exit 2, and the payload's marker never appears, checksum or not."""
    marker, path = tmp_path / "ran", tmp_path / "checkpoint.pt"
    if checksummed:
        save_checkpoint(path, _payload_state(marker))
    else:
        torch.save(_payload_state(marker), path)
    code, err = _cli(capsys, "eval", str(path))
    assert not marker.exists()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"mixtail eval: error: checkpoint {path} is refused: it asks to construct Python "
                             f"objects (1 kind, e.g. 'io.open')"), err


def test_a_payload_checkpoint_never_runs_under_resume(tmp_path, capsys):
    """Written through save_checkpoint its checksum verifies, and `train --resume` ran the payload silently (even
    when the resume was then refused over the config): now one line, exit 2, nothing run."""
    marker = tmp_path / "ran"
    save_checkpoint(tmp_path / "checkpoint.pt", _payload_state(marker))
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    code, err = _cli(capsys, "train", "smoke_cpu", f"--train.out_dir={tmp_path}", "--resume")
    assert not marker.exists()
    assert code == 2 and len(err) == 1 and "is refused: it asks to construct Python objects" in err[0], err


def test_an_older_checkpoint_is_refused_with_its_upgrade_and_upgrades_without_running_code(tmp_path, capsys):
    """mixtail's checkpoints held the class counts as a numpy array, which the weights-only unpickler refuses:
    the refusal says so and names the command, `mixtail upgrade-checkpoint` rewrites the file (numpy's numeric
    arrays are all it reads) and the result loads; it refuses a payload and an array of Python objects."""
    old = tmp_path / "checkpoint.pt"
    state = _state(5)
    state["class_counts"] = np.arange(8)
    save_checkpoint(old, state)
    code, err = _cli(capsys, "eval", str(old))
    assert code == 2 and len(err) == 1 and err[0].endswith(f"convert it once with `mixtail upgrade-checkpoint {old}`")
    code, _ = _cli(capsys, "upgrade-checkpoint", str(old))
    assert code == 0 and verify_checkpoint(old) is True
    upgraded = load_checkpoint(old)
    assert upgraded["class_counts"] == list(range(8)) and torch.equal(upgraded["model"]["w"], state["model"]["w"])
    marker = tmp_path / "ran"
    for name, bad in (("payload.pt", {**_payload_state(marker), "class_counts": np.arange(3)}),
                      ("objects.pt", {**_state(1), "class_counts": np.array([Payload(marker)], dtype=object)})):
        save_checkpoint(tmp_path / name, bad)
        code, err = _cli(capsys, "upgrade-checkpoint", str(tmp_path / name))
        assert code == 2 and len(err) == 1 and "is refused" in err[0], err
    assert not marker.exists()


def test_nonfinite_tensors_names_only_the_bad_ones():
    t = {"a": torch.ones(5), "nan": torch.tensor([1.0, float("nan")]), "inf": torch.full((2, 2), -float("inf")),
         "half": torch.tensor([1.0, float("inf")], dtype=torch.bfloat16), "count": torch.tensor([3]),
         "not_a_tensor": 1.0}
    assert nonfinite_tensors(t) == ["nan", "inf", "half"]
    assert nonfinite_tensors({"a": torch.zeros(3), "i": torch.arange(4)}) == []
    assert nonfinite_tensors({}) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_model_is_never_written(tmp_path, bad):
    store, _ = _store(tmp_path)
    store.save(_state(1))
    state = _state(2)
    state["model"]["w"][17] = bad
    with pytest.raises(NonFiniteCheckpointError) as info:
        store.save(state)
    _one_line(str(info.value))
    assert str(tmp_path / "checkpoint.pt") in str(info.value) and str(info.value).endswith("values in w")
    assert isinstance(info.value, CheckpointError)
    with pytest.raises(NonFiniteCheckpointError):
        save_checkpoint(tmp_path / "single.pt", state)
    assert not (tmp_path / "single.pt").exists() and _temporaries(tmp_path) == []
    path, loaded = store.load_latest()
    assert path == tmp_path / "checkpoint.pt"
    _assert_is(loaded, 1)


# --------------------------------------------------------------------------------------------------
# The store: rotation, fallback, stale files
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_rotation_keeps_exactly_keep_newest_first(tmp_path, keep):
    store, _ = _store(tmp_path, keep)
    for marker in range(keep + 3):
        assert store.save(_state(marker)) == tmp_path / "checkpoint.pt"
        expected = list(range(marker, max(marker - keep, -1), -1))
        assert [load_checkpoint(p)["epoch"] for p in store.paths()] == expected
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["checkpoint.pt"] + [f"checkpoint.{i}.pt" for i in range(1, keep)])


def test_smaller_keep_prunes_what_a_larger_one_left(tmp_path):
    big, _ = _store(tmp_path, keep=4)
    for marker in range(4):
        big.save(_state(marker))
    small, _ = _store(tmp_path, keep=2)
    small.save(_state(9))
    assert [load_checkpoint(p)["epoch"] for p in small.paths()] == [9, 3]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_falls_back_to_previous_with_one_message(tmp_path, damage):
    store, messages = _store(tmp_path, keep=3)
    for marker in range(3):
        store.save(_state(marker, numel=5000))
    latest = tmp_path / "checkpoint.pt"
    data = bytearray(latest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    else:
        data[len(data) // 2] ^= 0x10
    latest.write_bytes(data)

    path, state = store.load_latest()
    assert path == tmp_path / "checkpoint.1.pt"
    _assert_is(state, 1)
    assert len(messages) == 1
    _one_line(messages[0])
    assert str(latest) in messages[0] and str(path) in messages[0]
    assert ("truncated" if damage == "truncate" else "corrupt") in messages[0]

    # The next save moves the damaged file aside instead of rotating it into the history.
    store.save(_state(5, numel=5000))
    assert [load_checkpoint(p)["epoch"] for p in store.paths()] == [5, 1, 0]
    assert (tmp_path / "checkpoint.pt.corrupt").read_bytes() == bytes(data)
    assert any("moved the corrupt checkpoint" in m for m in messages)


def test_no_checkpoint_is_none_and_all_damaged_is_one_error(tmp_path):
    store, _ = _store(tmp_path / "never_created")
    assert store.load_latest() is None and store.clean_stale() == []
    store, _ = _store(tmp_path, keep=2)
    assert store.load_latest() is None
    store.save(_state(0))
    store.save(_state(1))
    for p in store.paths():
        p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(CheckpointError) as info:
        store.load_latest()
    msg = str(info.value)
    _one_line(msg)
    assert "checkpoint.pt is truncated" in msg and "checkpoint.1.pt is truncated" in msg


def test_clean_stale_removes_only_temporary_files(tmp_path):
    store, messages = _store(tmp_path)
    store.save(_state(0))
    stale = [".checkpoint.pt.tmp-4242-a1b2c3", ".checkpoint.1.pt.tmp-4242-d4e5f6", ".checkpoint.pt.tmp31337"]
    for name in stale:
        (tmp_path / name).write_bytes(b"x" * 1000)
    keep = ["checkpoint.pt", "notes.tmp.txt", "checkpoint.pt.corrupt", "metrics.jsonl"]
    for name in keep[1:]:
        (tmp_path / name).write_text("keep me")
    removed = store.clean_stale()
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert len(messages) == 3 and all("1000 bytes" in m and "interrupted checkpoint write" in m
                                      for m in messages)


class _PowerCut(BaseException):
    """A simulated power cut: raised at one filesystem call, and by every call after it."""


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_a_crash_at_any_step_of_a_save_leaves_new_or_previous(tmp_path, monkeypatch, keep):
    names = ["write", "fsync", "replace", "link", "unlink", "open"]
    real = {n: getattr(os, n) for n in names}
    crash_points = 0
    for k in range(1, 200):
        run_dir = tmp_path / f"crash_{k}"
        store, _ = _store(run_dir, keep)
        for marker in range(keep):
            store.save(_state(marker))
        calls = {"n": 0, "dead": False}

        def wrapped(name):
            def call(*args, **kwargs):
                calls["n"] += 1
                if calls["dead"] or calls["n"] == k:
                    calls["dead"] = True
                    raise _PowerCut
                return real[name](*args, **kwargs)
            return call

        for n in names:
            monkeypatch.setattr(os, n, wrapped(n))
        try:
            store.save(_state(100))
            finished = True
        except _PowerCut:
            finished = False
        finally:
            for n in names:
                monkeypatch.setattr(os, n, real[n])
        if finished:
            break
        crash_points += 1
        after, _ = _store(run_dir, keep)
        after.clean_stale()
        path, state = after.load_latest()
        assert state["epoch"] in (100, keep - 1), f"crash at call {k}"
        assert (run_dir / "checkpoint.pt").is_file(), f"crash at call {k}: checkpoint.pt missing"
        after.save(_state(200))  # and the run carries on normally
        assert [load_checkpoint(p)["epoch"] for p in after.paths()][0] == 200
        assert len(after.paths()) <= keep and _temporaries(run_dir) == []
    assert crash_points >= 4  # open, the writes, fsync, the rename(s): the loop really crashed inside save


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed between the listing and the stat
        return 0


_KILL_CHILD = textwrap.dedent("""
    import sys, torch
    from mixtail.trainer.checkpoint import CheckpointStore
    store = CheckpointStore(sys.argv[1])
    store.save({"model": {"w": torch.ones(10)}, "epoch": 1})
    print("saved", flush=True)
    store.save({"model": {"w": torch.zeros(int(sys.argv[2]), dtype=torch.uint8)}, "epoch": 2})
    print("done", flush=True)
""")


@pytest.mark.slow
def test_kill_9_during_a_write_keeps_the_previous_checkpoint(tmp_path):
    nbytes = 128 << 20
    for attempt in range(4):
        run_dir = tmp_path / f"attempt_{attempt}"
        child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(run_dir), str(nbytes)],
                                 stdout=subprocess.PIPE, text=True, cwd=REPO)
        try:
            assert child.stdout.readline().strip() == "saved"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and child.poll() is None:
                if any(_size(p) > 0 for p in run_dir.glob(".checkpoint.pt.tmp-*")):
                    child.send_signal(signal.SIGKILL)
                    break
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=60)
            child.stdout.close()
        leftovers = list(run_dir.glob(".checkpoint.pt.tmp-*"))
        # Mid-write means: killed by the signal, with a temporary file shorter than the tensor it was writing.
        if child.returncode == -signal.SIGKILL and leftovers and leftovers[0].stat().st_size < nbytes:
            break
        nbytes *= 2  # the write finished before the kill landed: make the next one longer
    else:
        pytest.fail("kill -9 never landed in the middle of a checkpoint write in 4 attempts")

    store, messages = _store(run_dir)
    path, state = store.load_latest()
    assert path == run_dir / "checkpoint.pt" and state["epoch"] == 1
    assert store.clean_stale() == leftovers and _temporaries(run_dir) == []
    assert len(messages) == 1 and str(leftovers[0]) in messages[0]


# --------------------------------------------------------------------------------------------------
# Failed writes: a full or read-only disk, no permission
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(mount_tmpfs):
    """A 64 KiB tmpfs (tests/conftest.py's mount_tmpfs; skips where it cannot be mounted)."""
    return mount_tmpfs("64k")


def test_full_disk_real_tmpfs(tiny_tmpfs):
    run_dir = tiny_tmpfs / "run"
    store, _ = _store(run_dir)
    store.save(_state(1, numel=100))
    free = free_bytes(tiny_tmpfs)
    with pytest.raises(CheckpointError) as info:
        store.save(_state(2, numel=100_000))  # 400 KB into 64 KiB
    msg = str(info.value)
    _one_line(msg)
    assert "No space left on device (ENOSPC)" in msg and str(run_dir / "checkpoint.pt") in msg
    assert _temporaries(run_dir) == [] and free_bytes(tiny_tmpfs) == free  # the space is given back
    _assert_is(store.load_latest()[1], 1)


def test_read_only_disk_real_tmpfs(tiny_tmpfs):
    run_dir = tiny_tmpfs / "run"
    store, _ = _store(run_dir)
    store.save(_state(1))
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    for target in (store, CheckpointStore(tiny_tmpfs / "new_run")):  # an existing and a new run directory
        with pytest.raises(CheckpointError) as info:
            target.save(_state(2))
        _one_line(str(info.value))
        assert "Read-only file system (EROFS)" in str(info.value) and str(target.run_dir) in str(info.value)
    _assert_is(store.load_latest()[1], 1)


def _failing_write(after_bytes: int, code: int):
    real = ckpt._write_all
    written = {"n": 0}

    def write_all(fd, view):
        if written["n"] + len(view) > after_bytes:  # write what fits, then fail like a full disk does
            real(fd, view[: max(after_bytes - written["n"], 0)])
            raise OSError(code, os.strerror(code))
        real(fd, view)
        written["n"] += len(view)
    return write_all


FAILED_WRITES = [("write", errno.ENOSPC), ("write", errno.EDQUOT), ("write", errno.EIO), ("fsync", errno.ENOSPC),
                 ("open", errno.EROFS), ("open", errno.EACCES), ("replace", errno.EACCES)]


@pytest.mark.parametrize("where,code", FAILED_WRITES, ids=[f"{w}-{errno.errorcode[c]}" for w, c in FAILED_WRITES])
def test_failed_write_simulated_removes_temporary_and_names_reason(tmp_path, monkeypatch, where, code):
    store, _ = _store(tmp_path)
    store.save(_state(1, numel=1000))
    inside = str(tmp_path)
    if where == "write":
        monkeypatch.setattr(ckpt, "_write_all", _failing_write(3000, code))
    else:
        real = getattr(os, where)

        def fail(*args, **kwargs):
            target = args[1] if where == "replace" else args[0]
            if isinstance(target, int) or str(target).startswith(inside):
                raise OSError(code, os.strerror(code), None if isinstance(target, int) else str(target))
            return real(*args, **kwargs)
        monkeypatch.setattr(os, where, fail)
    with pytest.raises(CheckpointError) as info:
        store.save(_state(2, numel=1000))
    monkeypatch.undo()
    msg = str(info.value)
    _one_line(msg)
    assert f"{os.strerror(code)} ({errno.errorcode[code]})" in msg and str(tmp_path / "checkpoint.pt") in msg
    assert _temporaries(tmp_path) == []
    _assert_is(store.load_latest()[1], 1)
    assert [load_checkpoint(p)["epoch"] for p in store.paths()] == [1]


def test_filesystem_without_hard_links_still_rotates(tmp_path, monkeypatch):
    def no_link(*args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))
    monkeypatch.setattr(os, "link", no_link)
    store, _ = _store(tmp_path, keep=3)
    for marker in range(5):
        store.save(_state(marker))
    assert [load_checkpoint(p)["epoch"] for p in store.paths()] == [4, 3, 2]
