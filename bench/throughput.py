"""Training throughput of the medtl loop against a bare PyTorch loop on in-memory tensors, same run.

    python bench/throughput.py [--npz pipeline/data/breastmnist.npz] [--size 64] [--batch-size 32]
        [--reps 3] [--preset standard] [--threads 2] [--out throughput.json]

Both loops train the same network (the shipped 2D backbone, ``finetune`` strategy, AdamW, same batch size)
for one epoch over the same preprocessed training images, alternately ``--reps`` times so that load from
other processes hits both alike:

- bare: tensors already in memory as one float32 tensor, a random permutation, forward/backward/step;
- medtl: :func:`pipeline.train.epochs.train_epochs` (float16 cache -> per-sample MONAI augmentation with the
  pipeline's seeds -> DataLoader -> AdamW + schedule, checkpoint excluded from the timed part).

Reported: images/s of each (median over reps), their ratio, and the share of the medtl step time spent
waiting for data (``data_wait_share`` of ``history.csv``). Validation and checkpoint time are excluded from
both (``seconds`` in ``history.csv`` covers the training steps only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(tmp: Path, size: int, bs: int, preset: str, threads: int):
    from pipeline.config import Config

    return Config.model_validate(
        {
            "task": {
                "kind": "binary",
                "classes": {"0": "malignant", "1": "benign"},
                "positive_class": "malignant",
            },
            "data": {"source": str(tmp), "labels_csv": str(tmp / "labels.csv")},
            "preprocess": {"spatial_dims": 2, "image_size": size, "intensity": "window", "window": [0, 255]},
            "augment": {"preset": preset}
            if preset != "none"
            else {"flip": 0, "rotate_deg": 0, "scale": 0, "translate": 0, "intensity": 0},
            "model": {"backbone": "efficientnet_lite0"},
            "train": {
                "strategy": "finetune",
                "epochs": 1,
                "batch_size": bs,
                "warmup_epochs": 0,
                "device": "cpu",
            },
            "runtime": {"threads": threads},
        }
    )


def _data(npz: Path, cfg):
    from models import get_spec
    from pipeline.augment.preprocess import make_spec, preprocess
    from pipeline.train.data import SplitData

    d = np.load(npz)
    spec = make_spec(cfg.preprocess, get_spec(cfg.model.backbone))

    def split(name: str) -> SplitData:
        imgs, labels = d[f"{name}_images"], d[f"{name}_labels"].reshape(-1).astype(np.int64)
        x = np.stack([preprocess(img.T[:, :, None], None, spec) for img in imgs]).astype(np.float16)
        ids = [f"{name}{i}" for i in range(len(x))]
        return SplitData(ids, ids, x, labels, [{} for _ in ids])

    return split("train"), split("val")


def bare_epoch(cfg, train, seed: int) -> float:
    """Images/s of one epoch of a plain loop on in-memory tensors."""
    import torch

    from pipeline.train.network import build_model
    from pipeline.train.strategies import make_optimizer, setup_trainable

    model = build_model(cfg, 2, seed=seed)
    setup_trainable(model, "finetune", cfg.train)
    opt = make_optimizer(model, "finetune", cfg.train, True)
    x = torch.from_numpy(train.x.astype(np.float32))
    y = torch.from_numpy(train.y)
    loss_fn = torch.nn.CrossEntropyLoss()
    bs = cfg.train.batch_size
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    model.train()
    n = 0
    t0 = time.perf_counter()
    for b in range(len(x) // bs):
        idx = perm[b * bs : (b + 1) * bs]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
        n += len(idx)
    return n / (time.perf_counter() - t0)


def pipeline_epoch(cfg, train, val, work: Path) -> tuple[float, float]:
    """Images/s and data-wait share of one epoch of :func:`pipeline.train.epochs.train_epochs`."""
    import torch

    from pipeline.train.epochs import train_epochs
    from pipeline.train.network import build_model

    model = build_model(cfg, 2, seed=cfg.train.seed)
    out = train_epochs(cfg, model, "finetune", train, val, work, torch.device("cpu"))
    row = out["history"][-1]
    return row["images_per_s"], row["data_wait_share"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--npz", type=Path, default=ROOT / "pipeline" / "data" / "breastmnist.npz")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--preset", default="standard", help="augment preset of the medtl loop, or 'none'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(Path(tmp), args.size, args.batch_size, args.preset, args.threads)
        train, val = _data(args.npz, cfg)
        val.x, val.y = val.x[:8], val.y[:8]  # validation is not timed; keep it short
        bare, pipe, wait = [], [], []
        bare_epoch(cfg, train, 99)  # warm-up (allocator, kernels)
        for rep in range(args.reps):
            bare.append(bare_epoch(cfg, train, rep))
            ips, share = pipeline_epoch(cfg, train, val, Path(tmp) / f"work{rep}")
            pipe.append(ips)
            wait.append(share)
            print(
                f"rep {rep}: bare {bare[-1]:.1f} img/s, medtl {ips:.1f} img/s "
                f"(ratio {ips / bare[-1]:.3f}, data wait {100 * share:.1f}% of step time)",
                flush=True,
            )
    ratios = [p / b for p, b in zip(pipe, bare, strict=True)]
    res = {
        "size": args.size,
        "batch_size": args.batch_size,
        "preset": args.preset,
        "threads": args.threads,
        "train_images": len(train),
        "bare_images_per_s": float(np.median(bare)),
        "medtl_images_per_s": float(np.median(pipe)),
        "ratio_median": float(np.median(ratios)),
        "ratios": ratios,
        "data_wait_share_median": float(np.median(wait)),
    }
    print(
        f"\nmedian: bare {res['bare_images_per_s']:.1f} img/s, medtl {res['medtl_images_per_s']:.1f} img/s, "
        f"ratio {res['ratio_median']:.3f}, data wait {100 * res['data_wait_share_median']:.1f}%"
    )
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
