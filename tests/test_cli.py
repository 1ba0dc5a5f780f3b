"""``vaetrain`` as a user runs it (a subprocess per command): Hydra's app machinery (-m sweeps, --cfg, --info,
--help, hydra.run.dir, shell completion), positional shortcuts, the ``_target_`` allowlist against injection
attempts, and every failure in at most two lines of stderr without a traceback. Tiny runs (experiment=tiny, 2 steps)."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vaetrain.cli import COMMANDS, compose
from vaetrain.formats import save_autoencoder
from vaetrain.models.taesd import TAESD

ROOT = Path(__file__).resolve().parents[1]
TINY = ["experiment=tiny", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
        "export=null", "logger=csv"]


def vaetrain(*args, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1",
                    PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
                    **(env or {}))
    for k in ("VAETRAIN_RUN_DIR", "VAETRAIN_DEBUG", "VAETRAIN_ALLOW_TARGETS", "HYDRA_FULL_ERROR"):
        if env is None or k not in env:
            full_env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "vaetrain.cli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_failure(p: subprocess.CompletedProcess, *expect: str) -> str:
    """The command failed with at most two stderr lines, no traceback, the last one naming what ``expect`` says."""
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode != 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr and len(lines) <= 2, p.stderr[-3000:]
    assert all(e in lines[-1] for e in expect), lines
    return lines[-1]


# ---------------------------------------------------------------------------------------------------------------
# Hydra as Hydra
# ---------------------------------------------------------------------------------------------------------------
def test_multirun_sweep_gives_each_job_its_own_run_folder(tmp_path):
    p = vaetrain("train", "-m", *TINY, "run_dir=sweep", "optimizer.lr=1e-3,3e-4", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sweep job 0:" in p.stdout and "sweep job 1:" in p.stdout
    for job, lr in (("0", 1e-3), ("1", 3e-4)):
        run = tmp_path / "sweep" / job
        config = json.loads((run / "config.json").read_text())
        assert config["run_dir"] == str(run) and config["optimizer"]["lr"] == lr
        assert json.loads((run / "result.json").read_text())["steps"] == 2
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    assert (tmp_path / "sweep" / "multirun.yaml").is_file()


def test_hydra_run_dir_is_the_run_folder_and_the_config_is_logged_as_hparams(tmp_path):
    p = vaetrain("train", *TINY, "logger=default", "hydra.run.dir=elsewhere", cwd=tmp_path)  # CSV + wandb offline
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "elsewhere"
    assert json.loads((run / "result.json").read_text())["run_dir"] == str(run)
    assert (run / ".hydra" / "config.yaml").is_file() and not (tmp_path / "runs").exists()
    assert not (tmp_path / "outputs").exists(), "Hydra's default output folder appeared: run_dir is not Hydra's"
    hparams = yaml.safe_load((run / "logs" / "hparams.yaml").read_text())
    assert hparams["trainer"]["max_steps"] == 2 and hparams["run_dir"] == str(run)
    (wandb_run,) = (run / "wandb").glob("offline-run-*/*.wandb")
    assert b"max_steps" in wandb_run.read_bytes() and b"base_channels" in wandb_run.read_bytes(), "no wandb config"


def test_cfg_info_help_and_shell_completion(tmp_path):
    p = vaetrain("train", "experiment=tiny", "--cfg", "job", cwd=tmp_path)
    assert p.returncode == 0 and yaml.safe_load(p.stdout)["student"]["base_channels"] == 8, p.stderr
    p = vaetrain("train", "experiment=tiny", "--info", "defaults", cwd=tmp_path)
    assert p.returncode == 0 and "experiment/tiny" in p.stdout, p.stderr
    p = vaetrain("train", "--help", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    groups = {line.split(":")[0]: line for line in p.stdout.splitlines() if ": " in line}
    assert {"student", "teacher", "loss", "data", "experiment"} <= groups.keys()
    assert "tiny" in groups["experiment"] and "taesd_taef2" in groups["experiment"]
    p = vaetrain("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "vaetrain train experiment=ti"})
    assert p.returncode == 0 and "experiment=tiny" in p.stdout.split(), p.stderr
    assert not list(tmp_path.iterdir()), "a command that only shows things wrote files"


def test_convert_takes_a_positional_list(tmp_path):
    halves = save_autoencoder(TAESD(latent_channels=4, width=8), tmp_path / "src", "taesd", latent_space="sd1")
    enc, dec = sorted(halves.glob("*.safetensors"))[::-1]  # taesd_encoder, taesd_decoder
    p = vaetrain("convert", f"[{enc.name},{dec.name}]", "out", "format=taesd", cwd=halves)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(f.name for f in (halves / "out").iterdir()) == ["taesd_decoder.safetensors",
                                                                 "taesd_encoder.safetensors"]


# ---------------------------------------------------------------------------------------------------------------
# a config cannot run code or write files
# ---------------------------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.fixture
def hostile(tmp_path):
    """A pickle that creates ``PWNED`` when loaded by anything that unpickles."""
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload(tmp_path / "PWNED"), protocol=2))  # torch.save's protocol
    return path


@pytest.mark.parametrize("command, attempt", [
    ("train", ["+callbacks.x._target_=builtins.open", "+callbacks.x.file=CREATED", "+callbacks.x.mode=w"]),
    ("train", ["+callbacks.x._target_=shutil.copyfile", "+callbacks.x.src=evil.pkl", "+callbacks.x.dst=CREATED"]),
    ("train", ["+callbacks.x._target_=numpy.load", "+callbacks.x.file=evil.pkl", "+callbacks.x.allow_pickle=true"]),
    ("train", ["+callbacks.x._target_=torch.load", "+callbacks.x.f=evil.pkl", "+callbacks.x.weights_only=false"]),
    ("train", ["+callbacks.x._target_=vaetrain.commands.train.os.system", "+callbacks.x.command=touch CREATED"]),
    ("train", ["+loss.evil._target_=vaetrain.safe.atomic_write", "+loss.evil.path=CREATED", "+loss.evil.data=x"]),
    ("train", ["_target_=builtins.open", "+file=CREATED", "mode=w"]),
    ("convert", ["evil.pkl", "out", "source={_target_:torch.load,f:evil.pkl,weights_only:false}"]),
    ("convert", ["evil.pkl", "out", "+x._target_=numpy.load", "+x.file=evil.pkl", "+x.allow_pickle=true"]),
    ("convert", ["evil.pkl", "out", "+x._target_=shutil.copyfile", "+x.src=evil.pkl", "+x.dst=CREATED"]),
])
def test_injected_targets_are_refused_before_anything_is_built(tmp_path, hostile, command, attempt):
    before = set(os.listdir(tmp_path))
    p = vaetrain(command, *(TINY if command == "train" else []), *attempt, "run_dir=r", cwd=tmp_path) \
        if command == "train" else vaetrain(command, *attempt, cwd=tmp_path)
    one_line_failure(p, "_target_", "refused")
    assert set(os.listdir(tmp_path)) == before, "the refused config created a file"


def test_allow_targets_extends_the_list_from_the_command_line_or_the_environment_only(tmp_path):
    hook = ["+callbacks.x._target_=test_data_resume.KeyLog", "+callbacks.x._partial_=true", "run_dir=r"]
    one_line_failure(vaetrain("train", *TINY, *hook, cwd=tmp_path), "callbacks.x._target_=test_data_resume.KeyLog")
    p = vaetrain("train", *TINY, *hook, "allow_targets=[test_data_resume.]", cwd=tmp_path)
    assert p.returncode == 0 and len(list((tmp_path / "r" / "keys").glob("*.json"))) == 2, p.stderr[-3000:]
    p = vaetrain("train", *TINY, *hook[:2], "run_dir=r2", cwd=tmp_path, env={"VAETRAIN_ALLOW_TARGETS": "test_data_resume"})
    assert p.returncode == 0, p.stderr[-3000:]


def test_a_pipe_url_needs_the_opt_in_and_a_hostile_resume_is_refused(tmp_path, hostile):
    p = vaetrain("train", *TINY, "run_dir=r", "data=webdataset", f"data.shards='pipe:touch {tmp_path / 'PIPED'}'",
                 cwd=tmp_path)
    one_line_failure(p, "pipe:", "data.allow_pipe=true")
    assert not (tmp_path / "PIPED").exists()
    (tmp_path / "evil.ckpt").write_bytes(hostile.read_bytes())
    line = one_line_failure(vaetrain("train", *TINY, "run_dir=r", "resume=evil.ckpt", cwd=tmp_path), "evil.ckpt")
    assert "refused to unpickle" in line and "weights_only=False" not in line
    assert not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------------------------------------------------------
# every failure in one line
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, expect", [
    (["trainer.max_steps=abc"], ["trainer.max_steps=abc", "integer"]),
    (["data.batch_size=abc"], ["data.batch_size", "abc"]),
    (["loss.mse.weight=abc"], ["loss.mse.weight=abc", "number"]),
    (["data.batch_size=-1"], ["data.batch_size=-1"]),
    (["+trainer.max_stepz=3"], ["trainer.max_stepz", "max_steps"]),
    (["student=nope"], ["student/nope", "kl_tiny"]),
    (["experiment=nope"], ["experiment/nope", "tiny"]),
    (["student=finetune"], ["student.base_channels", "student=finetune"]),
    (["run_dir=afile/run"], ["afile/run", "Not a directory"]),
    (["run_dir=/sys/vaetrain-test/run"], ["/sys/vaetrain-test"]),  # cannot be created, even by root
    (["resume=empty.ckpt"], ["empty.ckpt", "empty"]),
    (["bogus"], ["unexpected argument 'bogus'"]),
])
def test_failures_are_one_line(tmp_path, args, expect):
    (tmp_path / "afile").write_text("")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    one_line_failure(vaetrain("train", *TINY, "run_dir=r", *args, cwd=tmp_path), *expect)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_dir_is_one_line(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    one_line_failure(vaetrain("train", *TINY, "run_dir=ro/run", cwd=tmp_path), "ro/run", "Permission denied")


def test_debug_flag_shows_the_traceback(tmp_path):
    p = vaetrain("train", *TINY, "run_dir=r", "loss.mse.weight=abc", cwd=tmp_path, env={"VAETRAIN_DEBUG": "1"})
    assert p.returncode != 0 and "Traceback" in p.stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_is_set_up_as_a_vaetrain_hydra_app(command):
    """Each command config lists `- hydra_app`: no chdir, no logging setup, no outputs/ folder, vaetrain's help."""
    cfg = compose(COMMANDS[command][0], [], hydra=True)
    assert cfg.hydra.job.chdir is False and cfg.hydra.help.app_name.startswith("vaetrain")
    assert cfg.hydra.job_logging.root is None and cfg.hydra.hydra_logging.root is None
    if command != "train":
        assert cfg.hydra.run.dir == "." and cfg.hydra.output_subdir is None
