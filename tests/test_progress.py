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
