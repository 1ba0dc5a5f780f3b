"""The README stays true: CI runs its test command, and every experiment it names exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    block = ROOT.joinpath("README.md").read_text().split("```")[1]
    return [line.split("#")[0].strip() for line in block.splitlines()[1:] if line.strip()]


def test_ci_runs_the_readme_test_command():
    run, test = _setup_commands()
    assert run.endswith("vaetrain train") and "pytest" in test
    assert test in ROOT.joinpath(".ci/run").read_text()


def test_every_experiment_named_in_the_readme_exists():
    text = ROOT.joinpath("README.md").read_text()
    named = set(re.findall(r"experiment=\[?([\w,]+)", text))
    names = {n for group in named for n in group.split(",") if n != "NAME"}
    assert names, "the README names no experiment"
    missing = sorted(n for n in names if not (ROOT / "vaetrain/conf/experiment" / f"{n}.yaml").exists())
    assert not missing, f"README names experiments that do not exist: {missing}"
