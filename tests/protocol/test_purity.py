"""protocol/ is a pure core: no module imports I/O, clocks or threads (STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

from protocol import rangeset

FORBIDDEN = {"socket", "asyncio", "time", "select", "selectors", "threading", "subprocess"}
#: The one exception, by name: codec.py keeps its zstd contexts in a threading.local so
#: shells may call it from worker threads; it starts no thread and waits on nothing.
ALLOWED = {"codec.py": {"threading"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_protocol_module_imports_io_clocks_or_threads() -> None:
    root = Path(rangeset.__file__).parent
    modules = sorted(root.rglob("*.py"))
    assert len(modules) >= 10
    for path in modules:
        bad = _imports(path) & FORBIDDEN - ALLOWED.get(path.name, set())
        assert not bad, f"{path.relative_to(root.parent)} imports {sorted(bad)}"


def test_the_checker_sees_an_import(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("import os\nfrom time import monotonic\nimport asyncio.events\n")
    assert _imports(sample) & FORBIDDEN == {"time", "asyncio"}
