"""The optional scarce-label study and the comparison with an earlier model, through the Luigi chain."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.evaluate.study import study_config, study_dir, study_reuses_main_model, summarise_study
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
        auc = res["val_auroc"]
        assert res["selection_split"] == "val" and "test_auroc" not in res  # members never touch test
        assert auc["ci"][0] <= auc["value"] <= auc["ci"][1]
        assert (d / "val_predictions.csv").read_text().count("\n") == 1 + len(_rows(plan, "val"))
        assert not (d / "predictions.csv").exists()


def _rows(plan, split: str) -> list[str]:
    return [
        ln for ln in (plan.evaluate / "predictions.csv").read_text().splitlines()[1:] if f",{split}," in ln
    ]


def test_study_in_metrics_and_report(study_run: Path) -> None:
    plan = plan_stages(load_config(study_run))
    metrics = json.loads((plan.evaluate / "metrics.json").read_text())
    st = metrics["study"]
    assert len(st["runs"]) == 4 and all("error" not in r for r in st["runs"])
    assert [t["label_fraction"] for t in st["transfer"]] == FRACTIONS
    for t in st["transfer"]:
        assert t["selected_on"] == "val" and t["best_pretrained"] == "finetune"
        lo, hi = t["difference_ci"]
        expected = (
            "pretrained better" if lo > 0 else "pretrained worse (negative transfer)" if hi < 0 else None
        )
        assert t["verdict"] == (expected or "no evidence of a difference")
        assert t["negative_transfer"] == (hi < 0)
        assert t["comparison"]["delong"]["difference"] == pytest.approx(t["difference"], abs=1e-9)
        assert t["difference"] == pytest.approx(
            t["auroc_pretrained"]["value"] - t["auroc_scratch"]["value"], abs=1e-9
        )
    main = next(r for r in st["runs"] if r["reused_main_model"])
    own = metrics["evaluation"]["test"]["uncalibrated"]["discrimination"]["auroc"]["value"]
    assert main["test_auroc"]["value"] == pytest.approx(own, abs=1e-6)
    html = (plan.evaluate / "report.html").read_text()
    assert "id='fig-label_efficiency'" in html and "id='fig-gradcam'" in html
    assert "private" not in json.dumps(st)  # no absolute workspace paths leak into metrics


def _study_cfg():
    from pipeline.config import Config

    return Config.model_validate(
        {
            "task": {"kind": "binary", "classes": {"0": "a", "1": "b"}, "positive_class": "b"},
            "data": {"source": ".", "labels_csv": "x.csv"},
            "evaluate": {
                "n_bootstrap": 300,
                "study_label_fractions": [0.1, 1.0],
                "study_strategies": ["linear_probe", "finetune", "scratch"],
            },
        }
    )


def _test_preds(y: np.ndarray, strength: float, seed: int, patients: np.ndarray):
    from pipeline.evaluate.summary import SplitPredictions

    rng = np.random.default_rng(seed)
    score = strength * y + rng.normal(size=len(y))
    return SplitPredictions(
        logits=np.stack([np.zeros(len(y)), score], 1),
        y=y,
        patient=patients,
        case=np.array([f"c{i}" for i in range(len(y))]),
    )


def test_selection_uses_validation_and_verdicts_follow_the_paired_ci() -> None:
    """The pretrained strategy is chosen by validation AUROC even when another would score higher on
    test; negative transfer needs the paired CI below zero; a tiny difference gives no verdict."""
    cfg = _study_cfg()
    y = np.random.default_rng(0).integers(0, 2, 400)
    pats = np.array([f"p{i}" for i in range(400)])

    def run(strategy, frac, val):
        return {
            "strategy": strategy,
            "label_fraction": frac,
            "val_auroc": {"value": val, "ci": [val - 0.1, val + 0.1]},
        }

    runs = [
        run("linear_probe", 0.1, 0.70),
        run("finetune", 0.1, 0.80),
        run("scratch", 0.1, 0.75),
        run("linear_probe", 1.0, 0.90),
        run("finetune", 1.0, 0.85),
        run("scratch", 1.0, 0.80),
    ]
    # 0.1: finetune (best on val) is much worse than scratch on test -> negative transfer
    # 1.0: linear_probe (best on val) equals scratch on test -> no evidence of a difference
    tested = {
        ("finetune", 0.1): _test_preds(y, 0.3, 1, pats),
        ("scratch", 0.1): _test_preds(y, 2.0, 2, pats),
        ("linear_probe", 1.0): _test_preds(y, 1.5, 3, pats),
        ("scratch", 1.0): _test_preds(y, 1.5, 3, pats),
    }
    st = summarise_study(runs, cfg, tested)
    t01, t10 = st["transfer"]
    assert t01["best_pretrained"] == "finetune" and t10["best_pretrained"] == "linear_probe"
    assert t01["verdict"] == "pretrained worse (negative transfer)" and t01["negative_transfer"]
    assert t01["comparison"]["primary"] == "delong" and t01["difference_ci"][1] < 0
    assert t10["verdict"] == "no evidence of a difference" and not t10["negative_transfer"]
    assert st["negative_transfer_at"] == [0.1]
    # only the selected and scratch models carry test figures
    by = {(r["strategy"], r["label_fraction"]): r for r in st["runs"]}
    assert by[("linear_probe", 0.1)]["test_auroc"] is None and by[("finetune", 1.0)]["test_auroc"] is None
    assert by[("finetune", 0.1)]["test_auroc"]["value"] < by[("scratch", 0.1)]["test_auroc"]["value"]
    # with several cases per patient the verdict comes from the patient-cluster bootstrap
    pats2 = np.array([f"p{i // 2}" for i in range(400)])
    tested2 = {
        k: _test_preds(y, s, seed, pats2)
        for k, (s, seed) in zip(tested, [(0.3, 1), (2.0, 2), (1.5, 3), (1.5, 3)])
    }
    st2 = summarise_study(runs, cfg, tested2)
    assert st2["transfer"][0]["comparison"]["primary"] == "paired_bootstrap"
    assert st2["transfer"][0]["negative_transfer"]


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
    first_metrics = json.loads((first.evaluate / "metrics.json").read_text())
    scratch_run = next(
        r for r in first_metrics["study"]["runs"] if (r["strategy"], r["label_fraction"]) == ("scratch", 1.0)
    )
    scratch_auc = scratch_run["test_auroc"]["value"]
    assert c["auroc_previous"]["value"] == pytest.approx(scratch_auc, abs=1e-6)
    assert c["delong"]["difference"] == pytest.approx(own - scratch_auc, abs=1e-6)
    lo, hi = c["paired_bootstrap"]["ci"]
    assert lo <= c["paired_bootstrap"]["value"] <= hi
    assert metrics["run"]["config"]["evaluate"]["compare_with"] == scratch.name  # no absolute path
    assert "Comparison with the previous model" in (plan.evaluate / "report.html").read_text()
