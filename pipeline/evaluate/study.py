"""The optional scarce-label transfer study: one model per (label fraction, strategy), chosen on validation.

Every study model is trained on ``train.label_fraction`` of the training labels with one strategy
(``linear_probe``, ``partial``, ``finetune``, ``gradual``, or ``scratch``: every layer trained from random
weights) and scored on the **validation** split only (:func:`run_study_member`). Evaluate then, per label
fraction, selects the best pretrained strategy by validation AUROC, and touches the test split once, for
the two models the verdict needs: the selected pretrained one and scratch (:func:`collect_study`). The
verdict comes from the paired difference's 95% CI (patient-cluster bootstrap when patients have several
cases, else DeLong): ``pretrained better``, ``pretrained worse (negative transfer)`` or ``no evidence of a
difference``. Point estimates never decide it.

Validation AUROC is the early-stopping set of every study model (``folds: 1``), so it is optimistic by the
same mechanism for each strategy; it is a fair basis for choosing, not an estimate to report.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from pipeline.config import Config
from pipeline.config.digests import finetune_digest
from pipeline.io import write_json, write_text

__all__ = [
    "PRETRAINED_STRATEGIES",
    "STUDY_VERSION",
    "collect_study",
    "run_study_member",
    "study_config",
    "study_digest",
    "study_dir",
    "study_reuses_main_model",
    "summarise_study",
]

log = logging.getLogger(__name__)
STUDY_VERSION = 2
PRETRAINED_STRATEGIES = ("linear_probe", "partial", "finetune", "gradual")
VERDICTS = {"better": "pretrained better", "worse": "pretrained worse (negative transfer)"}


def study_config(cfg: Config, label_fraction: float, strategy: str) -> Config:
    """The config of one study model: ``train.label_fraction`` and the strategy changed, nothing else.

    ``scratch`` keeps ``train.strategy: finetune`` (every layer trained) with ``model.pretrained: false``.
    """
    pretrained = strategy != "scratch"
    train = cfg.train.model_copy(
        update={
            "label_fraction": float(label_fraction),
            "strategy": "finetune" if strategy == "scratch" else strategy,
            "folds": 1,
        }
    )
    model = cfg.model.model_copy(update={"pretrained": pretrained and cfg.model.pretrained})
    return cfg.model_copy(update={"train": train, "model": model})


def study_digest(cfg: Config, plan, label_fraction: float, strategy: str) -> str:
    """Digest of a study model: the FineTune recipe (:func:`pipeline.config.digests.finetune_digest`).

    Same augment folder and pretrained weights as the run (none for ``scratch``), never a warm start.
    """
    scfg = study_config(cfg, label_fraction, strategy)
    weights = getattr(plan, "weights_sha256", "none")
    return finetune_digest(scfg, Path(plan.augment).name, weights, warm_start=None)


def study_reuses_main_model(cfg: Config, plan, label_fraction: float, strategy: str) -> bool:
    """True when the study model is the run's own FineTune model (same digest): it is not trained twice."""
    return study_digest(cfg, plan, label_fraction, strategy) == Path(plan.finetune).name


def study_dir(cfg: Config, plan, label_fraction: float, strategy: str) -> Path:
    """``<workspace>/study/<digest>-s<STUDY_VERSION>/`` of one study model."""
    digest = study_digest(cfg, plan, label_fraction, strategy)
    return Path(plan.workspace) / "study" / f"{digest}-s{STUDY_VERSION}"


def _model_dir(cfg: Config, plan, label_fraction: float, strategy: str) -> Path:
    if study_reuses_main_model(cfg, plan, label_fraction, strategy):
        return Path(plan.finetune)
    return study_dir(cfg, plan, label_fraction, strategy)


def _split_predictions(cfg: Config, plan, model_dir: Path, split: str):
    """One split's predictions of a study model (the promotion holdout left out of test, as in the report)."""
    from pipeline.augment.stage import read_index
    from pipeline.evaluate.stage import exclude_promotion_holdout
    from pipeline.evaluate.summary import SplitPredictions
    from pipeline.train.data import load_split
    from pipeline.trained.artefact import TrainedModel
    from pipeline.trained.scorer import Scorer

    data = load_split(Path(plan.augment), read_index(Path(plan.augment)), split)
    if len(data) == 0:
        raise ValueError(f"study: the {split} split of augment/{Path(plan.augment).name} is empty")
    logits = Scorer(TrainedModel.load(model_dir), cfg.train.device).logits(data.x)
    preds = {
        split: SplitPredictions(
            logits=logits, y=data.y, patient=np.array(data.patients), case=np.array(data.case_ids)
        )
    }
    if split == "test":
        exclude_promotion_holdout(cfg, Path(plan.workspace), preds, {})
    return preds[split]


