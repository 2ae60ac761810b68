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
