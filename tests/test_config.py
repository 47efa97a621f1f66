from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.conftest import make_dataset, write_config


@pytest.fixture
def project(tmp_path: Path) -> Path:
    make_dataset(tmp_path, n_patients=6)
    return tmp_path


def _edit(path: Path, fn) -> Path:
    cfg = yaml.safe_load(path.read_text())
    fn(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_valid_config_resolves_paths(project: Path) -> None:
    cfg = load_config(write_config(project))
    assert cfg.data.source == (project / "images").resolve()
    assert cfg.task.positive_index == 1
    assert cfg.task.class_names == ["normal", "lesion"]


def test_unknown_key_names_key_and_allowed(project: Path) -> None:
    path = _edit(write_config(project), lambda c: c["train"].update(learning_rate=0.1))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "train.learning_rate" in msg and "unknown key" in msg
    assert "lr" in msg and "epochs" in msg  # lists what is allowed


def test_wrong_type_names_key_value_and_expectation(project: Path) -> None:
    path = _edit(write_config(project), lambda c: c["train"].update(epochs="many"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "train.epochs" in str(e.value) and "'many'" in str(e.value) and "integer" in str(e.value)


def test_bad_choice_lists_allowed(project: Path) -> None:
    path = _edit(write_config(project), lambda c: c["task"].update(kind="regression"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "task.kind" in str(e.value) and "'binary'" in str(e.value) and "regression" in str(e.value)


def test_missing_data_file_is_named(project: Path) -> None:
    path = _edit(write_config(project), lambda c: c["data"].update(labels_csv="nope.csv"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "data.labels_csv" in str(e.value) and "nope.csv" in str(e.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_positive_class_must_exist(project: Path) -> None:
    path = _edit(write_config(project), lambda c: c["task"].update(positive_class="tumour"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "task.positive_class" in str(e.value) and "tumour" in str(e.value) and "lesion" in str(e.value)


def test_positive_class_by_label_value(project: Path) -> None:
    path = _edit(
        write_config(project),
        lambda c: c["task"].update(classes={0: "malignant", 1: "benign"}, positive_class="0"),
    )
    assert load_config(path).task.positive_index == 0


def test_split_fractions_leave_training_data(project: Path) -> None:
    path = _edit(write_config(project), lambda c: c["split"].update(val=0.4, test=0.4, calibration=0.2))
    with pytest.raises(ConfigError, match="split"):
        load_config(path)


def test_stage_hashes_depend_only_on_their_sections(project: Path) -> None:
    base = load_config(write_config(project))
    lr = load_config(write_config(project, train={"epochs": 2, "batch_size": 16, "lr": 0.01, "patience": 5}))
    workers = load_config(write_config(project, runtime={"workspace": "ws", "workers": 4, "threads": 1}))
    ingest_sections = ("task", "data", "split", "ingest", "deid")
    assert base.hashed(*ingest_sections) == lr.hashed(*ingest_sections)
    assert base.hashed("model", "train") != lr.hashed("model", "train")
    for sections in (ingest_sections, ("preprocess", "augment"), ("model", "train"), ("evaluate", "report")):
        assert base.hashed(*sections) == workers.hashed(*sections)
    # the device and the decoder process count do not change results either
    dev = load_config(
        write_config(
            project,
            train={"epochs": 2, "batch_size": 16, "lr": 0.003, "patience": 5, "device": "cpu"},
            ingest={"processes": 2},
        )
    )
    assert dev.hashed("model", "train") == base.hashed("model", "train")
    assert dev.hashed(*ingest_sections) == base.hashed(*ingest_sections)


@pytest.mark.parametrize(
    "example", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_example_configs_validate(example: Path) -> None:
    """Every example in configs/ is a valid config (only its data paths, which are placeholders, are absent)."""
    from models import get_spec
    from pipeline.config import Config

    cfg = Config.model_validate(yaml.safe_load(example.read_text()))
    spec = get_spec(cfg.model.backbone)
    assert spec.spatial_dims == cfg.preprocess.spatial_dims
    assert cfg.model.pretrained == (spec.weights is not None)


def test_config_package_exports_every_name_and_keeps_files_small() -> None:
    """pipeline/config/ is split along its jobs; ``from pipeline.config import X`` keeps working."""
    import pipeline.config as package

    expected = {
        "Config", "load_config", "SPLITS", "ID_TYPES", "TaskConfig", "DataConfig", "SplitConfig",
        "IngestConfig", "DeidConfig", "PreprocessConfig", "AugmentConfig", "ModelConfig", "TrainConfig",
        "EvaluateConfig", "ReportConfig", "RuntimeConfig", "RetrainPolicy", "PromotionPolicy",
        "NotifyConfig", "RetentionPolicy", "OpsConfig",
    }
    assert expected <= set(package.__all__)
    for name in package.__all__:
        assert getattr(package, name) is not None
    for path in Path(package.__file__).parent.glob("*.py"):
        n = len(path.read_text().splitlines())
        assert n < 450, f"{path.name}: {n} lines"


def test_config_that_is_not_utf8_is_one_coded_line(project: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 15.7: a Latin-1 config ended in a UnicodeDecodeError traceback."""
    from tasks.cli import main

    config = write_config(project)
    text = config.read_text(encoding="utf-8")
    config.write_bytes(text.replace("name: tiny", "name: tiny # r\u00e9sum\u00e9").encode("latin-1"))
    line_no = next(i for i, ln in enumerate(text.splitlines(), 1) if ln.startswith("name: tiny"))
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert info.value.code == "config_not_utf8"
    assert f"line {line_no}, column 15" in str(info.value) and "UTF-8" in str(info.value)
    assert main(["check", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("medtl: ") and "iconv" in err and "Traceback" not in err


def test_model_weights_options_are_validated_and_not_hashed(project: Path) -> None:
    base = load_config(write_config(project))
    sha = "AB" * 32
    pinned = load_config(write_config(project, model={"weights_sha256": sha, "allow_unpinned": True}))
    assert pinned.model.weights_sha256 == sha.lower() and pinned.model.allow_unpinned
    # The content of the file is what the FineTune digest covers (workspace.py), not these options.
    assert pinned.hashed("model", "train") == base.hashed("model", "train")
    with pytest.raises(ConfigError, match="model.weights_sha256"):
        load_config(write_config(project, model={"weights_sha256": "abc"}))


def test_external_source_must_not_overlap_the_training_source(tmp_path) -> None:
    """evaluate.external names a second source: the training folder itself, or a folder inside it, is
    refused with the field named."""
    import yaml

    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    (tmp_path / "images" / "siteB").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "labels.csv").write_text("file,diagnosis\n")
    base = {
        "task": {"kind": "binary", "classes": {"0": "a", "1": "b"}, "positive_class": "b"},
        "data": {"source": "images", "labels_csv": "labels.csv"},
    }
    for folder, ok in (("images/siteB", False), ("images", False), ("other", True)):
        cfg = dict(base, evaluate={"external": [{"name": "B", "source": folder, "labels_csv": "labels.csv"}]})
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        if ok:
            assert load_config(path).evaluate.external[0].source == tmp_path / "other"
        else:
            with pytest.raises(ConfigError, match=r"evaluate.external \(B\).source: .* overlaps data.source"):
                load_config(path)