def _discrimination(cfg: Config, sp) -> dict[str, Any]:
    from pipeline.evaluate.metrics import discrimination_block
    from pipeline.stats.bootstrap import Bootstrap

    bs = Bootstrap(
        len(sp.y), cfg.evaluate.n_bootstrap, seed=cfg.train.seed, clusters=sp.patient, ci_level=cfg.evaluate.ci_level
    )
    probs = softmax(sp.logits, axis=1)
    return discrimination_block(probs, sp.y, cfg.task.kind, cfg.task.class_names, cfg.task.positive_index, bs)


def _metric_key(cfg: Config) -> str:
    return "auroc" if cfg.task.kind == "binary" else "macro_auroc"


def run_study_member(
    cfg: Config, plan, label_fraction: float, strategy: str, out_dir: Path, work_dir: Path
) -> dict[str, Any]:
    """Train one study model (unless it is the run's own model) and score it on the validation split.

    The test split is not touched here (see :func:`collect_study`). Writes into ``out_dir``: the FineTune
    artefacts (when trained here), ``val_predictions.csv`` (pseudonymous ids, uncalibrated probabilities)
    and ``study_result.json``.
    """
    from pipeline.train.loop import run_finetune

    scfg = study_config(cfg, label_fraction, strategy)
    reused = study_reuses_main_model(cfg, plan, label_fraction, strategy)
    if not reused:
        log.info("Transfer study: training %s at label fraction %g", strategy, label_fraction)
        run_finetune(scfg, Path(plan.augment), out_dir, work_dir, progress=False)
    model_dir = Path(plan.finetune) if reused else out_dir
    summary_path = model_dir / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    sp = _split_predictions(cfg, plan, model_dir, "val")
    _write_probs(out_dir / "val_predictions.csv", sp, cfg.task.class_names)
    disc = _discrimination(cfg, sp)
    key = _metric_key(cfg)
    result = {
        "study_version": STUDY_VERSION,
        "strategy": strategy,
        "label_fraction": float(label_fraction),
        "pretrained": bool(scfg.model.pretrained),
        "train_strategy": scfg.train.strategy,
        "digest": study_digest(cfg, plan, label_fraction, strategy),
        "reused_main_model": reused,
        "train_cases": summary.get("train_cases"),
        "epochs_run": summary.get("epochs_run"),
        "selection_split": "val",
        "val_metric": key,
        "val_auroc": disc.get(key),
    }
    write_json(out_dir / "study_result.json", result)
    return result


