from pathlib import Path

import pytest
from pydantic import ValidationError

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
    with pytest.raises(ValidationError, match="frozen"):
        cfg.output_root = "elsewhere"


def test_shuffle_and_materialize_take_their_choices_and_auto_materializes_what_fits(ray_cluster):
    from dlbatch.ingest import materialize_decision, preprocessed_bytes

    defaults = JobConfig().image.train
    assert (defaults.shuffle, defaults.materialize) == ("global", "auto")
    on = load_config(None, ["image.train.materialize=on", "text.train.shuffle=files"])
    assert (on.image.train.materialize, on.text.train.shuffle) == (True, "files")
    with pytest.raises(ConfigError, match=r"image\.train\.materialize"):
        load_config(None, ["image.train.materialize=sometimes"])
    with pytest.raises(ConfigError, match=r"text\.train\.shuffle"):
        load_config(None, ["text.train.shuffle=blocks"])

    store = ray_cluster.cluster_resources()["object_store_memory"]
    per_row = preprocessed_bytes(JobConfig().image, 1)
    assert per_row >= 28 * 28  # uint8 pixels at least
    assert materialize_decision("auto", int(0.4 * store))[0] is True
    assert materialize_decision("auto", int(0.6 * store))[0] is False
    assert materialize_decision(False, 1)[0] is False
    assert materialize_decision(True, 10 * store) == (
        True,
        f"train.materialize=true (~{10 * store / 2**20:,.0f} MiB preprocessed)",
    )


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("image.height=64", "; did you mean image.image.height?"),
        ("text.max_length=128", "; did you mean text.text.max_length?"),
        ("image.lr=0.001", "; did you mean image.train.lr?"),
        ("image.train.epoch=5", "; did you mean image.train.epochs?"),
        ("epochs=5", "; did you mean image.train.epochs or text.train.epochs?"),
        ("no_such_key=1", ""),
    ],
)
def test_an_unknown_key_suggests_the_field_meant(override, hint):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    key = override.split("=")[0]
    assert str(err.value) == f"defaults + overrides: {key}: Extra inputs are not permitted{hint}"
