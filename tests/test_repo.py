"""The promises a newcomer relies on: README's commands are what CI runs, and the jobs stay thin."""

from pathlib import Path

REPO = Path(__file__).parents[1]


def _readme_commands() -> list[str]:
    lines = (REPO / "README.md").read_text().splitlines()
    return [line for line in lines if line.startswith("python3 -m venv")]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2
    demo, tests = commands
    assert demo.endswith("python jobs/nightly.py")
    assert tests.endswith("pytest")
    assert tests in (REPO / ".ci" / "run").read_text()


def test_jobs_are_thin():
    for job in (REPO / "jobs").glob("*.py"):
        assert len(job.read_text().splitlines()) < 80, job


def test_the_documented_short_bench_command_runs_after_the_test_install(tmp_path):
    """`cd bench && python tokenizer_speed.py` as the README gives it (fewer rows, output elsewhere)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "speed.json"
    done = subprocess.run(
        [sys.executable, "tokenizer_speed.py", "--rows", "3000", "--out", str(out)],
        cwd=REPO / "bench", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    for language in ("english", "chinese"):
        assert results[language]["rows"] == 3000
        assert results[language]["subword_rows_per_s"] > 0 and results[language]["regex_rows_per_s"] > 0
    assert "english" in done.stdout and "chinese" in done.stdout


def test_the_readmes_own_data_config_is_a_valid_config():
    import re

    import yaml

    from dlbatch.config import build_config

    own_data, backbone = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    cfg = build_config(yaml.safe_load(own_data), "README")
    assert cfg.tasks == ("text",) and cfg.text.data.passthrough_columns == ("text",)
    assert cfg.text.predict.gpus_per_actor == 1
    tuned = build_config(yaml.safe_load(backbone), "README").image  # the fine-tuning example
    assert tuned.model.arch == "resnet" and tuned.model.freeze_epochs == 1 and tuned.image.channels == 3
