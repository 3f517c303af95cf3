"""Tests of pipelines/sources/images.py: every pixel format against known pixel values, the file check on broken
files (generated CIFAR-like JPEGs cut short, zero-byte, text named .jpg, macOS `._` forks), its cache, the
bad-file report, and the squash and canvas decoders; with DALI installed, the same files through DALI's
CPU decoder (the other backend) agree.

    python -m pytest tests/test_images.py -q
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mixtail.errors import DataError
from mixtail.pipelines.sources import images
from mixtail.pipelines.sources.images import (
    BadImage, bad_files_message, canvas_shape, check_image, check_images, decode_images, decode_to_canvas, load_rgb)

from helpers.images import cifar_like_jpeg


# Check caches and bad-file listings go to each test's own folder, never to ~/.cache (conftest.py).
pytestmark = pytest.mark.usefixtures("private_cache")


def cifar_jpegs(n: int = 6) -> list[bytes]:
    """n generated 32×32 JPEGs (CIFAR's kind of file)."""
    return [cifar_like_jpeg(0, k) for k in range(n)]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png16_rgb(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (PIL cannot write one): IHDR bit depth 16, colour type 2."""
    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))


def white_composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Independent float reference: c·a + 255·(1 − a), a in [0, 1], rounded half up."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.floor(rgb.astype(np.float64) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Pixel formats against known values
# --------------------------------------------------------------------------------------------------


def test_16bit_grey_png_regions_and_every_value(tmp_path):
    regions = np.zeros((4, 9), np.uint16)
    regions[:, :3], regions[:, 3:6] = 65535, 32768
    Image.fromarray(regions).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")  # the format this test is about
    out = load_rgb(str(tmp_path / "g16.png"))
    assert out.shape == (4, 9, 3) and out.dtype == np.uint8
    assert (out[:, :3] == 255).all() and (out[:, 3:6] == 128).all() and (out[:, 6:] == 0).all()
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    out = load_rgb(str(tmp_path / "ramp.png"))
    expected = np.rint(ramp / 257.0).astype(np.uint8)  # round(v · 255 / 65535), as 65535 = 255 · 257
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 0], out[..., 2])


def test_16bit_rgb_png_high_byte(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    pixels[0, 0] = (65535, 32768, 0)
    write_png16_rgb(tmp_path / "rgb16.png", pixels)
    out = load_rgb(str(tmp_path / "rgb16.png")).astype(int)
    assert out[0, 0].tolist() == [255, 128, 0]
    # PIL keeps the high byte; DALI rounds: the two never differ by more than one level.
    assert np.abs(out - np.rint(pixels / 257.0)).max() <= 1
    assert np.array_equal(out, pixels >> 8)


def test_palette_with_and_without_transparency(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30]
    index = np.array([[0, 1, 2, 3]] * 3, np.uint8)
    p = Image.fromarray(index, "P")
    p.putpalette(palette + [0] * (768 - len(palette)))
    p.save(tmp_path / "p.png")
    p.save(tmp_path / "p_trns.png", transparency=1)  # colour index 1 is fully transparent
    colours = np.array(palette, np.uint8).reshape(4, 3)
    assert np.array_equal(load_rgb(str(tmp_path / "p.png")), colours[index])
    expected = colours[index].copy()
    expected[index == 1] = 255  # transparent → the white background
    assert np.array_equal(load_rgb(str(tmp_path / "p_trns.png")), expected)
    # Per-entry alpha (a tRNS table): entry 2 half transparent.
    p.save(tmp_path / "p_alpha.png", transparency=bytes([255, 0, 128, 255]))
    alpha = np.array([255, 0, 128, 255], np.uint8)[index]
    assert np.array_equal(load_rgb(str(tmp_path / "p_alpha.png")), white_composite(colours[index], alpha))


def test_rgba_and_la_composite_on_white(tmp_path):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (6, 5, 4)).astype(np.uint8)
    rgba[0, :, 3], rgba[1, :, 3] = 255, 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = load_rgb(str(tmp_path / "rgba.png"))
    assert np.array_equal(out[0], rgba[0, :, :3]) and (out[1] == 255).all()
    assert np.array_equal(out, white_composite(rgba[..., :3], rgba[..., 3]))
    la = rng.integers(0, 256, (4, 4, 2)).astype(np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    grey = np.repeat(la[..., :1], 3, axis=2)
    assert np.array_equal(load_rgb(str(tmp_path / "la.png")), white_composite(grey, la[..., 1]))


def test_grey_and_one_bit(tmp_path):
    rng = np.random.default_rng(2)
    grey = rng.integers(0, 256, (5, 6)).astype(np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    assert np.array_equal(load_rgb(str(tmp_path / "l.png")), np.repeat(grey[..., None], 3, axis=2))
    bits = rng.integers(0, 2, (7, 9)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "bit.png")
    assert Image.open(tmp_path / "bit.png").mode == "1"
    assert np.array_equal(load_rgb(str(tmp_path / "bit.png")), np.repeat(bits[..., None] * 255, 3, 2).astype(np.uint8))


def test_cmyk_jpeg(tmp_path):
    cmyk = np.zeros((16, 32, 4), np.uint8)
    cmyk[:, :8, 0] = 255  # cyan
    cmyk[:, 8:16, 3] = 255  # black
    cmyk[:, 16:24, 1] = 128  # half magenta
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=95)  # the last 8 columns stay white
    out = load_rgb(str(tmp_path / "cmyk.jpg")).astype(int)
    centre = out[4:12]  # away from JPEG ringing at the edges between blocks
    for cols, rgb in ((slice(2, 6), (0, 255, 255)), (slice(10, 14), (0, 0, 0)), (slice(18, 22), (255, 127, 255)),
                      (slice(26, 30), (255, 255, 255))):
        assert np.abs(centre[:, cols] - np.array(rgb)).max() <= 3, rgb


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_and_sized(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    pixels = rng.integers(0, 256, (6, 10, 3)).astype(np.uint8)
    im = Image.fromarray(pixels)
    exif = im.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"  # lossless, so the reference comparison is exact
    im.save(path, exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    out = load_rgb(str(path))
    assert np.array_equal(out, expected)
    assert check_image(str(path)) == expected.shape[:2] == ((10, 6) if orientation >= 5 else (6, 10))


def test_unsupported_modes_are_refused_naming_file_and_mode(tmp_path):
    Image.fromarray(np.zeros((3, 3), np.float32)).save(tmp_path / "float.tiff")
    Image.fromarray(np.full((3, 3), 70000, np.int32)).save(tmp_path / "int32.tiff")
    for name, mode in (("float.tiff", "F"), ("int32.tiff", "I")):
        path = str(tmp_path / name)
        with pytest.raises(DataError, match=f"{name}.*pixel mode {mode} is not supported"):
            load_rgb(path)
        with pytest.raises(BadImage, match=f"pixel mode {mode}"):
            check_image(path)


# --------------------------------------------------------------------------------------------------
# The file check
# --------------------------------------------------------------------------------------------------


def broken_files(folder: Path) -> dict[str, str]:
    """Broken files built from a good JPEG, each with the phrase its reason must contain."""
    jpeg = cifar_jpegs(1)[0]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "no_eoi.jpg").write_bytes(jpeg[:-2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is a note, not a photo\n")
    (folder / "._fork.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(200))
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(png, "PNG")
    (folder / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (folder / "folder.jpg").mkdir()
    return {"truncated.jpg": "truncated", "no_eoi.jpg": "end-of-image marker FF D9", "zero.jpg": "zero-byte",
            "text.jpg": "not an image file (it is text)", "._fork.jpg": "AppleDouble",
            "truncated.png": "IEND", "missing.jpg": "does not exist", "folder.jpg": "directory"}


def test_check_image_reasons(tmp_path):
    for name, phrase in broken_files(tmp_path).items():
        with pytest.raises(BadImage, match=None) as err:
            check_image(str(tmp_path / name))
        assert phrase in str(err.value), (name, str(err.value))


def test_a_file_that_is_not_an_image_is_described_never_quoted(tmp_path):
    """A non-image named x.jpg that was really /etc/passwd was refused with its first bytes in the message: the
    file is named and described (text, a zip archive, binary data), its bytes never appear."""
    passwd = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
    files = {"passwd.jpg": (passwd.encode(), "it is text"),
             "notes.jpg": ("Grüße, café ☕ ".encode() * 60, "it is text"),  # 900 bytes: a character cut at 512
             "archive.jpg": (b"PK\x03\x04root:x:0:0" + bytes(40), "a zip archive"),
             "blob.jpg": (b"\x01\x02root:x:0:0\xff\xfe" + bytes(range(256)), "binary data")}
    for name, (data, kind) in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadImage) as err:
            check_image(str(tmp_path / name))
        assert str(err.value) == f"not an image file ({kind})" or kind in str(err.value), str(err.value)
        assert "root" not in str(err.value) and "Gr" not in str(err.value), str(err.value)
    with pytest.raises(DataError) as err:
        load_rgb(str(tmp_path / "passwd.jpg"))
    assert str(tmp_path / "passwd.jpg") in str(err.value) and "root:" not in str(err.value).replace(str(tmp_path), "")


def test_good_files_pass_with_their_sizes(tmp_path):
    jpegs = cifar_jpegs(4)
    for i, data in enumerate(jpegs):
        (tmp_path / f"{i}.jpg").write_bytes(data)
    # Bytes appended after the end-of-image marker do not make a JPEG bad (the full decode decides).
    (tmp_path / "trailing.jpg").write_bytes(jpegs[0] + b"\x00" * 100 + b"trailer")
    files = [str(tmp_path / f"{i}.jpg") for i in range(4)] + [str(tmp_path / "trailing.jpg")]
    for level in ("header", "decode"):
        result = check_images(files, level=level)
        assert result.bad == () and result.sizes.dtype == np.int32
        assert result.sizes.tolist() == [[32, 32]] * 5


def test_check_images_on_photos_reports_true_sizes(photos_dir):
    """Photo-like JPEGs of every size, encoding and an EXIF rotation (whose true size is the rotated one)."""
    files = sorted(str(p) for p in photos_dir.iterdir())
    result = check_images(files)
    assert result.bad == ()
    expected = [ImageOps.exif_transpose(Image.open(f)).size[::-1] for f in files]
    assert [tuple(s) for s in result.sizes.tolist()] == expected
    assert len({tuple(s) for s in expected}) > 5  # the photos really vary in size
    assert any(Image.open(f).size[::-1] != s for f, s in zip(files, expected))  # and one is EXIF-rotated


def test_decode_level_catches_corrupt_data_in_a_complete_file(tmp_path):
    """A PNG whose compressed pixels are damaged but whose IEND chunk is intact passes the header level."""
    pixels = np.random.default_rng(3).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    idat = data.index(b"IDAT")
    data[idat + 100: idat + 140] = bytes(40)
    (tmp_path / "bad.png").write_bytes(bytes(data))
    assert check_image(str(tmp_path / "bad.png"), "header") == (64, 64)
    with pytest.raises(BadImage, match="cannot be decoded|truncated"):
        check_image(str(tmp_path / "bad.png"), "decode")


def test_check_images_collects_every_bad_file_in_order(tmp_path):
    reasons = broken_files(tmp_path)
    good = tmp_path / "good.jpg"
    good.write_bytes(cifar_jpegs(1)[0])
    names = sorted(reasons) + ["good.jpg"]
    result = check_images([str(tmp_path / n) for n in names], threads=3)
    assert [names[i] for i, _ in result.bad] == sorted(reasons)
    assert all(reasons[names[i]] in r for i, r in result.bad)
    assert result.sizes[-1].tolist() == [32, 32] and (result.sizes[:-1] == 0).all()


def test_check_cache_reuses_unchanged_files_only(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "CACHE_MIN_FILES", 1)
    jpegs = cifar_jpegs(3)
    files = []
    for i, data in enumerate(jpegs):
        (tmp_path / f"{i}.jpg").write_bytes(data)
        files.append(str(tmp_path / f"{i}.jpg"))
    (tmp_path / "bad.jpg").write_bytes(jpegs[0][:300])
    files.append(str(tmp_path / "bad.jpg"))
    first = check_images(files)
    assert first.cached == 0 and [i for i, _ in first.bad] == [3]
    cached = list((tmp_path / "cache" / "image_checks").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npz"
    again = check_images(files)
    assert again.cached == 4 and again.bad == first.bad and np.array_equal(again.sizes, first.sizes)
    # Repairing the bad file changes its size and mtime: it alone is checked again.
    (tmp_path / "bad.jpg").write_bytes(jpegs[1])
    repaired = check_images(files)
    assert repaired.cached == 3 and repaired.bad == ()
    # A header-level result does not answer a decode-level check.
    assert check_images(files, level="decode").cached == 0
    assert check_images(files, level="header").cached == 4  # a decode result answers a header check


def test_bad_files_message_short_and_long(tmp_path):
    short = bad_files_message(["/d/a.jpg: zero-byte file", "/d/b.jpg: truncated"], 10, "train images", "bad")
    assert short == "2 of 10 train images: bad: /d/a.jpg: zero-byte file; /d/b.jpg: truncated" and "\n" not in short
    lines = [f"/d/{i:03d}.jpg: zero-byte file" for i in range(25)]
    msg = bad_files_message(lines, 100, "train images", "bad")
    assert "\n" not in msg and "/d/009.jpg" in msg and "/d/010.jpg" not in msg and "and 15 more" in msg
    listing = Path(msg.rsplit("listed in ", 1)[1])
    assert listing.is_file() and listing.read_text().splitlines() == lines
    assert str(tmp_path / "cache") in str(listing)


# --------------------------------------------------------------------------------------------------
# Decoders
# --------------------------------------------------------------------------------------------------


def test_decode_images_uses_the_conversions(tmp_path):
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    rgba = np.dstack([np.full((8, 8, 3), 40, np.uint8), np.zeros((8, 8), np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    out = decode_images([str(tmp_path / "g16.png"), str(tmp_path / "clear.png")], 8)
    assert np.array_equal(out[0, ..., 1], np.rint(ramp / 257.0).astype(np.uint8))  # not all white
    assert (out[1] == 255).all()
    (tmp_path / "bad.jpg").write_bytes(b"")
    (tmp_path / "bad2.jpg").write_text("text")
    with pytest.raises(DataError, match=r"2 of 3 images to decode.*bad.jpg: zero-byte.*bad2.jpg: not an image"):
        decode_images([str(tmp_path / "g16.png"), str(tmp_path / "bad.jpg"), str(tmp_path / "bad2.jpg")], 8)


@pytest.mark.parametrize("hw,short,max_side,expected", [
    ((375, 500), 256, 320, (240, 320)),  # landscape 4:3: 256 × 341 would pass 320, so the long side is 320
    ((500, 375), 256, 400, (341, 256)),  # portrait, fits: short side 256
    ((68, 100), 224, 256, (174, 256)),  # small: upscaled, then limited by max_side
    ((20, 20), 32, 32, (32, 32)),  # square, upscaled
    ((32, 32), 32, 32, (32, 32)),  # already the canvas (CIFAR): unchanged
    ((2400, 100), 224, 224, (224, 9)),  # extreme aspect: long side max_side, short side rounded
    ((1, 5000), 8, 16, (1, 16)),  # never below one pixel
])
def test_canvas_shape(hw, short, max_side, expected):
    assert canvas_shape(*hw, short, max_side) == expected
    h, w = canvas_shape(*hw, short, max_side)
    assert max(h, w) <= max_side and (min(h, w) == short or max(h, w) == max_side)


def test_canvas_shape_rejects_bad_sides():
    with pytest.raises(ValueError, match="short_side <= max_side"):
        canvas_shape(10, 10, 64, 32)


def test_decode_to_canvas_on_photos(photos_dir):
    files = sorted(str(p) for p in photos_dir.iterdir())[:6]
    pixels, sizes = decode_to_canvas(files, short_side=64, max_side=80)
    assert pixels.shape == (6, 80, 80, 3) and pixels.dtype == np.uint8 and sizes.dtype == np.int32
    for i, f in enumerate(files):
        original = load_rgb(f)
        h, w = sizes[i].tolist()
        assert (h, w) == canvas_shape(*original.shape[:2], 64, 80)
        # The aspect ratio is kept (to rounding), never squashed.
        assert abs(h / w - original.shape[0] / original.shape[1]) < 1.5 / min(h, w)
        assert (pixels[i, h:] == 0).all() and (pixels[i, :, w:] == 0).all()
        # Content: an independent antialiased bilinear resize (torch) agrees to within interpolation.
        ref = torch.nn.functional.interpolate(torch.tensor(original).permute(2, 0, 1)[None].float(),
                                              size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        diff = np.abs(pixels[i, :h, :w].astype(np.float64) - ref[0].permute(1, 2, 0).numpy())
        assert diff.mean() < 2.0 and np.percentile(diff, 99) < 16, (f, diff.mean())


def test_decode_to_canvas_upscales_small_images(tmp_path):
    Image.fromarray(np.full((10, 20, 3), 99, np.uint8)).save(tmp_path / "small.png")
    pixels, sizes = decode_to_canvas([str(tmp_path / "small.png")], short_side=16, max_side=40)
    assert sizes.tolist() == [[16, 32]] and (pixels[0, :16, :32] == 99).all() and (pixels[0, 16:] == 0).all()


# --------------------------------------------------------------------------------------------------
# The other backend: DALI's CPU decoder on the same files
# --------------------------------------------------------------------------------------------------


def dali_decode(files: list[str]) -> list[np.ndarray]:
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed (pip install 'mixtail[dali]')")
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(files), num_threads=1, device_id=None)
    def pipe():
        encoded, _ = fn.readers.file(files=files, labels=list(range(len(files))))
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.asarray(out.at(i)) for i in range(len(files))]


@pytest.mark.dali
def test_dali_cpu_decoder_agrees(tmp_path):
    """16-bit grey, palette, grey, 1-bit, CMYK and EXIF-rotated files decode as DALI decodes them; with alpha,
    DALI drops the channel, so only opaque pixels agree (the module docstring's choice)."""
    rng = np.random.default_rng(4)
    Image.fromarray(np.arange(65536, dtype=np.uint16).reshape(256, 256)).save(tmp_path / "ramp16.png")
    p = Image.fromarray(rng.integers(0, 4, (6, 6)).astype(np.uint8), "P")
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756)
    p.save(tmp_path / "p.png")
    Image.fromarray(rng.integers(0, 256, (9, 7)).astype(np.uint8), "L").save(tmp_path / "l.png")
    Image.fromarray(rng.integers(0, 2, (5, 8)).astype(bool)).save(tmp_path / "bit.png")
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[:, :8, 0] = 255
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg")
    im = Image.fromarray(rng.integers(0, 256, (16, 24, 3)).astype(np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "exif6.jpg", exif=exif)
    rgba = rng.integers(0, 256, (4, 4, 4)).astype(np.uint8)
    rgba[:2, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    names = ["ramp16.png", "p.png", "l.png", "bit.png", "cmyk.jpg", "exif6.jpg", "rgba.png"]
    files = [str(tmp_path / n) for n in names]
    theirs = dali_decode(files)
    for name, f, other in zip(names, files, theirs):
        ours = load_rgb(f)
        assert ours.shape == other.shape, name
        if name == "rgba.png":
            assert np.array_equal(ours[:2], other[:2])
        else:
            assert np.array_equal(ours, other), name
