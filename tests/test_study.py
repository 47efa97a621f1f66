"""The optional scarce-label study and the comparison with an earlier model, through the Luigi chain."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.evaluate.bootstrap import Bootstrap
from pipeline.evaluate.metrics import auroc_with_ci
from pipeline.evaluate.stage import study_config, study_dir, study_reuses_main_model, summarise_study
from pipeline.workspace import plan_stages
from tasks.cli import run_pipeline
from tasks.evaluate import Evaluate
from tasks.finetune import FineTune
from tasks.study import StudyMember

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # about 60 s: trains 4 tiny models

FRACTIONS = [0.5, 1.0]
STRATEGIES = ["finetune", "scratch"]  # linear_probe etc. pass through the same code path


@pytest.fixture(scope="module")
def study_run(tmp_path_factory) -> Path:
    from tests.conftest import make_dataset, write_config

    root = tmp_path_factory.mktemp("study")
    make_dataset(root, n_patients=72)
    config = write_config(
        root,
        evaluate={
            "n_bootstrap": 200,
            "min_subgroup": 5,
            "explain_cases": 2,
            "study_label_fractions": FRACTIONS,
            "study_strategies": STRATEGIES,
        },
    )
    assert run_pipeline(config) == 0
    return config


def test_study_is_off_by_default_and_wired_when_on(study_run: Path, tmp_path: Path) -> None:
    from tests.conftest import write_config

    off = write_config(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels.csv").write_text("file,diagnosis\n")
    assert isinstance(Evaluate(config=str(off)).requires(), FineTune)
    req = Evaluate(config=str(study_run)).requires()
    members = [t for t in req if isinstance(t, StudyMember)]
    assert len(members) == len(FRACTIONS) * len(STRATEGIES)
    assert {(m.label_fraction, m.strategy) for m in members} == {
        (f, s) for f in FRACTIONS for s in STRATEGIES
    }


def test_study_configs_and_folders(study_run: Path) -> None:
    cfg = load_config(study_run)
    plan = plan_stages(cfg)
    scratch = study_config(cfg, 0.5, "scratch")
    assert scratch.model.pretrained is False and scratch.train.strategy == "finetune"
    assert scratch.train.label_fraction == 0.5
    assert study_config(cfg, 1.0, "linear_probe").train.strategy == "linear_probe"
    assert study_config(cfg, 1.0, "linear_probe").model.pretrained is True
    # Only the member identical to the run's own model reuses it; every other has its own digest folder.
    reused = [(f, s) for f in FRACTIONS for s in STRATEGIES if study_reuses_main_model(cfg, plan, f, s)]
    assert reused == [(1.0, "finetune")]
    dirs = {study_dir(cfg, plan, f, s) for f in FRACTIONS for s in STRATEGIES}
    assert len(dirs) == 4 and all(d.parent == plan.workspace / "study" and d.is_dir() for d in dirs)
    trained = [d for d in dirs if (d / "model.pt").is_file()]
    assert len(trained) == 3  # the reused member has no copy of the model
    for d in dirs:
        res = json.loads((d / "study_result.json").read_text())
        auc = res["test_auroc"]
        assert auc["ci"][0] <= auc["value"] <= auc["ci"][1]
        assert (d / "predictions.csv").read_text().count("\n") == 1 + len(_test_rows(plan))


def _test_rows(plan) -> list[str]:
    return [ln for ln in (plan.evaluate / "predictions.csv").read_text().splitlines()[1:] if ",test," in ln]


def test_study_in_metrics_and_report(study_run: Path) -> None:
    plan = plan_stages(load_config(study_run))
    metrics = json.loads((plan.evaluate / "metrics.json").read_text())
    st = metrics["study"]
    assert len(st["runs"]) == 4 and all("error" not in r for r in st["runs"])
    assert [t["label_fraction"] for t in st["transfer"]] == FRACTIONS
    for t in st["transfer"]:
        assert t["negative_transfer"] == (t["auroc_pretrained"] <= t["auroc_scratch"])
        assert t["delong"]["difference"] == pytest.approx(t["difference"], abs=1e-4)
    main = next(r for r in st["runs"] if r["reused_main_model"])
    own = metrics["evaluation"]["test"]["uncalibrated"]["discrimination"]["auroc"]["value"]
    assert main["test_auroc"]["value"] == pytest.approx(own, abs=1e-6)
    html = (plan.evaluate / "report.html").read_text()
    assert "id='fig-label_efficiency'" in html and "id='fig-gradcam'" in html
    assert "private" not in json.dumps(st)  # no absolute workspace paths leak into metrics


def test_negative_transfer_is_flagged_when_scratch_wins() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400).astype(bool)
    from pipeline.config import Config

    c = Config.model_validate(
        {
            "task": {"kind": "binary", "classes": {"0": "a", "1": "b"}, "positive_class": "b"},
            "data": {"source": ".", "labels_csv": "x.csv"},
            "evaluate": {"study_label_fractions": [0.1, 1.0], "study_strategies": ["finetune", "scratch"]},
        }
    )
    runs = []
    for strat, frac, s in (
        ("finetune", 0.1, 0.2),
        ("scratch", 0.1, 1.5),
        ("finetune", 1.0, 2.0),
        ("scratch", 1.0, 0.5),
    ):
        score = s * y + rng.normal(size=len(y))
        runs.append(
            {
                "strategy": strat,
                "label_fraction": frac,
                "test_auroc": auroc_with_ci(score, y, Bootstrap(len(y), 200, seed=1)),
            }
        )
    st = summarise_study(runs, c)
    assert st["negative_transfer_at"] == [0.1]
    assert [t["best_pretrained"] for t in st["transfer"]] == ["finetune", "finetune"]


def test_compare_with_an_earlier_finetune_folder(study_run: Path) -> None:
    """The same run compared with the scratch model's FineTune-style folder: only Evaluate reruns."""
    from tests.conftest import write_config

    cfg = load_config(study_run)
    first = plan_stages(cfg)
    scratch_study = study_dir(cfg, first, 1.0, "scratch")
    scratch = (
        study_run.parent / "old-finetune"
    )  # a FineTune folder: model.pt + model_info.json, no predictions
    scratch.mkdir(exist_ok=True)
    for name in ("model.pt", "model_info.json"):
        shutil.copy(scratch_study / name, scratch / name)
    second = write_config(
        study_run.parent,
        evaluate={
            "n_bootstrap": 200,
            "min_subgroup": 5,
            "explain_cases": 0,
            "compare_with": str(scratch),
            "study_label_fractions": FRACTIONS,
            "study_strategies": STRATEGIES,
        },
    )
    assert run_pipeline(second) == 0
    plan = plan_stages(load_config(second))
    assert plan.finetune == first.finetune and plan.evaluate != first.evaluate
    metrics = json.loads((plan.evaluate / "metrics.json").read_text())
    c = metrics["comparison"]
    n_test = metrics["splits"]["test"]["cases"]
    assert c["previous_kind"] == "finetune" and c["previous"] == scratch.name
    assert c["n_matched"] == n_test and c["n_label_mismatch"] == 0
    own = metrics["evaluation"]["test"]["uncalibrated"]["discrimination"]["auroc"]["value"]
    assert c["auroc_current"]["value"] == pytest.approx(own, abs=1e-9)
    scratch_auc = json.loads((scratch_study / "study_result.json").read_text())["test_auroc"]["value"]
    assert c["auroc_previous"]["value"] == pytest.approx(scratch_auc, abs=1e-6)
    assert c["delong"]["difference"] == pytest.approx(own - scratch_auc, abs=1e-6)
    lo, hi = c["paired_bootstrap"]["ci"]
    assert lo <= c["paired_bootstrap"]["value"] <= hi
    assert metrics["run"]["config"]["evaluate"]["compare_with"] == scratch.name  # no absolute path
    assert "Comparison with the previous model" in (plan.evaluate / "report.html").read_text()
