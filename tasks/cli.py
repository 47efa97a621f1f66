"""The ``medtl`` command. Imports are lazy so ``medtl --help`` answers instantly.

Commands: ``run CONFIG`` (the whole chain through Luigi), ``demo`` (BreastMNIST from bundled DICOM),
``convert INPUT OUTPUT`` (what ingestion sees, as NIfTI + JSON), ``check CONFIG`` (validate a config),
``backbones`` (list registered backbones).
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


def run_pipeline(config: str | Path, workers: int | None = None, scheduler_host: str | None = None,
                 scheduler_port: int | None = None) -> int:
    """Run the whole chain for ``config``; return a process exit code (0 success)."""
    from pipeline.errors import MedtlError
    from tasks.base import FAILURES, config_and_plan, install_log_filter

    install_log_filter()
    try:
        cfg, plan = config_and_plan(str(config))
    except MedtlError as err:
        print(f"medtl: {err}", file=sys.stderr)
        return 2
    host = scheduler_host or cfg.runtime.scheduler_host
    kwargs = {"workers": workers or cfg.runtime.workers, "detailed_summary": True, "log_level": "WARNING"}
    if host:
        kwargs.update(scheduler_host=host, scheduler_port=scheduler_port or cfg.runtime.scheduler_port)
    else:
        kwargs["local_scheduler"] = True
    from tasks.run import nightly_build

    FAILURES.clear()
    try:
        result, summary = nightly_build(config, kwargs)
    except MedtlError as err:  # e.g. the workspace lock is held by another run
        print(f"medtl: {err}", file=sys.stderr)
        return 75  # EX_TEMPFAIL: try again later
    print(result.summary_text, file=sys.stderr)
    for warning in summary.get("notify_warnings", []):
        print(f"medtl: warning: {warning}", file=sys.stderr)
    if FAILURES:
        for family, err in FAILURES:
            print(f"medtl: {family} failed: {err}", file=sys.stderr)
        return 1
    if not result.scheduling_succeeded or result.status.name not in ("SUCCESS", "SUCCESS_WITH_RETRY"):
        print(f"medtl: the run did not finish ({result.status.name}); see the messages above", file=sys.stderr)
        return 1
    if summary.get("status") == "noop":
        print(f"Nothing to do: tonight's record {plan.workspace / summary['record']} exists")
    elif not summary.get("trained", True):
        print(f"No training tonight (retraining policy); record {plan.workspace / summary['record']}")
    else:
        print(f"Report: {plan.evaluate / 'report.html'}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    return run_pipeline(args.config, args.workers, args.scheduler_host, args.scheduler_port)


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import prepare_demo

    config = prepare_demo(Path(args.workspace), epochs=args.epochs)
    return run_pipeline(config, args.workers)


def _cmd_check(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.errors import MedtlError

    try:
        cfg = load_config(args.config)
    except MedtlError as err:
        print(f"medtl: {err}", file=sys.stderr)
        return 2
    print(f"{args.config}: valid ({cfg.task.kind} task, classes {cfg.task.class_names}, backbone {cfg.model.backbone})")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from pipeline.errors import MedtlError
    from pipeline.ingest.convert import convert_tree
    from pipeline.ingest.deid import ensure_private_dir, load_or_create_key

    out = Path(args.output)
    try:
        key = load_or_create_key(args.key_dir or ensure_private_dir(out / "private"), args.key_env)
        summary = convert_tree(Path(args.input), out, key)
    except MedtlError as err:
        print(f"medtl: {err}", file=sys.stderr)
        return 2
    n_ok = summary.get("converted", summary.get("n_converted", "?"))
    print(f"Converted into {out} ({n_ok} output(s)); per-file summary under {out / 'private'}")
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    from models import get_spec, list_backbones

    for name in list_backbones():
        spec = get_spec(name)
        print(f"{name:32s} {spec.spatial_dims}D  in_chans={spec.in_chans}  intensity={spec.intensity}")
    print("timm/<model name>                any timm model (ImageNet weights from the local caches)")
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
    v.set_defaults(func=_cmd_convert)

    b = sub.add_parser("backbones", help="list registered backbones")
    b.set_defaults(func=_cmd_backbones)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
