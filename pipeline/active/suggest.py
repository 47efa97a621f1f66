"""``medtl suggest CONFIG -n N``: which unlabelled cases to label next, from the run's trained model.

The labeller's list names source files, which may carry identifiers, so it is written only under
``<workspace>/private/suggest/`` (mode 0700). What is shared (console, the returned summary) holds counts,
the strategy and pseudonymous case ids only. Cases already labelled, unlabelled cases of a patient with a
val, calibration or test case, and cases that failed ingestion are never suggested.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.active.rank import DEFAULT_STRATEGY, rank_candidates
from pipeline.config import Config
from pipeline.errors import MedtlError
from pipeline.io import write_json, write_text

__all__ = ["suggest_cases"]


def _source_files(private_ingest: Path) -> dict[str, str]:
    path = private_ingest / "source_map.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {r["case_id"]: r["files"] for r in csv.DictReader(fh)}


def suggest_cases(cfg: Config, plan, n: int, strategy: str | None = None) -> dict[str, Any]:
    """Rank the run's unlabelled cases and write the labeller's list (private).

    Args:
        cfg: The config.
        plan: The run's :class:`pipeline.workspace.StagePlan` (its Augment, FineTune and Evaluate folders
            must exist: run ``medtl run`` first).
        n: How many cases to suggest.
        strategy: A ranking strategy (default :data:`pipeline.active.rank.DEFAULT_STRATEGY`).

    Returns:
        The shared summary: counts, strategy, the private list's workspace-relative path and the ranked
        pseudonymous case ids.
    """
    from pipeline.augment.stage import read_index
    from pipeline.ingest.deid import ensure_private_dir
    from pipeline.train.data import load_split
    from pipeline.train.semi import load_unlabelled
    from pipeline.trained.artefact import CALIBRATOR_FILE, TrainedModel
    from pipeline.trained.scorer import Scorer

    if n < 1:
        raise MedtlError(f"suggest -n: {n}; expected a positive number of cases", code="bad_argument")
    strategy = strategy or DEFAULT_STRATEGY
    if cfg.task.multilabel:  # the ranking strategies score uncertainty over one class per case
        raise MedtlError(
            "suggest: ranking cases to label is not adapted to multilabel tasks (task.kind: multilabel)",
            code="multilabel_unsupported",
        )
    for stage in ("augment", "finetune"):
        if not Path(getattr(plan, stage)).is_dir():
            raise MedtlError(
                f"suggest: the {stage} stage of this config has not run yet; run `medtl run` first",
                code="not_trained",
            )
    rows = read_index(Path(plan.augment))
    unlabelled, held_out = load_unlabelled(Path(plan.augment), rows)
    summary: dict[str, Any] = {
        "strategy": strategy,
        "unlabelled_cases": len(unlabelled) + held_out,
        "unlabelled_of_held_out_patients": held_out,
        "candidates": len(unlabelled),
    }
    if len(unlabelled) == 0:
        summary.update(suggested=0, case_ids=[], list=None)
        return summary
    evaluate = Path(plan.evaluate)
    trained = TrainedModel.load(
        Path(plan.finetune), evaluate if (evaluate / CALIBRATOR_FILE).is_file() else None
    )
    scorer = Scorer(trained, cfg.train.device)
    train = load_split(Path(plan.augment), rows, "train")
    probs = scorer.probabilities(unlabelled.x, calibrated=True)
    order = rank_candidates(
        strategy,
        n,
        probs,
        scorer.features(unlabelled.x),
        scorer.features(train.x) if len(train) else np.zeros((0, 1)),
        train.y,
        seed=cfg.train.seed,
    )
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    private = ensure_private_dir(Path(plan.workspace) / "private")
    files = _source_files(private / "ingest" / Path(plan.ingest).name)
    names = trained.class_names
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "case_id", "patient_id", "source_files"] + [f"p_{c}" for c in names])
    ids = []
    for rank, i in enumerate(order, start=1):
        cid = unlabelled.case_ids[i]
        ids.append(cid)
        w.writerow([rank, cid, unlabelled.patients[i], files.get(cid, "")] + [f"{v:.4f}" for v in probs[i]])
    out = private / "suggest" / f"{stamp}-{strategy}.csv"
    write_text(out, buf.getvalue(), mode=0o600)
    summary.update(
        suggested=len(ids),
        case_ids=ids,
        list=str(out.relative_to(plan.workspace)),
        model=Path(plan.finetune).name,
        calibrated=trained.calibrator is not None,
        created=stamp,
    )
    write_json(Path(plan.workspace) / "suggest" / f"{stamp}-{strategy}.json", summary)
    return summary
