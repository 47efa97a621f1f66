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
