"""Import direction: pipeline and models never import luigi; `medtl --help` stays light."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
        capture_output=True, text=True, check=True,
    )
    return set(out.stdout.split())


def test_pipeline_and_models_do_not_import_luigi() -> None:
    mods = _modules_after(
        "import pipeline.ingest.stage, pipeline.augment.stage, pipeline.train.loop, "
        "pipeline.evaluate.stage, pipeline.report.render, models"
    )
    assert "luigi" not in mods
    assert "tasks" not in mods


def test_cli_help_imports_neither_torch_nor_luigi() -> None:
    mods = _modules_after("import tasks.cli\ntasks.cli.build_parser().format_help()")
    assert "torch" not in mods and "luigi" not in mods


HEAVY = ("torch", "monai", "matplotlib", "timm")


def test_noop_night_imports_nothing_heavy(tmp_path) -> None:
    """A night whose record exists is decided from stat calls and the config hash: no torch, MONAI, etc."""
    import json
    import os
    from pathlib import Path

    from tests.conftest import make_dataset, write_config

    make_dataset(tmp_path, n_patients=12)
    config = write_config(tmp_path)
    # Tonight's record, as a finished night leaves it (its name is all the no-op decision looks at).
    code = (
        "import sys; from tasks.base import config_and_snapshot; from tasks.run import record_path, today; "
        f"cfg, snap = config_and_snapshot({str(config)!r}); print(record_path(cfg, snap, today()))"
    )
    repo = Path(__file__).resolve().parents[1]
    record = Path(subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                                 check=True).stdout.strip())
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"night": "tonight"}))
    (tmp_path / "ws" / "ops").mkdir()  # the lock's folder, there after any earlier night
    def files():  # (the lock file comes and goes in ops/, so folder mtimes change)
        return sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "ws").rglob("*") if p.is_file())

    before = files()
    res = subprocess.run(
        [sys.executable, "-c",
         "import sys; from tasks.cli import main; rc = main(['run', sys.argv[1]]); "
         "print('RC', rc); print('\\n'.join(sys.modules))", str(config)],
        cwd=repo, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    mods = set(res.stdout.split())
    assert "RC" in mods and "0" in res.stdout.split()[res.stdout.split().index("RC") + 1], res.stderr[-2000:]
    assert "Nothing to do" in res.stdout
    loaded = [m for m in HEAVY if m in mods]
    assert not loaded, f"a no-op night imported {loaded}"
    assert "models.registry" not in mods and "pipeline.ingest.stage" not in mods
    assert files() == before  # and it wrote nothing
