"""docs/method.md: the sections that code and docs cite by title exist, so a citation never dangles."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
METHOD = REPO_ROOT / "docs" / "method.md"
CITING = ("mixtail", "pipelines", "kernels", "trainer", "benchmarks", "configs", "docs", "tests")


def method_sections() -> set[str]:
    return {line[3:].strip() for line in METHOD.read_text().splitlines() if line.startswith("## ")}


def cited_sections(text: str) -> list[str]:
    """Titles quoted right after a mention of method.md: `docs/method.md, "Mixing"`, `method.md "A" and "B"`.
    The quotes are looked for up to the end of the parenthesis or sentence."""
    titles = []
    for m in re.finditer(r"method\.md", text):
        tail = re.split(r"[)]|\.\s|\n\s*\n", text[m.end(): m.end() + 200])[0]
        titles += re.findall(r"\"([^\"\n]+)\"", tail)
    return titles


def test_cited_sections_are_found_by_the_scan():
    text = 'see (docs/method.md, "Foreground sampling"\nand "Mixing"). Not "this".'
    assert cited_sections(text) == ["Foreground sampling", "Mixing"]


def test_every_cited_method_section_exists():
    sections = method_sections()
    dangling = []
    for folder in CITING:
        for path in sorted((REPO_ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".md", ".yaml") or path.name == "test_docs.py" or ".venv" in path.parts:
                continue
            for title in cited_sections(path.read_text(errors="replace")):
                if title not in sections:
                    dangling.append(f"{path.relative_to(REPO_ROOT)}: {title!r}")
    assert not dangling, f"docs/method.md has no such section ({sorted(sections)}): {dangling}"


def test_method_cites_the_paper_and_nothing_outside_the_repository():
    text = METHOD.read_text()
    assert "2211.11938" in text
    assert "SPEC" not in text and "../shared" not in text and not re.search(r"\bissue \d+", text)


def test_readme_is_a_front_door_and_every_relative_link_resolves():
    """README stays short (the measured tables live in docs/results.md) and no page links to a missing file."""
    readme = REPO_ROOT / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= 150
    missing = []
    for page in [readme, *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(REPO_ROOT)} -> {target}")
    assert missing == []


# A reader of the repository can open neither an issue tracker's number nor a file beside the checkout, so code,
# docs, configs and scripts state the reason instead of citing one.
UNOPENABLE = re.compile(r"\.\./shared|\bSPEC(\.md)?\b|\b(ENV|STYLE)\.md\b|\b(?i:issues?) #?\d+")
# The tests that check for these strings must name them.
CHECKS_FOR_THEM = {"tests/test_docs.py", "tests/test_config_reference.py"}


def test_no_file_cites_an_issue_number_or_a_file_outside_the_repository():
    hits = []
    for path in sorted(REPO_ROOT.rglob("*")):
        rel = path.relative_to(REPO_ROOT)
        if (path.suffix not in (".py", ".md", ".yaml", ".toml", ".sh") and rel.as_posix() != ".ci/run") \
                or not path.is_file() or rel.parts[0].startswith((".venv", ".git", "runs")) \
                or rel.as_posix() in CHECKS_FOR_THEM:
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if UNOPENABLE.search(line):
                hits.append(f"{rel}:{n}: {line.strip()[:100]}")
    assert hits == [], "\n".join(hits)
