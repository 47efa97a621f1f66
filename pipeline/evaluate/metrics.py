"""Discrimination and calibration metrics, each with a 95% confidence interval.

The work lives in three modules, and every name is re-exported here so callers keep importing
``pipeline.evaluate.metrics``: :mod:`pipeline.evaluate.intervals` (the reported form, Wilson and
test-inversion intervals), :mod:`pipeline.evaluate.discrimination` (AUROC, confusion metrics, ROC points,
the discrimination block) and :mod:`pipeline.evaluate.calibration_metrics` (Brier, NLL, ECE/MCE, debiased
L2, reliability bins, calibration intercept/slope, the calibration block). The conventions below hold
for all three.

Every reported number is a dict ``{"value": x, "ci": [lo, hi], "ci_method": ...}`` (non-finite values
become ``None`` so the result is JSON-able). CI methods:

* ``"wilson"``: Wilson score interval for a proportion (scipy ``binomtest(...).proportion_ci``); used for
  accuracy, sensitivity, specificity, PPV, NPV when every patient contributes one case.
* ``"bootstrap"`` / ``"cluster_bootstrap"``: percentile interval of the vectorised (patient-cluster)
  bootstrap in ``pipeline.stats.bootstrap``; used for everything else, and for proportions too when
  some patient has several cases (the Wilson interval would assume independent cases).
* ``"delong_logit_t"`` / ``"obuchowski_logit_t"``: the AUROC's interval (``pipeline.evaluate.delong.
  auroc_logit_ci``): the DeLong variance (Obuchowski's patient-clustered one when patients have several
  cases) on the logit scale, with a t quantile on ``dof = min(positive, negative patients) - 1``; the
  AUROC also carries the plain ``ci_delong`` and the percentile ``ci_bootstrap`` (both covered under
  nominal in ``bench/coverage.py``). ``"delong"``: the plain DeLong interval (model comparisons).

Conventions:

* Binary tasks have a configured positive class column ``positive_index`` (may be 0). Scores are
  ``probs[:, positive_index]``; the default decision rule is ``score >= 0.5``.
* Calibration of a binary model is measured on the positive-class probability (what a reliability
  diagram of "predicted risk vs observed frequency" shows); for multi-class models on the top-label
  confidence (``max_k p_k`` vs "arg-max is correct", Guo et al. 2017).
* ECE bins follow scikit-learn's ``calibration_curve``: equal-width edges ``linspace(0, 1, B + 1)`` or
  equal-mass edges at the quantiles of the confidences, a value on an inner edge goes to the lower bin,
  empty bins are dropped. ``ECE = sum_b (n_b / N) |freq_b - conf_b|``; ``MCE = max_b |freq_b - conf_b|``.
* Debiased calibration error: Kumar, Liang & Ma (2019), "Verified uncertainty calibration", NeurIPS:
  the plug-in squared error per bin minus its sampling variance ``freq_b (1 - freq_b) / (n_b - 1)``,
  on equal-mass bins, ``sqrt(max(sum_b (n_b/N) [(freq_b - conf_b)^2 - freq_b(1-freq_b)/(n_b-1)], 0))``.
  It estimates the L2 (root-mean-square) calibration error, not the L1 ECE, so it is not numerically
  comparable to ``ece``.
* Calibration slope: ``b`` of the logistic recalibration ``logit P(y=1) = a + b * logit(p)``; calibration
  intercept (calibration-in-the-large): ``a`` of ``logit P(y=1) = a + 1 * logit(p)`` (slope fixed at one,
  Van Calster et al. 2016). Ideal: intercept 0, slope 1. Binary tasks only.
* Brier score: binary ``mean((p_pos - y_pos)^2)`` (scikit-learn's ``brier_score_loss``, range 0..1);
  multi-class ``mean(sum_k (p_k - 1[y = k])^2)`` (Brier's original, range 0..2).
* Intervals of binned metrics keep the bin edges of the full sample. Binned calibration errors (ECE,
  debiased L2) are biased upwards and sit on the boundary 0 for a well-calibrated model, where no
  percentile interval covers; their interval inverts tests along simulated worlds of growing
  miscalibration (``ci_method`` ``parametric_bootstrap_inversion`` or
  ``cluster_parametric_bootstrap_inversion``; see ``binned_error_ci`` and ``inverted_ci``), and its
  lower bound is 0 when the data are consistent with perfect calibration. The MCE has no interval
  (``ci`` is ``None``, ``ci_note`` says why).
"""

from __future__ import annotations

from pipeline.evaluate.calibration_metrics import (
    binned_calibration,
    binned_error_ci,
    brier_score,
    calibration_block,
    calibration_intercept_slope,
    debiased_l2_calibration_error,
    ece,
    mce,
    nll,
    reliability_bins,
)
from pipeline.evaluate.discrimination import (
    auroc_with_ci,
    confusion_metrics,
    discrimination_block,
    paired_auroc_difference,
    roc_points,
)
from pipeline.evaluate.intervals import inverted_ci, value_ci, wilson_ci

__all__ = [
    "binned_error_ci",
    "inverted_ci",
    "auroc_with_ci",
    "paired_auroc_difference",
    "binned_calibration",
    "brier_score",
    "calibration_block",
    "calibration_intercept_slope",
    "confusion_metrics",
    "debiased_l2_calibration_error",
    "discrimination_block",
    "ece",
    "mce",
    "nll",
    "reliability_bins",
    "roc_points",
    "value_ci",
    "wilson_ci",
]

