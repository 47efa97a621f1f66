"""Training data: cached tensors in memory, augmented on the fly with a pipeline-owned RNG.

Tensors come from the Augment stage (``tensors/<case_id>.npy``, channel-first ``(1, H, W)`` or
``(1, D, H, W)``). They are held in memory as float16 (BreastMNIST at 64 px: 5 MB; 1,000 CT volumes at
64^3: 0.5 GB) so the training step never waits for disk. Each tensor is checked against the sha256 the
Augment stage recorded (``tensor_digests.json``) as it is loaded; an unusable one is rebuilt from its cached
volume (itself verified, and rebuilt from the source when needed), and a case that cannot be rebuilt is left
out with a code (:attr:`SplitData.repairs`), never used as it is.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.augment.transforms import apply, sample_seed
from pipeline.errors import IngestError

log = logging.getLogger(__name__)


@dataclass
class SplitData:
    """One split's inputs and labels."""

    case_ids: list[str]
    patients: list[str]
    x: np.ndarray  # (N, 1, *spatial) float16
    y: np.ndarray  # (N,) int64; a multilabel case's stratum (what stratification and balancing use)
    rows: list[dict[str, str]]
    #: Tensors found unusable at load: ``{"case_id", "code", "outcome"}`` (outcome ``rebuilt`` or
    #: ``left_out``, code ``tensor_unreadable``, ``tensor_mismatch`` or the rebuild's ``cache_lost``).
    repairs: list[dict[str, str]] = field(default_factory=list)
    #: Multilabel tasks: the finding vectors ``(N, F)`` float32 0/1 (the training targets); else None.
    ym: np.ndarray | None = None

    @property
    def targets(self) -> np.ndarray:
        """What the loss and the validation score use: ``ym`` for multilabel tasks, else ``y``."""
        return self.ym if self.ym is not None else self.y

    def __len__(self) -> int:
        return len(self.case_ids)


def load_split(
    augment_dir: Path, rows: list[dict[str, str]], split: str, n_findings: int | None = None
) -> SplitData:
    """Load the cached tensors of one split (rows from the Augment index); ``n_findings`` for a multilabel
    task (the finding vectors go to :attr:`SplitData.ym`)."""
    sel = [r for r in rows if r["split"] == split]
    digests = _tensor_digests(Path(augment_dir))
    repairs: list[dict[str, str]] = []
    xs, kept = [], []
    for r in sel:
        x = _load_tensor(Path(augment_dir), r["case_id"], digests, repairs)
        if x is not None:
            xs.append(x)
            kept.append(r)
    if repairs:
        log.warning("load_split(%s): tensors repaired or left out: %s", split, repairs)
    ym = _multilabel(kept, n_findings)
    if not kept:
        return SplitData([], [], np.zeros((0,), np.float16), np.zeros((0,), np.int64), [], repairs, ym)
    y = np.array([int(r["label_index"]) for r in kept], dtype=np.int64)
    case_ids, patients = [r["case_id"] for r in kept], [r["patient_id"] for r in kept]
    return SplitData(case_ids, patients, np.stack(xs), y, kept, repairs, ym)


def _multilabel(rows: list[dict[str, str]], n_findings: int | None) -> np.ndarray | None:
    """Finding vectors ``(N, F)`` of multilabel rows (their ``label`` ``"0;1"``), None for other tasks.

    Raises:
        IngestError: A row's ``label`` is not a vector of ``n_findings`` values (code ``bad_index``): an
            Augment folder written before the index carried ``label``, or another task's folder.
    """
    if n_findings is None:
        return None
    from pipeline.ingest.labels import parse_multilabel

    out = np.zeros((len(rows), n_findings), dtype=np.float32)
    for i, r in enumerate(rows):
        try:
            out[i] = parse_multilabel(r.get("label") or "", n_findings)
        except ValueError as err:
            raise IngestError(
                f"Augment index.csv: case {r['case_id']}: column 'label' {err}; re-run Augment for this "
                "multilabel task",
                code="bad_index",
            ) from err
    return out


