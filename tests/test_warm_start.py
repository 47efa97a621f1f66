"""ops.retrain.warm_start: champion — the second night's model starts from the champion's weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import MedtlError
from pipeline.train.network import WARM_START_FILE, warm_start_into
from pipeline.workspace import plan_stages
from tasks.cli import run_pipeline
from tests.conftest import make_dataset, write_config

pytestmark = pytest.mark.integration


def test_second_night_starts_from_champion_and_digest_is_stable(tmp_path: Path) -> None:
    make_dataset(tmp_path, n_patients=60)
    ops = {"retrain": {"warm_start": "champion", "min_new_cases": 1}, "promotion": {"min_auroc": 0.0}}
    config = write_config(tmp_path, ops=ops, train={"epochs": 1, "batch_size": 16, "lr": 0.003})
    assert run_pipeline(config) == 0
    first = plan_stages(load_config(config))
    assert first.warm_start is None  # no champion yet: pretrained start
    # New labelled cases arrive: the next night retrains from the champion.
    make_dataset(tmp_path, n_patients=70)
    second = plan_stages(load_config(config))
    assert second.warm_start == first.finetune
    assert run_pipeline(config) == 0
    assert json.loads((second.finetune / "warm_start.json").read_text()) == {
        "from_finetune": first.finetune.name
    }
    # The choice is sticky: planning again (the new model may be champion now) names the same folder.
    assert plan_stages(load_config(config)).finetune == second.finetune


def test_warm_start_refuses_a_champion_of_another_shape(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(3)}, tmp_path / WARM_START_FILE)
    with pytest.raises(MedtlError, match="warm_start"):
        warm_start_into(torch.nn.Linear(2, 2), tmp_path)
    lin = torch.nn.Linear(2, 2)
    torch.save({k: torch.ones_like(v) for k, v in lin.state_dict().items()}, tmp_path / WARM_START_FILE)
    assert warm_start_into(lin, tmp_path / "fold0") and torch.all(lin.weight == 1)
