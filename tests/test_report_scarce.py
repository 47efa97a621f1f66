"""The report's scarce-labels section follows the numbers of train_summary.json and the ingest report."""

from __future__ import annotations

from types import SimpleNamespace

from pipeline.report.document import Doc
from pipeline.report.sections.scarce import scarce_labels_section


def _render(ingest: dict, train: dict) -> str:
    doc = Doc()
    scarce_labels_section(doc, SimpleNamespace(ingest=ingest, train=train))
    return doc.html("t", "s")


def test_semi_supervised_result_and_decision_are_reported() -> None:
    guard = {
        "auroc_supervised": 0.801,
        "auroc_semi_supervised": 0.842,
        "difference": 0.041,
        "ci": [-0.012, 0.093],
        "ci_level": 0.9,
        "ci_method": "patient_cluster_bootstrap",
        "use_semi_supervised": True,
        "decision": "semi-supervised kept: no evidence of harm",
    }
    semi = {
        "method": "pseudo_label",
        "unlabelled_available": 480,
        "unlabelled_left_out": 3,
        "used": True,
        "per_fold": [{"pseudo_labelled": 20}, {"pseudo_labelled": 22}],
        "harm_guard": guard,
    }
    html = _render({"unlabelled": {"cases": 483, "patients": 470}}, {"semi_supervised": semi})
    assert (
        "483 unlabelled case(s) (470 patients)" in html
        and "480 could be used" in html
        and "3 left out" in html
    )
    assert "42 pseudo-label(s)" in html and "0.842" in html and "0.801" in html and "90% CI" in html
    assert "no evidence of harm" in html and "not kept" not in html
    semi_bad = dict(
        semi,
        used=False,
        harm_guard=dict(
            guard, use_semi_supervised=False, ci=[-0.2, -0.05], decision="fell back to supervised"
        ),
    )
    html = _render({"unlabelled": {"cases": 483}}, {"semi_supervised": semi_bad})
    assert "was not kept" in html and "fell back to supervised" in html


def test_no_section_without_unlabelled_cases() -> None:
    assert "Scarce labels" not in _render(
        {}, {"semi_supervised": {"method": "off", "unlabelled_available": 0}}
    )
    assert "was not used" in _render({"unlabelled": {"cases": 5}}, {"semi_supervised": {"method": "off"}})


def test_input_census_reads_as_a_sentence_not_a_dict() -> None:
    from pipeline.report.sections.overview import _inputs_sentence

    census = {"by_category": {"folder": 3, "regular_file": 780}, "entries": 783, "rejected_by_code": {"hidden": 2}}
    text = _inputs_sentence(census)
    assert text == "783 entries under the source (3 folder(s), 780 regular file(s)); not used: 2 hidden."
    assert "{" not in text