def _tensor_digests(augment_dir: Path) -> dict[str, dict[str, str]] | None:
    """The Augment stage's recorded tensor digests; None for a folder written before they were recorded."""
    from pipeline.augment.stage import TENSOR_DIGESTS

    try:
        return json.loads((augment_dir / TENSOR_DIGESTS).read_text())["tensors"]
    except FileNotFoundError:
        return None


def _load_tensor(
    augment_dir: Path, case_id: str, digests: dict[str, dict[str, str]] | None, repairs: list[dict[str, str]]
) -> np.ndarray | None:
    """One case's tensor, verified (one hash per load); rebuilt when unusable; None when it cannot be."""
    path = augment_dir / "tensors" / f"{case_id}.npy"
    if digests is None:  # an Augment folder from before digests: nothing to check against
        return np.load(path, allow_pickle=False)
    entry = digests.get(case_id) or {}
    try:
        data = path.read_bytes()
        code = None if hashlib.sha256(data).hexdigest() == entry.get("sha256") else "tensor_mismatch"
    except OSError:
        code = "tensor_unreadable"
    if code is None:
        return np.load(io.BytesIO(data), allow_pickle=False)
    audit: Counter = Counter()
    try:
        x = _rebuild_tensor(augment_dir, path, entry, audit)
    except IngestError as err:
        repairs.append({"case_id": case_id, "code": code, "outcome": "left_out", "cause": err.code})
        return None
    repairs.append({"case_id": case_id, "code": code, "outcome": "rebuilt"})
    if audit:  # its cached volume was unusable too, and rebuilt from the source
        repairs[-1]["volume"] = "rebuilt"
    return x


def _rebuild_tensor(augment_dir: Path, path: Path, entry: dict[str, str], audit: Counter) -> np.ndarray:
    """Preprocess the case's cached volume again with the folder's recorded spec; it must give the recorded
    bytes (preprocessing is deterministic), which then replace the unusable file.

    Raises:
        IngestError: code ``cache_lost`` (no record, the volume cannot be rebuilt, or other bytes).
    """
    from pipeline.augment.preprocess import preprocess
    from pipeline.augment.stage import tensor_bytes
    from pipeline.ingest.volume_cache import LOST, load_volume
    from pipeline.io import write_bytes
    from pipeline.trained.artefact import preprocess_spec

    if not entry.get("volume"):
        raise IngestError(f"tensor {path.name}: no digest recorded for it; cannot be rebuilt", LOST)
    workspace = augment_dir.parent.parent  # <workspace>/augment/<digest>
    arr, meta = load_volume(workspace, entry["volume"], audit)
    spec = preprocess_spec(json.loads((augment_dir / "transform_spec.json").read_text())["deterministic"])
    data = tensor_bytes(preprocess(arr, meta.get("axis4"), spec, meta.get("affine")))
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise IngestError(f"tensor {path.name}: rebuilt tensor differs from the recorded one", LOST)
    write_bytes(path, data)
    return np.load(io.BytesIO(data), allow_pickle=False)


def label_subset(data: SplitData, fraction: float, seed: int) -> SplitData:
    """A stratified, patient-level share of the training labels (deterministic given ``seed``).

    Within each class, patients are ranked by a seeded hash and the first ``ceil(fraction * n)`` kept
    (at least one per class), so smaller budgets are subsets of larger ones.
    """
    if fraction >= 1.0:
        return data
    keep = np.zeros(len(data), dtype=bool)
    for c in np.unique(data.y):
        idx = np.flatnonzero(data.y == c)
        pats = sorted(
            {data.patients[i] for i in idx}, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).digest()
        )
        n_keep = max(1, int(np.ceil(fraction * len(pats))))
        chosen = set(pats[:n_keep])
        keep[[i for i in idx if data.patients[i] in chosen]] = True
    return subset(data, np.flatnonzero(keep))


