"""Configs the tests of mixing share."""

from __future__ import annotations

from mixtail.pipelines.config import MixConfig


def mixing_from_the_start(**overrides) -> MixConfig:
    """A MixConfig for tests that exercise mixing itself: every batch is mixed from epoch 0 unless a test says
    otherwise (the defaults mix half the batches, from epoch 4: tests/test_config.py pins them)."""
    return MixConfig(**{"mix_prob": 1.0, "start_epoch": 0, **overrides})
