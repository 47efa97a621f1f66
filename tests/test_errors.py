"""Every medtl error keeps its ``code`` (and every attribute) across processes.

Ingest decodes in a process pool and other stages run work in child processes; an error that loses its
code on the way back is tabulated under the wrong reason. The classes are found in the source (every
subclass of MedtlError anywhere under ``models/`` and ``pipeline/``), so a new error class is checked too.
"""

from __future__ import annotations

import ast
import copy
import importlib
import pickle
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from pipeline.errors import ConfigError, IngestError, MedtlError, WeightsError

ROOT = Path(__file__).resolve().parents[1]


def _error_classes() -> list[type]:
    """Every class under models/ and pipeline/ that derives (directly or not) from MedtlError.

    Found with ``ast`` (no module is imported just to look), then imported from its module.
    """
    known = {"MedtlError"}
    defined: dict[str, tuple[str, list[str]]] = {}
    for folder in ("models", "pipeline"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            for node in tree.body:
                if isinstance(node, ast.ClassDef):
                    bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                    defined[node.name] = (module, bases)
    changed = True
    while changed:
        changed = False
        for name, (_, bases) in defined.items():
            if name not in known and known & set(bases):
                known.add(name)
                changed = True
    out = []
    for name in sorted(known):
        module, _ = defined[name]
        out.append(getattr(importlib.import_module(module), name))
    return out


def _instance(cls: type) -> MedtlError:
    """An instance built the way the code raises it, with a code other than the class default."""
    if cls.__name__ == "LockHeld":
        err = cls(Path("/ws/.medtl.lock"), {"pid": 123, "host": "elsewhere", "user": "u"})
        err.code = "lock_held_test"
        return err
    return cls("field x = 3; expected a positive integer", code=f"{cls.__name__.lower()}_test")


def test_discovery_finds_the_known_classes() -> None:
    names = {c.__name__ for c in _error_classes()}
    assert {"MedtlError", "ConfigError", "IngestError", "WeightsError", "LockHeld"} <= names


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_pickle_round_trip_keeps_code_and_attributes(cls: type) -> None:
    err = _instance(cls)
    assert err.code != cls.default_code
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert back.code == err.code
    assert str(back) == str(err) and back.args == err.args
    assert vars(back) == vars(err)
    assert copy.deepcopy(err).code == err.code


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_default_code_survives_too(cls: type) -> None:
    if cls.__name__ == "LockHeld":
        err = cls(Path("/ws/.medtl.lock"), {"pid": 1})
    else:
        err = cls("message")
    assert err.code == cls.default_code
    assert pickle.loads(pickle.dumps(err)).code == cls.default_code


def test_ingest_error_keeps_reason_and_code() -> None:
    err = IngestError("f.dcm: Rows (0028,0010) = 0; expected a positive integer", "no_pixel_data")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.code) == (err.reason, "no_pixel_data")


# ------------------------------------------------------------------------------ a real process crossing
def _raise_in_worker(kind: str) -> None:
    if kind == "ingest":
        raise IngestError("file <F1>: Pixel Data (7FE0,0010) holds 10 bytes; expected 20", "truncated")
    if kind == "config":
        raise ConfigError("train.lr = -1; expected > 0", code="bad_value")
    raise WeightsError("weights file sha256 differs", code="weights_sha256")


@pytest.mark.parametrize(
    "kind, cls, code",
    [
        ("ingest", IngestError, "truncated"),
        ("config", ConfigError, "bad_value"),
        ("weights", WeightsError, "weights_sha256"),
    ],
)
def test_error_raised_in_a_worker_process_keeps_its_code(kind: str, cls: type, code: str) -> None:
    with ProcessPoolExecutor(max_workers=1) as pool:
        future = pool.submit(_raise_in_worker, kind)
        with pytest.raises(cls) as info:
            future.result()
    assert info.value.code == code


def _write_series(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = generate_uid()
    out = []
    for k in range(n):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [-158.1, -179.0, k * 5.0]
        p = folder / f"s{k:02d}.dcm"
        ds.save_as(p)
        out.append(p)
    return out


def test_ingest_decoder_pool_returns_codes_to_the_parent(tmp_path: Path) -> None:
    """As Ingest runs it: the decode jobs in a process pool; the item cut after the scan comes back as an
    IngestError with code ``truncated``, an item with a series gap with ``missing_slice``."""
    from pipeline.ingest.decode_jobs import DecodeJob, run_jobs
    from pipeline.ingest.sources import LoadOptions, scan_sources

    src = tmp_path / "src"
    for i in range(4):
        _write_series(src / f"series{i}", 3)
    gap = _write_series(src / "gap", 5)
    gap[2].unlink()
    items, rejected = scan_sources(src)
    assert len(items) == 5 and not rejected
    cut = next(it for it in items if "series1" in it.files[0])
    Path(cut.files[1]).write_bytes(Path(cut.files[1]).read_bytes()[:-9000])
    cache = tmp_path / "cache"
    cache.mkdir()
    jobs = [DecodeJob(it, str(cache / f"{i}.npy"), LoadOptions()) for i, it in enumerate(items)]

    results, n_decoded = run_jobs(jobs, processes=2)

    assert n_decoded == 5
    by_item = {it.files[0]: res for it, res in zip(items, results, strict=True)}
    failed = {k: v for k, v in by_item.items() if isinstance(v, IngestError)}
    assert {Path(k).parent.name: v.code for k, v in failed.items()} == {
        "series1": "truncated",
        "gap": "missing_slice",
    }
    ok = [v for v in by_item.values() if not isinstance(v, IngestError)]
    assert len(ok) == 3 and all(m["shape"] == [128, 128, 3] for m in ok)
    first_ok = next(j for j, r in zip(jobs, results, strict=True) if not isinstance(r, IngestError))
    assert np.load(first_ok.cache_file).shape == (128, 128, 3)


# ------------------------------------------------------------------------------ Luigi worker processes
def _failing_task_class():
    """A StageTask that fails with an IngestError (built here: tasks/ imports luigi)."""
    import luigi

    from tasks.base import StageTask

    class FailingIngest(StageTask):
        stage = "ingest"
        tag = luigi.Parameter(default="x")

        def output(self):
            return luigi.LocalTarget(self.tag)  # never written: the task fails

        def run(self):
            raise IngestError("Ingest: no case could be ingested from 3 input(s)", code="nothing_ingested")

    return FailingIngest


@pytest.mark.parametrize("workers", [1, 2])
def test_task_failure_reaches_the_cli_with_its_code(tmp_path: Path, workers: int) -> None:
    """With several Luigi workers a task runs (and fails) in a forked child process; the CLI, in the
    parent, must still get the MedtlError and its code (tasks.base.FAILURES)."""
    import luigi

    from tasks.base import FAILURES

    FAILURES.clear()
    task = _failing_task_class()(config="unused.yaml", tag=str(tmp_path / f"out{workers}"))
    result = luigi.build(
        [task], workers=workers, local_scheduler=True, detailed_summary=True, log_level="ERROR"
    )
    assert not result.scheduling_succeeded or result.status.name == "FAILED"
    failures = list(FAILURES)
    assert len(failures) == 1
    family, err = failures[0]
    assert family == "FailingIngest" and isinstance(err, IngestError) and err.code == "nothing_ingested"
    FAILURES.clear()
    assert not FAILURES
