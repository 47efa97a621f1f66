"""The shape of the code: imports point one way, every package is documented, no file grows past 600 lines.

Layers, lowest first (a module may import its own package and any lower layer, never a higher one):
``models`` < the base modules (``pipeline.errors``, ``io``, ``config``, ``stats``, ``demo``) < ``ingest`` <
``augment`` < ``trained`` < ``train`` < ``evaluate`` < ``active`` < ``report`` < ``ops`` < ``workspace`` (and ``preflight``) < ``tasks``.
Lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ["models"],
    ["pipeline.errors", "pipeline.io", "pipeline.config", "pipeline.stats", "pipeline.demo", "pipeline.progress"],
    ["pipeline.ingest"],
    ["pipeline.augment"],
    ["pipeline.trained"],
    ["pipeline.train"],
    ["pipeline.evaluate"],
    ["pipeline.active"],
    ["pipeline.report"],
    ["pipeline.ops"],
    ["pipeline.workspace", "pipeline.preflight"],
    ["tasks"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_LINES = 600


def _unit(module: str) -> str:
    """The layer unit of a dotted module name: ``pipeline.<package>``, ``models`` or ``tasks``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "pipeline" and len(parts) > 1 else parts[0]


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return {m for m in out if m.split(".")[0] in ("pipeline", "models", "tasks")}


def _sources() -> list[Path]:
    return sorted(p for d in ("pipeline", "models", "tasks") for p in (ROOT / d).rglob("*.py"))


def test_every_unit_has_a_layer() -> None:
    units = {_unit(_module_of(p)) for p in _sources()} - {"pipeline"}
    missing = sorted(u for u in units if u not in RANK)
    assert not missing, f"add these to LAYERS (and to docs/architecture.md): {missing}"


def test_imports_point_one_way() -> None:
    bad = []
    for path in _sources():
        src = _unit(_module_of(path))
        if src == "pipeline":
            continue
        for mod in _imports(path):
            dst = _unit(mod)
            if dst != src and dst in RANK and RANK[dst] > RANK[src]:
                bad.append(f"{path.relative_to(ROOT)} imports {mod} ({src} is below {dst})")
    assert not bad, "\n".join(bad)


def test_train_loop_and_strategies_do_not_import_each_other() -> None:
    loop = _imports(ROOT / "pipeline/train/loop.py")
    strategies = _imports(ROOT / "pipeline/train/strategies.py")
    assert "pipeline.train.loop" not in strategies
    assert "pipeline.train.strategies" not in loop or "pipeline.train.loop" not in strategies


def test_report_computes_no_statistics() -> None:
    for path in (ROOT / "pipeline/report").rglob("*.py"):
        text = path.read_text()
        for mod in _imports(path):
            assert not mod.startswith(("pipeline.evaluate", "pipeline.stats", "pipeline.trained")), (path, mod)
        for lib in ("import torch", "from sklearn", "import sklearn", "scipy.stats", "scipy.optimize"):
            assert lib not in text, f"{path.relative_to(ROOT)}: {lib}"


def test_every_package_is_described_in_the_architecture_page() -> None:
    doc = (ROOT / "docs/architecture.md").read_text()
    for unit in RANK:
        if unit.startswith("pipeline."):
            name = unit.split(".", 1)[1]
            assert f"{name}/" in doc or f"{name}.py" in doc, f"docs/architecture.md does not describe {unit}"


@pytest.mark.parametrize("folder", ["pipeline", "models", "tasks", "bench", "tests"])
def test_no_source_file_over_600_lines(folder: str) -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / folder).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these along their jobs (max {MAX_LINES} lines): {long}"