def _write_probs(path: Path, sp, names: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", "patient_id", "label_index"] + [f"p_raw_{n}" for n in names])
    for c, p, y, pr in zip(sp.case, sp.patient, sp.y, softmax(sp.logits, axis=1), strict=True):
        w.writerow([c, p, int(y)] + [f"{v:.6f}" for v in pr])
    write_text(path, buf.getvalue())


def collect_study(cfg: Config, plan) -> dict[str, Any]:
    """The ``study`` block: select per fraction on validation, then score the selected models on test once."""
    runs = []
    for strategy in cfg.evaluate.study_strategies:
        for frac in cfg.evaluate.study_label_fractions:
            path = study_dir(cfg, plan, frac, strategy) / "study_result.json"
            run = json.loads(path.read_text()) if path.is_file() else None
            if run is None or run.get("study_version") != STUDY_VERSION:
                runs.append({"strategy": strategy, "label_fraction": frac, "error": "not trained (missing result)"})
            else:
                runs.append(run)
    chosen = select_on_validation(runs)
    tested: dict[tuple[str, float], Any] = {}
    for frac, pick in chosen.items():
        for strategy in (pick, "scratch"):
            if strategy is not None and (strategy, frac) not in tested:
                tested[(strategy, frac)] = _split_predictions(
                    cfg, plan, _model_dir(cfg, plan, frac, strategy), "test"
                )
    return summarise_study(runs, cfg, tested)


def _val(run: dict[str, Any]) -> float | None:
    a = run.get("val_auroc")
    v = a.get("value") if isinstance(a, dict) else None
    return v if isinstance(v, (int, float)) and np.isfinite(v) else None


def select_on_validation(runs: list[dict[str, Any]]) -> dict[float, str | None]:
    """Per label fraction with a scratch run: the pretrained strategy with the highest validation AUROC
    (ties: the cheaper strategy, in the order of ``PRETRAINED_STRATEGIES``), or None."""
    out: dict[float, str | None] = {}
    for frac in sorted({r["label_fraction"] for r in runs}):
        here = {r["strategy"]: r for r in runs if r["label_fraction"] == frac and _val(r) is not None}
        if "scratch" not in here:
            continue
        pre = [s for s in PRETRAINED_STRATEGIES if s in here]
        out[frac] = max(pre, key=lambda s: (_val(here[s]), -pre.index(s))) if pre else None
    return out


def summarise_study(
    runs: list[dict[str, Any]], cfg: Config, tested: dict[tuple[str, float], Any] | None = None
) -> dict[str, Any]:
    """The ``study`` block of metrics.json.

    Args:
        runs: Each member's ``study_result.json`` (validation AUROC), or ``error``.
        cfg: The run config.
        tested: ``(strategy, fraction) -> SplitPredictions`` on test, for the selected and scratch models.
    """
    tested = tested or {}
    key = _metric_key(cfg)
    test_auc = {k: _discrimination(cfg, sp).get(key) for k, sp in tested.items()}
    transfer = []
    for frac, pick in select_on_validation(runs).items():
        if pick is None:
            continue
        by = {r["strategy"]: r for r in runs if r["label_fraction"] == frac}
        entry: dict[str, Any] = {
            "label_fraction": frac,
            "best_pretrained": pick,
            "selected_on": "val",
            "val_auroc_pretrained": _val(by[pick]),
            "val_auroc_scratch": _val(by["scratch"]),
        }
        a, b = tested.get((pick, frac)), tested.get(("scratch", frac))
        if a is not None and b is not None:
            entry.update(_paired_test(cfg, a, b, test_auc[(pick, frac)], test_auc[("scratch", frac)]))
        transfer.append(entry)
    return {
        "metric": key,
        "selection": "per label fraction, the pretrained strategy with the highest validation AUROC; the test "
        "split is scored once, for the selected and the scratch models",
        "label_fractions": list(cfg.evaluate.study_label_fractions),
        "strategies": list(cfg.evaluate.study_strategies),
        "runs": [
            dict({k: v for k, v in r.items() if not k.startswith("_")}, test_auroc=test_auc.get((r["strategy"], r["label_fraction"])))
            for r in runs
        ],
        "transfer": transfer,
        "negative_transfer_at": [t["label_fraction"] for t in transfer if t.get("negative_transfer")],
    }


def _paired_test(cfg: Config, a, b, auc_a, auc_b) -> dict[str, Any]:
    """Test AUROCs and the paired difference (selected pretrained minus scratch) with its verdict."""
    from pipeline.evaluate.compare import paired_auroc_comparison, verdict
    from pipeline.stats.bootstrap import Bootstrap, score_auroc_stat

    if not np.array_equal(a.case, b.case):
        raise ValueError("study: the selected and the scratch model were not scored on the same test cases")
    level = cfg.evaluate.ci_level
    bs = Bootstrap(len(a.y), cfg.evaluate.n_bootstrap, seed=cfg.train.seed, clusters=a.patient, ci_level=level)
    pa, pb = softmax(a.logits, axis=1), softmax(b.logits, axis=1)
    out: dict[str, Any] = {"auroc_pretrained": auc_a, "auroc_scratch": auc_b}
    if cfg.task.kind == "binary":
        pos = cfg.task.positive_index
        comp = paired_auroc_comparison(a.y == pos, pa[:, pos], pb[:, pos], bs, level)
        ci = (comp.get(comp.get("primary", "delong")) or {}).get("ci")
        diff = (comp.get("delong") or {}).get("difference")
    else:
        sa, sb = score_auroc_stat(pa, a.y, None), score_auroc_stat(pb, a.y, None)
        d = bs.run({"d": lambda w: sa(w) - sb(w)})["d"]
        d = d[np.isfinite(d)]
        ci = list(bs.ci(d))
        diff = (auc_a or {}).get("value", np.nan) - (auc_b or {}).get("value", np.nan)
        comp = {"primary": "paired_bootstrap", "paired_bootstrap": {"value": diff, "ci": ci}}
    v = verdict(ci)
    out.update(
        difference=diff,
        difference_ci=ci,
        comparison=comp,
        verdict=VERDICTS.get(v, v),
        negative_transfer=v == "worse",
    )
    return out
