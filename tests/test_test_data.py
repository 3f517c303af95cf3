"""The test suite's own data: only tests/helpers/real_data.py names the real data directory outside the
repository, and only the tests marked `data` (facts of a real dataset) reach it; every other test makes its
data, so a fresh clone anywhere runs it.

    python -m pytest tests/test_test_data.py -q
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REAL_DATA_NAMES = {"require", "REAL_LISTS", "CIFAR10_JPEG_TAR", "CIFAR100_META", "SHARED_DATA", "cifar100_meta",
                   "cifar10_jpeg_root"}


def test_only_real_data_py_names_the_shared_data_directory():
    """A path built to `shared/data` beside the repository anywhere else would skip on a fresh clone."""
    pattern = re.compile(r"""["']shared["']|shared/data""")
    found = [f"{path.relative_to(TESTS)}:{n}" for path in sorted(TESTS.rglob("*.py"))
             if path.name not in ("real_data.py", Path(__file__).name)
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, f"paths to the shared data outside tests/helpers/real_data.py: {found}"


def test_tests_that_reach_real_data_are_marked_data():
    """A test function that reads the real data (by a fixture or a helper of real_data.py) carries the `data`
    mark, on itself or on its module, so `-m "not data"` runs exactly what a fresh clone can."""
    unmarked = []
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marked = any(isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark"
                                                                  for t in node.targets)
                            and "data" in ast.unparse(node.value).split(".") for node in tree.body)
        helpers = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                   and not node.name.startswith("test_")
                   and REAL_DATA_NAMES & {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}}
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {a.arg for a in node.args.args}
            if not (REAL_DATA_NAMES | helpers) & used:
                continue
            marks = {ast.unparse(d) for d in node.decorator_list}
            if not module_marked and "pytest.mark.data" not in marks:
                unmarked.append(f"{path.name}::{node.name}")
    assert not unmarked, f"tests that read the real data without the data mark: {unmarked}"
