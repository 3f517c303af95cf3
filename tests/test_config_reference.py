"""trainer/config_reference.py: docs/config.md is generated from the config dataclasses and kept current;
every key is documented; the table's types, defaults and allowed values come from the code."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mixtail import cli
from mixtail.trainer.config import RunConfig
from mixtail.trainer.config_reference import COMMAND, UndocumentedKeys, config_reference, field_docs, key_rows

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_docs_config_md_is_current():
    """Fails when a config field, its comment, its default or its checks changed without regenerating."""
    path = REPO_ROOT / "docs" / "config.md"
    assert path.is_file(), f"docs/config.md is missing: run `{COMMAND}`"
    assert path.read_text() == config_reference(), f"docs/config.md is out of date: run `{COMMAND}`"


def test_every_key_of_the_run_config_is_in_the_reference():
    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(value):
                yield from keys(type(value), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    assert [row["key"] for row in key_rows()] == list(keys(RunConfig))


@dataclass(frozen=True, kw_only=True)
class _Section:
    # Above the field,
    # over two lines.
    documented: int = 1  # and at its end.
    trailing_only: Literal["a", "b"] = "a"  # just here

    plain: float = 0.5
    # A blank line parts this comment from the next field, so it documents neither.

    after: tuple[int, ...] = (1, 2)  # after


@dataclass(frozen=True, kw_only=True)
class _Root:
    sec: _Section = field(default_factory=_Section)


def test_field_docs_read_the_comment_above_and_at_the_end_of_the_line():
    docs = field_docs(_Section)
    assert docs["documented"] == "Above the field, over two lines. and at its end."
    assert docs["trailing_only"] == "just here"
    assert "plain" not in docs
    assert docs["after"] == "after"


def test_an_undocumented_key_fails_naming_it():
    with pytest.raises(UndocumentedKeys, match=r"without documentation: sec\.plain;.*" + re.escape(COMMAND)):
        key_rows(_Root)


def test_rows_carry_type_default_allowed_and_meaning_from_the_code():
    rows = {row["key"]: row for row in key_rows()}
    assert rows["optim.milestones"]["type"] == "list of int"
    assert rows["optim.milestones"]["default"] == "[160, 180]"
    assert rows["data.mean"]["type"] == "[float, float, float] or null"
    assert rows["data.mean"]["default"] == "null"
    assert rows["model.arch"]["default"] == '"resnet32"'
    assert rows["loss.weighting"]["allowed"] == "`weighted`, `average`, `assign_larger`"
    assert rows["train.compile"]["allowed"].startswith("`true`, `false`")
    # Ranges come from the need(...) checks that validate the key, including ones written in a loop.
    assert "must be positive" in rows["data.batch_size"]["allowed"]
    assert "must be positive" in rows["router.top_k"]["allowed"]
    assert "must be in (0, 1)" in rows["router.threshold"]["allowed"]
    assert rows["loss.eta"]["meaning"].startswith("η of L = L_CE + η·L_SMC")


def test_the_reference_cites_only_what_a_reader_of_the_repository_can_open():
    text = config_reference()
    assert not re.search(r"\bissue \d+", text)
    assert "SPEC" not in text and "../shared" not in text


def test_cli_writes_the_reference_and_prints_a_resolved_config(capsys, tmp_path):
    out = tmp_path / "config.md"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["config", "--reference", "--out", str(out)])
    assert exit_info.value.code == 0
    assert out.read_text() == config_reference()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["config", "demo", "--optim.lr=0.3"])
    assert exit_info.value.code == 0
    assert "lr: 0.3" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["config", "--reference", "demo"])
    assert exit_info.value.code == 2
    assert "takes no CONFIG" in capsys.readouterr().err


@dataclass(frozen=True, kw_only=True)
class _Box:
    side: int = 3  # a nested key
    documented_in_metadata: float = field(default=0.5, metadata={"doc": "from the field's metadata"})


@dataclass(frozen=True, kw_only=True)
class _Nested:
    box: _Box = field(default_factory=_Box)  # a sub-section: its keys are listed, not it
    plain: bool = True  # plain


@dataclass(frozen=True, kw_only=True)
class _NestedRoot:
    sec: _Nested = field(default_factory=_Nested)


def test_nested_sections_and_metadata_docs():
    rows = {row["key"]: row for row in key_rows(_NestedRoot)}
    assert list(rows) == ["sec.box.side", "sec.box.documented_in_metadata", "sec.plain"]
    assert rows["sec.box.side"]["meaning"] == "a nested key"
    assert rows["sec.box.documented_in_metadata"]["meaning"] == "from the field's metadata"


def test_comment_text_shows_as_written_in_markdown():
    from mixtail.trainer.config_reference import _markdown

    assert _markdown("timm/<name>, 0 <= x, a|b, cifar*, `<kept> | *`") == \
        "timm/&lt;name>, 0 <= x, a\\|b, cifar\\*, `<kept> \\| *`"
