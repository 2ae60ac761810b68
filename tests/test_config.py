from pathlib import Path

import pytest
import torch

from dlbatch.config import JobConfig, load_config, parse_overrides
from dlbatch.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "jobs" / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.stem for p in CONFIGS} >= {"demo", "image", "text"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    assert cfg.tasks


def test_demo_config_is_the_default():
    assert (
        load_config(Path(__file__).parents[1] / "jobs/configs/demo.yaml").model_dump()
        == JobConfig(output_root="dlbatch-output").model_dump()
    )


def test_overrides_reach_nested_fields_and_parse_yaml_values():
    cfg = load_config(
        None, ["image.train.epochs=7", "tasks=[text]", "image.train.use_gpu=true", "max_reject_fraction=0.2"]
    )
    assert cfg.image.train.epochs == 7
    assert cfg.tasks == ("text",)
    assert cfg.image.train.use_gpu is True
    assert cfg.max_reject_fraction == 0.2
    # the file's values stay where not overridden
    assert cfg.text.train.epochs == JobConfig().text.train.epochs


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"image\.train\.epoch\b.*Extra inputs"):
        load_config(None, ["image.train.epoch=3"])


def test_wrong_type_is_an_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"image\.train\.epochs"):
        load_config(None, ["image.train.epochs=lots"])


def test_out_of_range_values_are_rejected():
    with pytest.raises(ConfigError, match="max_reject_fraction"):
        load_config(None, ["max_reject_fraction=2"])
    with pytest.raises(ConfigError, match="tasks"):
        load_config(None, ["tasks=[image, image]"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/cfg.yaml")


def test_yaml_is_never_executed(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("tasks: !!python/object/apply:os.system ['touch /tmp/dlbatch-pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)
    assert not Path("/tmp/dlbatch-pwned").exists()


def test_config_is_frozen():
    cfg = JobConfig()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its ValidationError for frozen models
        cfg.output_root = "elsewhere"


def test_hold_data_takes_yaml_booleans_or_auto_and_auto_holds_what_fits():
    from dlbatch.train import hold_decision, host_available_bytes

    assert JobConfig().image.train.hold_data == "auto"
    on = load_config(None, ["image.train.hold_data=on", "text.train.hold_data=false"])
    assert (on.image.train.hold_data, on.text.train.hold_data) == (True, False)
    with pytest.raises(ConfigError, match=r"image\.train\.hold_data"):
        load_config(None, ["image.train.hold_data=sometimes"])
    cpu = torch.device("cpu")
    available = host_available_bytes()
    assert available > 0
    assert hold_decision("auto", 2**20, cpu, ranks_on_host=2)[0] is True
    # A part of ~7% of the available memory fits alone, not twice over: all ranks' parts count.
    assert hold_decision("auto", available // 15, cpu, ranks_on_host=1)[0] is True
    assert hold_decision("auto", available // 15, cpu, ranks_on_host=2)[0] is False
    assert hold_decision(True, 3 * 2**20, cpu) == (True, "train.hold_data=true (3 MiB)")
    assert hold_decision(False, 2**20, cpu)[0] is False
