from __future__ import annotations

from pathlib import Path

from pipeline.report.nightly import write_nightly_report

RECORD = {
    "night": "2026-11-23",
    "name": "tiny",
    "data_snapshot": "abc123",
    "report": "evaluate/x/report.html",
    "retrain": {"train": True, "reasons": ["12 new labelled cases (>= 10)"]},
    "promotion": {
        "model_id": 2, "champion_id": 1, "promote": False, "promoted": False, "evaluated_on": "holdout",
        "n_cases": 40, "auroc_challenger": 0.81, "auroc_champion": 0.86, "auroc_difference": -0.05,
        "difference_ci": [-0.11, 0.01], "method": "delong", "holdout_uses": 3,
        "reasons": ["AUROC difference lower bound -0.11 < -margin -0.02"],
    },
    "champion_id": 1,
    "headline": {"auroc_calibrated": {"value": 0.81, "ci": [0.7, 0.9]}},
    "drift": {"prevalence": {"lesion": 0.33}, "intensity_mean": 71.2},
}


def test_nightly_report_shows_decision_numbers_and_holdout_uses(tmp_path: Path) -> None:
    path = tmp_path / "night.html"
    write_nightly_report(path, RECORD, [{"ts": "2026-11-22T02:00", "figures": {"intensity_mean": 70.9}}])
    html = path.read_text()
    for text in ("Champion / challenger decision", "-0.050", "[-0.110, 0.010]", "holdout", "12 new labelled cases",
                 "decisions that have used the locked holdout so far", "intensity_mean", "71.200"):
        assert text in html, text
    assert "https://" not in html and "http://" not in html


def test_night_without_training_says_so(tmp_path: Path) -> None:
    rec = dict(RECORD, retrain={"train": False, "reasons": ["2 new cases < 50"]}, promotion=None, report=None)
    path = tmp_path / "n.html"
    write_nightly_report(path, rec)
    assert "no promotion decision was made" in path.read_text()
