"""What a conversion is asked to do (`ConvertOptions`, checked when made) and the choices of each option."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mixtail.errors import UsageError

FORMATS = ("imagefolder", "cifar", "filelist", "inat-json")


TARGETS = ("ffcv", "dali")


WRITE_MODES = ("raw", "jpg", "smart", "proportion")


SMART_THRESHOLD = 128 * 128 * 3  # bytes of pixels; the same as ffcv_io.DEFAULT_SMART_THRESHOLD (FFCV-free import)


# A stored JPEG may come this far below the PSNR that the target's own JPEG round trip gives the source pixels
# (`jpeg_round_trip`): room for another libjpeg version than the one that wrote it. Measured on 60 photos and
# 100 CIFAR-10 images at qualities 10..95, a JPEG keeps 18-47 dB, and a different image of the set scores 16-21.
JPEG_TOLERANCE_DB = 1.0


VERIFY_SAMPLE = 256


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    source: str
    to: str
    out: str
    format: str | None = None  # None: detect from SOURCE
    image_root: str = ""
    test_list: str = ""
    split: str = "both"
    imbalance_ratio: float | None = None
    lt_subset: str = "ldam"
    write_mode: str = "smart"
    max_resolution: int | None = None
    jpeg_quality: int = 90
    on_error: str = "stop"
    jobs: int = os.cpu_count() or 1
    overwrite: bool = False

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UsageError(msg)
        need(self.to in TARGETS, f"--to must be one of {' | '.join(TARGETS)}, got {self.to!r}")
        need(self.format is None or self.format in FORMATS, f"--format must be one of {' | '.join(FORMATS)}, "
             f"got {self.format!r}")
        need(self.split in ("train", "test", "both"), f"--split must be train, test or both, got {self.split!r}")
        need(self.imbalance_ratio is None or self.imbalance_ratio >= 1,
             f"--imbalance-ratio must be >= 1, got {self.imbalance_ratio}")
        need(self.write_mode in WRITE_MODES, f"--write-mode must be one of {' | '.join(WRITE_MODES)}, "
             f"got {self.write_mode!r}")
        need(self.to == "ffcv" or self.write_mode != "proportion",
             "--write-mode proportion is FFCV's (a random half as JPEG); for --to dali use raw, jpg or smart")
        need(self.max_resolution is None or 1 <= self.max_resolution <= 65535,
             f"--max-resolution must be in 1..65535, got {self.max_resolution}")
        need(1 <= self.jpeg_quality <= 100, f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        need(self.on_error in ("stop", "skip"), f"--on-error must be stop or skip, got {self.on_error!r}")
        need(self.jobs >= 1, f"--jobs must be at least 1, got {self.jobs}")

    def recorded(self) -> dict:
        """The options the manifest records (every one that changes what is written)."""
        return {"split": self.split, "imbalance_ratio": self.imbalance_ratio, "lt_subset": self.lt_subset,
                "write_mode": self.write_mode, "max_resolution": self.max_resolution,
                "jpeg_quality": self.jpeg_quality, "on_error": self.on_error,
                "smart_threshold": SMART_THRESHOLD if self.to == "ffcv" else None}  # dali's smart has none
