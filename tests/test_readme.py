"""The README stays true: CI runs its test command, every experiment it names exists, and every command of its bash
blocks runs, as written, from a fresh-clone layout (the tracked files in a new folder, ``../shared`` beside it only
where this checkout has it), with step counts shortened through overrides. Commands that need what a fresh machine
here cannot have (the model hub, GPUs, a cluster, the user's own data) are skipped with the reason."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vaetrain.cli import COMMANDS, compose

ROOT = Path(__file__).resolve().parents[1]
README = ROOT.joinpath("README.md").read_text()
SHARED = ROOT.parent / "shared"


def _setup_commands() -> list[str]:
    block = README.split("```")[1]
    return [line.split("#")[0].strip() for line in block.splitlines()[1:] if line.strip()]


def test_ci_runs_the_readme_test_command():
    run, test = _setup_commands()
    assert run.endswith("vaetrain train") and "pytest" in test
    assert test in ROOT.joinpath(".ci/run").read_text().splitlines()[-1]


def test_every_experiment_named_in_the_readme_exists():
    named = set(re.findall(r"experiment=\[?([\w,]+)", README))
    names = {n for group in named for n in group.split(",") if n != "NAME"}
    assert names, "the README names no experiment"
    missing = sorted(n for n in names if not (ROOT / "vaetrain/conf/experiment" / f"{n}.yaml").exists())
    assert not missing, f"README names experiments that do not exist: {missing}"


# ---------------------------------------------------------------------------------------------------------------
# every command block
# ---------------------------------------------------------------------------------------------------------------
def _bash_commands() -> list[tuple[int, str]]:
    """(block number, command) for each command line of the README's bash blocks (continuations joined)."""
    out = []
    for i, block in enumerate(re.findall(r"```bash\n(.*?)```", README, flags=re.S)):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append((i, line))
    return out


# substring -> why the command cannot run here
SKIP = {"pip install": "installs the package into a venv: .ci/run does that",
        "pytest": "the test suite itself: .ci/run runs it",
        "torchrun": "needs several nodes with GPUs", "srun ": "needs a SLURM cluster", "trainer=gpu": "needs GPUs",
        "...": "a placeholder for the user's data", "/data/": "a placeholder for the user's data",
        "/my/photos": "a placeholder for the user's photos", "[discriminator": "an optional part, shown in brackets",
        "stabilityai/": "downloads from the model hub (offline here)", "vaetrain push": "uploads to the model hub",
        "scripts/bench_": "a benchmark (minutes)", "runs/x/": "reads the user's own run runs/x",
        "runs/taesd/": "reads the user's own run runs/taesd",
        "runs/sdxl_fp16/": "reads the fp16-fix run above (its SDXL teacher is on the model hub)",
        "runs/taesdxl_96": "continues the TAESD-SDXL run above (its SDXL teacher is on the model hub)"}
# what makes each subcommand quick; the command's own values come after these and win where they repeat a key
SHORT = {"train": ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                   "callbacks.checkpoint.every_n_steps=2", "trainer.enable_progress_bar=false", "logger=csv"],
         "shards": ["max_samples=4"], "cache-latents": ["max_samples=32", "data.batch_size=8"]}
WEIGHTS = re.compile(r"[\w./-]+\.(?:pth|safetensors|ckpt|pt)\b")


def _hub_teacher(command: str, args: list[str]) -> str | None:
    """The teacher a train / cache-latents command would download, if any."""
    groups = [a for a in args if a.split("=")[0].split("@")[0] in ("experiment", "teacher")]
    cfg = compose(COMMANDS[command][0], groups)
    for key in ("teacher", "teacher_b"):
        t = cfg.get(key)
        if t is not None and t.get("source") is None and t.get("preset"):
            return f"{key}={t.get('preset')}"
    return None


@pytest.fixture(scope="module")
def clones(tmp_path_factory):
    """One fresh-clone layout per bash block: the tracked files of this checkout, ../shared beside them if here."""
    made = {}

    def clone(block: int) -> Path:
        if block not in made:
            base = tmp_path_factory.mktemp(f"block{block}")
            files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                                   text=True, check=True).stdout.split("\n")
            for f in filter(None, files):
                if (ROOT / f).is_file():
                    (base / "clone" / f).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / f, base / "clone" / f)
            if SHARED.is_dir():
                (base / "shared").symlink_to(SHARED)
            made[block] = base / "clone"
        return made[block]

    return clone


@pytest.mark.parametrize("block, line", _bash_commands(), ids=lambda v: re.sub(r"\W+", "_", str(v))[:60])
def test_readme_command_runs(clones, block, line):
    reason = next((why for mark, why in SKIP.items() if mark in line), None)
    if reason:
        pytest.skip(f"{line[:80]}: {reason}")
    words = shlex.split(line)
    assert words[0] == "vaetrain", f"a README command this test does not know how to run: {line}"
    command, args = words[1], words[2:]
    if command in ("train", "cache-latents") and (hub := _hub_teacher(command, args)):
        pytest.skip(f"{line[:80]}: its {hub} downloads from the model hub (offline here)")
    clone = clones(block)
    for token in WEIGHTS.findall(line):  # weight files named bare: the shared assets' copies, if there are any
        if not (clone / token).exists():
            found = SHARED / "assets" / "weights" / Path(token).name
            if not found.exists():
                pytest.skip(f"{line[:80]}: needs {token}, a download")
            (clone / token).symlink_to(found)
    if "../shared" in line and not SHARED.is_dir():
        pytest.skip(f"{line[:80]}: reads ../shared/assets, not beside this checkout")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAETRAIN_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONPATH=str(clone))
    p = subprocess.run([sys.executable, "-m", "vaetrain.cli", command, *SHORT.get(command, []), *args], cwd=clone,
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{line}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
