"""The nightly run's bookkeeping: retraining policy, registration and promotion, monitoring, run records.

Used by the Luigi wrapper (``tasks/run.py``) and the ``medtl`` command; no Luigi here.

* :func:`retrain_decision`: train tonight? (no champion yet; training config changed; at least
  ``ops.retrain.min_new_cases`` new labelled cases since the champion's data; champion older than
  ``ops.retrain.max_days``).
* :func:`register_and_decide`: register the evaluated model, write its predict bundle, score it and the
  champion on the same current cases, decide, promote, and return the decision (written to
  ``ops/decisions/<evaluate digest>.json`` by the task).
* :func:`monitor`: per-night drift figures (label prevalence, input statistics, and the champion's
  calibration on the newly labelled cases it never saw).
* :func:`record_name`, :func:`status_lines`: the nightly record ``runs/<date>_<snapshot>_<config>.json``
  and the ``medtl status`` text.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.ops.registry import Registry

log = logging.getLogger(__name__)

STAGES = ("ingest", "augment", "finetune", "evaluate")
TRAIN_SECTIONS = ("task", "split", "preprocess", "augment", "model", "train")


def config_hash(cfg: Config) -> str:
    """Hash of every result-changing section (ops and runtime excluded)."""
    return cfg.hashed(
        "task",
        "data",
        "split",
        "ingest",
        "deid",
        "preprocess",
        "augment",
        "model",
        "train",
        "evaluate",
        "report",
    )


def train_hash(cfg: Config, weights_sha256: str = "none") -> str:
    """Hash of what defines how a model is trained (not the data): the sections and the weights' content.

    ``weights_sha256`` is the plan's (:attr:`pipeline.workspace.StagePlan.weights_sha256`): a different
    pretrained file for the same backbone is a changed training configuration.
    """
    return cfg.hashed(*TRAIN_SECTIONS, extra={"weights": weights_sha256})


def record_name(cfg: Config, snapshot: str, night: str) -> str:
    """File name of a nightly record: ``<YYYY-MM-DD>_<data snapshot>_<config hash>.json``."""
    return f"{night}_{snapshot}_{config_hash(cfg)}.json"


def _manifest_cases(ingest_dir: Path) -> set[str]:
    """The labelled cases of an Ingest folder (a case labelled since counts as new)."""
    from pipeline.ingest.stage import read_manifest

    return (
        {r["case_id"] for r in read_manifest(ingest_dir) if r["label_index"] != ""}
        if (ingest_dir / "manifest.csv").is_file()
        else set()
    )


def retrain_decision(
    cfg: Config, plan: Any, registry: Registry, now: dt.datetime | None = None
) -> dict[str, Any]:
    """Whether tonight's run trains a challenger, and why.

    Args:
        cfg: The config (``ops.retrain``).
        plan: The :class:`pipeline.workspace.StagePlan`; its Ingest folder must exist.
        registry: The workspace registry.
        now: The current time (tests pass a fake clock).
    """
    policy = cfg.ops.retrain
    champ = registry.champion()
    if champ is None:
        return {"train": True, "reasons": ["no champion yet"], "new_cases": None, "champion_age_days": None}
    if champ["evaluate"] == Path(plan.evaluate).name:
        return {
            "train": True,
            "reasons": ["the champion is this configuration on this data (nothing to train)"],
            "new_cases": 0,
            "champion_age_days": None,
            "champion_id": champ["id"],
        }
    current = _manifest_cases(Path(plan.ingest))
    before = _manifest_cases(Path(plan.workspace) / "ingest" / champ["ingest"])
    new_cases = len(current - before)
    now = now or dt.datetime.now(dt.timezone.utc)
    age = (now - dt.datetime.fromisoformat(champ["created"])).total_seconds() / 86400.0
    reasons, train = [], False
    if champ["train_hash"] != train_hash(cfg, getattr(plan, "weights_sha256", "none")):
        train = True
        reasons.append("training configuration changed since the champion")
    if new_cases >= max(policy.min_new_cases, 1):
        train = True
        reasons.append(
            f"{new_cases} new labelled case(s) >= ops.retrain.min_new_cases={policy.min_new_cases}"
        )
    if policy.max_days is not None and age >= policy.max_days:
        train = True
        reasons.append(f"champion is {age:.1f} day(s) old >= ops.retrain.max_days={policy.max_days}")
    if not train:
        reasons.append(
            f"{new_cases} new labelled case(s) < ops.retrain.min_new_cases={policy.min_new_cases}"
            + (f"; champion {age:.1f} day(s) old < max_days={policy.max_days}" if policy.max_days else "")
        )
    return {
        "train": train,
        "reasons": reasons,
        "new_cases": new_cases,
        "champion_age_days": round(age, 3),
        "champion_id": champ["id"],
    }


def register_and_decide(cfg: Config, plan: Any) -> dict[str, Any]:
    """Register the evaluated model, write its bundle, run champion/challenger and promote if it passes.

    Returns:
        The decision (JSON-able), also recorded in the registry.
    """
    from pipeline.ingest.deid import load_or_create_key
    from pipeline.ingest.stage import read_manifest
    from pipeline.ops.predict import reference_profile, write_bundle
    from pipeline.ops.promotion import decide, score_model

    ws = Path(plan.workspace)
    reg = Registry(ws)
    stages = {s: Path(getattr(plan, s)).name for s in STAGES}
    metrics = json.loads((Path(plan.evaluate) / "metrics.json").read_text())
    manifest = read_manifest(Path(plan.ingest))
    model_id = reg.register(
        name=cfg.name,
        stages=stages,
        data_snapshot=plan.snapshot,
        config_hash=config_hash(cfg),
        train_hash=train_hash(cfg, getattr(plan, "weights_sha256", "none")),
        backbone=cfg.model.backbone,
        metrics=metrics.get("headline", {}),
        n_cases=len(manifest),
    )
    champ = reg.champion()
    challenger = score_model(cfg, ws, reg.get(model_id), Path(plan.augment), Path(plan.ingest))
    write_bundle(
        ws,
        model_id,
        challenger.logits.get("calibration"),
        challenger.y.get("calibration"),
        challenger.calibrator,
        reference_profile(manifest, ws, cfg.task.class_names if cfg.task.multilabel else None),
    )
    earlier = [d for d in reg.decisions() if d["challenger_id"] == model_id]
    if earlier:
        # A run killed after recording the decision but before writing its file: finish it, decide nothing
        # again (a second look would count as another use of the locked holdout).
        decision = dict(earlier[-1]["details"])
        status = reg.get(model_id)["status"]
        if decision.get("promoted") and status == "candidate":
            reg.promote(
                model_id, "auto", "; ".join(decision["reasons"]), {"evaluated_on": decision["evaluated_on"]}
            )
        elif not decision.get("promote") and status == "candidate":
            reg.set_status(model_id, "rejected", "auto", "; ".join(decision["reasons"]))
        decision["holdout_uses"] = reg.holdout_uses()
        log.info("Promotion: model %s was decided by an earlier run; decision reused", model_id)
        return decision
    if champ is not None and champ["id"] == model_id:
        return {
            "model_id": model_id,
            "champion_id": model_id,
            "promote": False,
            "already_champion": True,
            "reasons": ["already the champion"],
            "evaluated_on": "none",
        }
    champion = score_model(cfg, ws, champ, Path(plan.augment), Path(plan.ingest)) if champ else None
    if champion is not None and champion.multilabel != challenger.multilabel:
        # e.g. task.kind changed to or from multilabel: the two models answer different questions
        kinds = {True: "multilabel", False: "single-label"}
        return {
            "model_id": model_id,
            "champion_id": champ["id"],
            "promote": False,
            "promoted": False,
            "reasons": [
                f"the champion is a {kinds[champion.multilabel]} model and this one a "
                f"{kinds[challenger.multilabel]} one: they cannot be compared, so the model stays a "
                "candidate; promote it by hand (medtl models promote) after reading its report"
            ],
            "evaluated_on": "none",
            "n_cases": 0,
        }
    key = load_or_create_key(ws / "private", cfg.deid.key_env)
    decision = decide(cfg, key, challenger, champion)
    decision.update(model_id=model_id, champion_id=champ["id"] if champ else None)
    promoted = bool(decision["promote"] and cfg.ops.promotion.auto)
    decision["promoted"] = promoted
    if decision["promote"] and not cfg.ops.promotion.auto:
        decision["reasons"].append(
            "passes, but ops.promotion.auto is false: promote by hand (medtl models promote)"
        )
    reg.record_decision(
        model_id, decision["champion_id"], promoted, decision["evaluated_on"], decision["n_cases"], decision
    )
    if promoted:
        reg.promote(
            model_id, "auto", "; ".join(decision["reasons"]), {"evaluated_on": decision["evaluated_on"]}
        )
    elif not decision["promote"]:
        reg.set_status(model_id, "rejected", "auto", "; ".join(decision["reasons"]))
    decision["holdout_uses"] = reg.holdout_uses()
    log.info(
        "Promotion: model %s %s (%s)",
        model_id,
        "promoted" if promoted else "not promoted",
        "; ".join(decision["reasons"]),
    )
    return decision


def monitor(
    cfg: Config, plan: Any, registry: Registry, champion: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Drift figures of tonight's labelled data (unlabelled cases only counted), and the champion's
    calibration on labelled cases it never saw.

    Args:
        champion: The registry row of the model to monitor (default: the current champion). A model
            promoted tonight trained on tonight's cases, so the run passes the champion before promotion.

    Returns:
        ``{"n_cases", "n_unlabelled", "prevalence", "new_cases", "new_prevalence", "input": {...},
        "champion_on_new": {...}}`` (case counts are labelled cases).
    """
    import numpy as np  # not at module level: a no-op night imports this module only to name its record

    from pipeline.ingest.stage import read_manifest
    from pipeline.ops.predict import intensity_percentiles
    from pipeline.ops.promotion import brier, usable_inputs

    ws = Path(plan.workspace)
    all_rows = read_manifest(Path(plan.ingest))
    rows = [r for r in all_rows if r["label_index"] != ""]  # unlabelled cases: counted, no prevalence
    champ = champion or registry.champion()
    before = _manifest_cases(ws / "ingest" / champ["ingest"]) if champ else set()
    new = [r for r in rows if r["case_id"] not in before] if champ else []
    names = cfg.task.class_names
    fig: dict[str, Any] = {
        "n_cases": len(rows),
        "n_unlabelled": len(all_rows) - len(rows),
        "prevalence": _prev([int(r["label_index"]) for r in rows], names),
        "new_cases": len(new),
        "new_prevalence": _prev([int(r["label_index"]) for r in new], names) if new else None,
        "modalities": sorted({r["modality"] for r in rows}),
        "manufacturers": sorted({r["manufacturer"] for r in rows}),
    }
    if cfg.task.multilabel:  # label_index is a split stratum: prevalence per finding from the label vectors
        from pipeline.ingest.labels import parse_multilabel

        def share(rs: list[dict[str, str]]) -> dict[str, float]:
            v = np.array([parse_multilabel(r["label"], len(names)) for r in rs], dtype=float)
            return {n: float(v[:, j].mean()) for j, n in enumerate(names)}

        fig["prevalence"] = share(rows) if rows else {}
        fig["new_prevalence"] = share(new) if new else None
    sample = sorted(new, key=lambda r: r["case_id"])[:200]
    if sample:
        from pipeline.errors import IngestError
        from pipeline.ingest.volume_cache import load_volume

        p99 = []
        for r in sample:  # verified reads (rebuilt when unusable); a lost volume is left out of the figure
            try:
                p99.append(intensity_percentiles(load_volume(ws, r["volume"])[0])[1])
            except IngestError:
                continue
        if p99:
            fig["new_intensity_p99_median"] = float(np.median(p99))
    if champ and new:
        from pipeline.ops.predict import ModelScorer

        scorer = ModelScorer(ws, champ, cfg)
        if (scorer.info.get("task") == "multilabel") != cfg.task.multilabel:  # task.kind changed since
            return fig
        x, kept, _lost = usable_inputs(scorer.spec, new, ws)
        new = [new[i] for i in kept]
        if not new:
            return fig
        res = scorer.score(x)
        p = res["calibrated"]
        fig["champion_on_new"] = {"model_id": champ["id"], "n": len(new)}
        if cfg.task.multilabel:  # Brier: the mean over findings; observed: the share positive per finding
            from pipeline.ingest.labels import parse_multilabel
            from pipeline.ops.promotion import multilabel_brier

            ym = np.array([parse_multilabel(r["label"], len(names)) for r in new], dtype=float)
            fig["champion_on_new"].update(
                brier=multilabel_brier(p, ym),
                mean_predicted={n: float(p[:, k].mean()) for k, n in enumerate(names)},
                observed={n: float(ym[:, k].mean()) for k, n in enumerate(names)},
            )
            return fig
        y = np.array([int(r["label_index"]) for r in new])
        fig["champion_on_new"].update(
            brier=brier(p, y),
            mean_predicted={n: float(p[:, k].mean()) for k, n in enumerate(names)},
            observed=_prev(y.tolist(), names),
            accuracy=float(np.mean(p.argmax(1) == y)),
        )
    return fig