class AugmentedDataset(Dataset):
    """Training dataset applying the random transform with a per-(seed, epoch, index) RNG.

    Index ``i`` reads case ``i % N``: an epoch that draws the cases ``r`` times (small training sets, see
    :func:`repeated_order`) passes ``i + r * N`` so every draw gets its own augmentation.
    """

    def __init__(self, data: SplitData, transform, seed: int) -> None:
        self.data = data
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        k = i % len(self.data)
        x = self.data.x[k].astype(np.float32)
        if self.transform is not None and len(self.transform.transforms):
            x = apply(self.transform, x, sample_seed(self.seed, self.epoch, i))
        y = int(self.data.y[k]) if self.data.ym is None else torch.from_numpy(self.data.ym[k])
        return torch.from_numpy(np.ascontiguousarray(x)), y


def repeated_order(order_fn, n: int, repeats: int) -> list[int]:
    """``repeats`` draws of an epoch order, draw ``r`` offset by ``r * n`` (see :class:`AugmentedDataset`).

    Args:
        order_fn: ``order_fn(r)`` gives draw ``r``'s order of ``0..n-1`` (draw 0 is the plain epoch order).
        n: Number of cases.
        repeats: Draws per epoch (>= 1).
    """
    return [i + r * n for r in range(repeats) for i in order_fn(r)]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Shuffled sample order of one epoch, a pure function of (seed, epoch) so resumes replay it."""
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, -1))
    return torch.randperm(n, generator=g).tolist()


def balanced_order(y: np.ndarray, seed: int, epoch: int, num_classes: int) -> list[int]:
    """``len(y)`` indices drawn with replacement so that every present class is drawn equally often.

    A pure function of (seed, epoch), like :func:`epoch_order`.
    """
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    w = 1.0 / np.maximum(counts[y], 1.0)
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, -2))
    return torch.multinomial(torch.as_tensor(w), len(y), replacement=True, generator=g).tolist()


def subset(data: SplitData, index: np.ndarray | list[int]) -> SplitData:
    """The cases at ``index``, in that order."""
    idx = np.asarray(index, dtype=np.int64)
    return SplitData(
        [data.case_ids[i] for i in idx],
        [data.patients[i] for i in idx],
        data.x[idx],
        data.y[idx],
        [data.rows[i] for i in idx],
        ym=None if data.ym is None else data.ym[idx],
    )


def concat(a: SplitData, b: SplitData) -> SplitData:
    """Cases of ``a`` then of ``b``."""
    if len(a) == 0:
        return b
    if len(b) == 0:
        return a
    return SplitData(
        a.case_ids + b.case_ids,
        a.patients + b.patients,
        np.concatenate([a.x, b.x]),
        np.concatenate([a.y, b.y]),
        a.rows + b.rows,
        ym=None if a.ym is None or b.ym is None else np.concatenate([a.ym, b.ym]),
    )


def patient_folds(data: SplitData, k: int, seed: int) -> np.ndarray:
    """Fold number ``(N,)`` in ``0..k-1`` per case: patient-level, stratified by each patient's first label.

    Within each class, patients are ordered by a seeded hash and dealt round-robin, so folds are balanced
    in size and class mix and no patient spans two folds.

    Raises:
        ValueError: Fewer than ``k`` patients.
    """
    first: dict[str, int] = {}
    for p, lab in zip(data.patients, data.y.tolist(), strict=True):
        first.setdefault(p, int(lab))
    if len(first) < k:
        raise ValueError(f"train.folds={k}: only {len(first)} patient(s) in train+val; expected at least {k}")
    fold_of: dict[str, int] = {}
    offset = 0
    for c in sorted(set(first.values())):
        pats = sorted(
            (p for p, lab in first.items() if lab == c),
            key=lambda p: hashlib.sha256(f"fold:{seed}:{p}".encode()).digest(),
        )
        for j, p in enumerate(pats):
            fold_of[p] = (offset + j) % k
        offset += len(pats)
    return np.array([fold_of[p] for p in data.patients], dtype=np.int64)
