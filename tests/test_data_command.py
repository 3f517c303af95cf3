"""`mixtail data`: the dataset inspection commands print what training would read, and refuse bad input in one
line (exit 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mixtail import cli

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _run(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", *argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_counts_of_the_demo_set(capsys):
    code, out, _ = _run(capsys, "counts", "demo")
    # The demo's LT subset: 10 classes, 300 down to 3 images at ρ = 100.
    assert code == 0 and out.startswith("740 train images, 10 classes, counts 300..3; many 3, medium 3, few 4")


def test_check_names_a_bad_file_and_counts_it(capsys, tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_text("not an image")
    code, out, _ = _run(capsys, "check", str(tmp_path))
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith(str(tmp_path / "bad.jpg") + ": ")
    assert lines[-1].startswith("2 files, 1 bad")


def test_list_reads_an_imagenet_lt_list(capsys, tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("train/n1/a.jpg 0\ntrain/n1/b.jpg 0\ntrain/n2/c.jpg 1\n")
    code, out, _ = _run(capsys, "list", str(listing), "--root", str(tmp_path))
    assert code == 0 and out.startswith("3 images, 2 classes, 2 with images, counts 2..1; first: ")


def test_info_of_a_folder_that_is_no_converted_output(capsys, tmp_path):
    code, _, err = _run(capsys, "info", str(tmp_path))
    assert code == 2 and err.strip().splitlines() == [
        f"mixtail data: error: {tmp_path}: no manifest.json: not a complete mixtail convert output (the manifest "
        f"is written last)"]


def test_unknown_subcommand_and_no_images(capsys, tmp_path):
    code, _, err = _run(capsys, "nope")
    assert code == 2 and "unknown data command 'nope'; choose one of counts | list | check | info" in err
    code, _, err = _run(capsys, "check", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no image files" in err