def _prev(labels: list[int], names: list[str]) -> dict[str, float]:
    if not labels:
        return {}
    import numpy as np

    a = np.asarray(labels)
    return {n: float(np.mean(a == k)) for k, n in enumerate(names)}


def status_lines(workspace: Path, limit: int = 10) -> list[str]:
    """Human-readable lines for ``medtl status``: last runs, champion, decisions, holdout uses, drift."""
    reg = Registry(workspace)
    lines = [f"Workspace {workspace}"]
    from pipeline.ops.lock import read_holder

    holder = read_holder(Path(workspace) / "ops" / "run.lock")
    if holder:
        lines.append(
            f"  lock: held by pid {holder.get('pid')} on {holder.get('host')} ({holder.get('user')}) since {holder.get('since')}"
        )
    runs = reg.runs(limit)
    lines.append(f"Last {len(runs)} run(s):")
    for r in runs:
        s = r["summary"] or {}
        extra = []
        if s.get("trained") is not None:
            extra.append("trained" if s["trained"] else "no training")
        if s.get("promoted") is not None:
            extra.append("promoted" if s["promoted"] else "not promoted")
        if s.get("error"):
            extra.append(str(s["error"])[:80])
        lines.append(
            f"  #{r['id']} {r['started']} {r['status']:<9} snapshot {r['data_snapshot']} {'; '.join(extra)}"
        )
    champ = reg.champion()
    lines.append(
        f"Champion: model {champ['id']} ({champ['backbone']}, created {champ['created']})"
        if champ
        else "Champion: none"
    )
    lines.append(
        f"Promotion decisions: {len(reg.decisions())}, of which {reg.holdout_uses()} used the locked holdout"
    )
    nights = reg.drift("nightly", limit=limit)
    if nights:
        lines.append("Drift (nightly labelled data):")
        for d in nights:
            f = d["figures"]
            cal = f.get("champion_on_new") or {}
            lines.append(
                f"  {d['ts']} cases {f.get('n_cases')} new {f.get('new_cases')} prevalence {_fmt(f.get('prevalence'))}"
                + (f" champion Brier on new {cal['brier']:.3f} (n={cal['n']})" if cal else "")
            )
    preds = reg.drift("predict", limit=limit)
    if preds:
        lines.append("Drift (predict):")
        for d in preds:
            f = d["figures"]
            lines.append(
                f"  {d['ts']} n {f.get('n')} predicted {_fmt(f.get('predicted_prevalence'))} OOD rate {f.get('ood_rate', 0):.2f}"
            )
    return lines


def _fmt(d: dict[str, float] | None) -> str:
    return "{" + ", ".join(f"{k}: {v:.2f}" for k, v in (d or {}).items()) + "}"
