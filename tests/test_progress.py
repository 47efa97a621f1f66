"""Progress on long steps: periodic log lines when stderr is not a terminal (cron mail, log files)."""

from __future__ import annotations

import logging

from pipeline.progress import track


def test_periodic_lines_without_a_terminal(caplog) -> None:
    caplog.set_level(logging.INFO, logger="medtl.progress")
    out = list(track(range(5), 5, "Augment: preprocessing", every_s=0.0))
    assert out == [0, 1, 2, 3, 4]
    lines = [r.getMessage() for r in caplog.records]
    assert "Augment: preprocessing: 3/5 case(s)" in lines[2] and lines[-1].startswith("Augment: preprocessing: done, 5")


def test_quiet_for_short_steps(caplog) -> None:
    caplog.set_level(logging.INFO, logger="medtl.progress")
    assert list(track(iter([1, 2]), None, "x")) == [1, 2]
    assert not caplog.records


def test_sized_items_count_units(caplog) -> None:
    caplog.set_level(logging.INFO, logger="medtl.progress")
    out = list(track(iter([[0] * 3, [0] * 4]), 7, "bootstrap", unit="resample", every_s=0.0, size=len))
    assert len(out) == 2
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("bootstrap: 3/7 resample(s)") and lines[1].startswith("bootstrap: 7/7")


def test_bootstrap_reports_resamples(caplog, monkeypatch) -> None:
    """A bootstrap says how many of its resamples are done (counts only)."""
    import numpy as np

    import pipeline.stats.bootstrap as bmod
    from pipeline.progress import track as real_track

    monkeypatch.setattr(bmod, "_CHUNK_ELEMENTS", 50 * 10)  # 10 resamples per chunk of 50 cases
    seen: list[tuple] = []

    def spy(items, total, desc, **kw):
        seen.append((total, desc, kw.get("unit")))
        return real_track(items, total, desc, every_s=0.0, **kw)

    monkeypatch.setattr("pipeline.progress.track", spy)
    caplog.set_level(logging.INFO, logger="medtl.progress")
    bs = bmod.Bootstrap(50, 40, seed=1)
    out = bs.run({"mean": bmod.mean_stat(np.arange(50.0))})
    assert out["mean"].shape == (40,)
    assert seen == [(40, "bootstrap", "resample")]
    lines = [r.getMessage() for r in caplog.records]
    assert [ln.split(",")[0] for ln in lines[:4]] == [f"bootstrap: {k}/40 resample(s)" for k in (10, 20, 30, 40)]
