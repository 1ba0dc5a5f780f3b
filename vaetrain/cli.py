"""The ``vaetrain`` command: ``vaetrain SUBCOMMAND [POSITIONAL...] [key=value ...] [Hydra flags]``.

This is the only layer that knows Hydra. Each subcommand is a Hydra application run by Hydra's own machinery
(``_run_hydra``, what ``@hydra.main`` calls) on a config of ``vaetrain/conf/`` (found as ``pkg://vaetrain.conf``, so
an installed wheel runs from any folder), so ``-m`` sweeps, ``--cfg``, ``--info``, ``--help``,
``--shell-completion``, ``hydra.run.dir`` / ``hydra.sweep.dir`` and launcher plugins work as in any Hydra app. The
job: every ``_target_`` is checked against the allowlist (``vaetrain.targets``) and every keyword against what
its callable takes (``vaetrain.arguments``), the seed is set, then the composed config is instantiated (teachers,
students, losses, data modules arrive as objects) and the subcommand's function is called; functions that take a
``config`` argument also get the resolved config as a plain dict. Any failure is one line on stderr
(``VAETRAIN_DEBUG=1``: the traceback).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose, initialize_config_module, version
from hydra._internal.utils import _run_hydra, get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, InstantiationException
from hydra.utils import get_method, get_object, instantiate
from lightning.fabric.utilities.seed import seed_everything
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from vaetrain.arguments import check_call
from vaetrain.data.embedded import photos_dir
from vaetrain.formats import ExportWarning
from vaetrain.safe import UserError, one_line
from vaetrain.targets import check_hydra_targets, check_targets, user_prefixes, walk_targets

# name -> (config name, positional argument keys; "+" marks one that takes all remaining positionals, help line).
# A new subcommand: a function in vaetrain/commands/, a config in vaetrain/conf/ whose `_target_` names it and whose
# defaults list `- hydra_app`, and a line here.
COMMANDS: dict[str, tuple[str, list[str], str]] = {
    "train": ("train", [], "train an autoencoder (teacher/student/losses/data from conf/)"),
    "convert": ("convert", ["source", "out"], "convert a checkpoint between formats (format=diffusers|original|taesd)"),
    "push": ("push", ["source", "repo_id"], "upload an export to the Hugging Face hub with a model card"),
    "eval": ("eval", [], "PSNR/SSIM/LPIPS of a model on an image folder, against ground truth and a teacher"),
    "shards": ("shards", ["inputs+", "output"], "pack image folders into WebDataset shards"),
    "cache-latents": ("cache_latents", [], "encode a dataset once with the teacher into latent shards"),
    "audit-fp16": ("audit_fp16", ["source"], "per-layer activation maxima and fp16 safety of a model"),
    "fp16-fix": ("fp16_fix", ["source", "out"], "rescale a KL autoencoder exactly so its activations fit fp16"),
    "latent-stats": ("latent_stats", [], "measure a model's latent statistics and suggest scale/shift"),
}

CONFIG_PATH = "pkg://vaetrain.conf"
DEBUG_ENV = "VAETRAIN_DEBUG"

# third-party noise every run printed: deprecations inside torchvision / Lightning, not the user's doing
_WARNINGS = [(UserWarning, r"The parameter 'pretrained' is deprecated"),
             (UserWarning, r"Arguments other than a weight enum or `None` for 'weights' are deprecated"),
             (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
             (UserWarning, r"Detected pickle protocol"),  # torch's, before its safe unpickler refuses a file
             (DeprecationWarning, r".*"),
             (ExportWarning, r".*")]  # vaetrain's own: its logger has printed the same line already
_LOG_NOISE = ("Tip: For seamless cloud logging",)


def conf_dir() -> Path:
    """The configs shipped inside the package (``vaetrain/conf``)."""
    return Path(__file__).resolve().parent / "conf"


def assets_dir() -> str:
    """Where the shared real weights/photos live: $VAETRAIN_ASSETS, else ../shared/assets of the repo."""
    return os.environ.get("VAETRAIN_ASSETS", str(Path(__file__).resolve().parents[2] / "shared" / "assets"))


def _usage() -> str:
    lines = ["usage: vaetrain SUBCOMMAND [ARGS...] [key=value ...] [-m] [--cfg job] [--info] [--help]", "",
             "subcommands:"]
    lines += [f"  {name:<14} {doc}" for name, (_, _, doc) in COMMANDS.items()]
    lines += ["", "`vaetrain SUBCOMMAND --help` lists its config groups and prints its composed config."]
    return "\n".join(lines)


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def _quiet_third_parties() -> None:
    for category, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not any(n in str(record.msg) for n in _LOG_NOISE)

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_Drop())
    # Lightning's progress notes ("GPU available: ...") are information, not errors: stdout, so that stderr holds
    # only what went wrong
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                handler.setStream(sys.stdout)


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("assets"):
        OmegaConf.register_new_resolver("assets", lambda p="": str(Path(assets_dir()) / p))
    if not OmegaConf.has_resolver("photos"):
        OmegaConf.register_new_resolver("photos", photos_dir)


# ---------------------------------------------------------------------------------------------------------------
# argv -> Hydra overrides
# ---------------------------------------------------------------------------------------------------------------
def _value(v: str) -> str:
    """A positional argument as a Hydra value: quoted (paths may hold Hydra syntax), or a list of quoted items."""
    if v.startswith("[") and v.endswith("]"):
        return "[" + ",".join(_quote(i.strip()) for i in v[1:-1].split(",") if i.strip()) + "]"
    return _quote(v)


def _quote(v: str) -> str:
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _is_override(a: str) -> bool:
    return "=" in a or a.startswith("~")  # Hydra's delete syntax (~key) carries no "="


def _positionals(command: str, argv: list[str], positional: list[str]) -> list[str]:
    """Positional shortcuts (``convert SRC OUT``, ``shards IN... OUT``) as overrides, in front of the others."""
    pos = [a for a in argv if not _is_override(a)]
    overrides = [a for a in argv if _is_override(a)]
    out = []
    for i, key in enumerate(positional):
        if key.endswith("+"):
            n_after = len(positional) - i - 1
            take, pos = pos[: len(pos) - n_after], pos[len(pos) - n_after:]
            if not take:
                raise UserError(f"missing {key[:-1]}")
            out.append(f"{key[:-1]}=[{','.join(_quote(t) for t in take)}]")
        elif pos:
            out.append(f"{key}={_value(pos.pop(0))}")
    if pos:
        raise UserError(f"unexpected argument {pos[0]!r}; options are key=value"
                        + (f" (positional: {' '.join(k.upper().rstrip('+') for k in positional)})" if positional
                           else ""))
    return out + overrides


def _group_nulls(overrides: list[str]) -> list[str]:
    """``group=null`` (e.g. ``discriminator=null``) -> Hydra's ``~group``, which removes the group's config."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        group = key.split("@")[0].lstrip("+")
        if value in ("null", "None") and (conf_dir() / group).is_dir():
            o = "~" + key.lstrip("+")
        out.append(o)
    return out


def _allow_option(argv: list[str]) -> tuple[list[str], tuple[str, ...]]:
    """``allow_targets=[a.,b.]`` is an option of the command line, not a config key: no config file can set it."""
    rest, extra = [], []
    for a in argv:
        if a.startswith("allow_targets="):
            extra += [p.strip().strip("'\"") for p in a.partition("=")[2].strip("[]").split(",") if p.strip()]
        else:
            rest.append(a)
    return rest, tuple(extra)


def compose(config_name: str, overrides: list[str], hydra: bool = False) -> DictConfig:
    """The composed config of a subcommand, without running it (Hydra's compose API, same configs)."""
    _register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="vaetrain.conf", version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=_group_nulls(overrides), return_hydra_config=hydra)
    finally:
        GlobalHydra.instance().clear()


def _precheck(config_name: str, overrides: list[str], extra: tuple[str, ...]) -> None:
    """The allowlist before Hydra starts: Hydra builds its own callbacks and creates the output folder before the
    job runs. Swept values (``-m a=1,2``) are checked again in each job."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    cfg = compose(config_name, [o.input_line for o in parsed if not o.is_sweep_override()], hydra=True)
    check_hydra_targets(OmegaConf.to_container(cfg.hydra, resolve=False), extra)
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:
        return  # interpolations that need the job (${hydra:...}): the job checks again, before building anything
    check_targets(resolved, extra)


# ---------------------------------------------------------------------------------------------------------------
# the job Hydra runs
# ---------------------------------------------------------------------------------------------------------------
class _Job:
    """Hydra's task function for one subcommand; keeps the last job's result for :func:`run`."""

    def __init__(self, command: str, extra_targets: tuple[str, ...]):
        self.command, self.extra, self.result = command, extra_targets, None

    def __call__(self, cfg: DictConfig) -> Any:
        try:
            self.result = self._run(cfg)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as e:
            if _debug():
                raise
            raise SystemExit(_failure(self.command, e)) from None
        return self.result

    def _run(self, cfg: DictConfig) -> Any:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            print(f"vaetrain {self.command}: sweep job {hydra_cfg.job.num}: {' '.join(hydra_cfg.overrides.task)}",
                  flush=True)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if "run_dir" in resolved:  # Hydra's output folder is the run folder (under -m: this job's own)
            resolved["run_dir"] = hydra_cfg.runtime.output_dir
        check_targets(resolved, self.extra)
        # instantiate re-reads the values: a resolved string that is itself an interpolation must not slip by
        again = OmegaConf.to_container(OmegaConf.create(resolved), resolve=True)
        if list(walk_targets(again)) != list(walk_targets(resolved)):
            raise UserError("a _target_ changes when its resolved config is read again (an interpolation in a value); "
                            "refused")
        target = get_method(resolved["_target_"])
        args = {k: v for k, v in resolved.items() if k != "_target_"}
        _check_arguments(target, args, dict(hydra_cfg.runtime.choices))
        if "seed" in resolved:
            # before anything is built: the student's and discriminator's initial weights come from the seed
            seed_everything(int(resolved["seed"]), workers=True, verbose=False)
        kwargs = instantiate(OmegaConf.create(args), _convert_="all")
        if "config" in inspect.signature(target).parameters:
            kwargs["config"] = resolved
        return target(**kwargs)


def _check_arguments(target, args: dict, choices: dict) -> None:
    """Every keyword of the command and of each ``_target_`` node against its callable, before anything is built."""
    check_call(target, {k: v for k, v in args.items() if k != "config"})
    stack = [(k, v) for k, v in args.items()]
    while stack:
        key, node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                group = key.split(".")[0].split("[")[0]
                context = f"{group}={choices[group]}" if choices.get(group) else ""
                check_call(get_object(node["_target_"]), {k: v for k, v in node.items() if k != "_target_"},
                           key, context)
            stack += [(f"{key}.{k}", v) for k, v in node.items()]
        elif isinstance(node, list):
            stack += [(f"{key}[{i}]", v) for i, v in enumerate(node)]


def _failure(command: str, e: BaseException) -> str:
    """``e`` as the one line the user sees."""
    prefix = f"vaetrain {command}:"
    if isinstance(e, InstantiationException) and e.__cause__ is not None \
            and not isinstance(e.__cause__, (HydraException, OmegaConfBaseException)):
        return _failure(command, e.__cause__)
    if isinstance(e, UserError) or isinstance(e, FileNotFoundError) and not e.filename:
        return f"{prefix} {one_line(e)}{_assets_hint(str(e))}"
    if isinstance(e, OSError) and (e.filename or e.strerror):
        return f"{prefix} {e.filename}: {e.strerror or one_line(e)}{_assets_hint(str(e.filename))}"
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        # Hydra's "Could not find 'group/option'" lists the options over lines and ends with its search path
        text = str(e).split("\nConfig search path:")[0]
        head, _, options = text.partition("\n\nAvailable options in")
        if options:
            group, _, names = options.partition(":")
            head = f"{one_line(head)}; available in{group}: {', '.join(names.split())}"
        return f"{prefix} config error: {one_line(head)}"
    if isinstance(e, KeyboardInterrupt):
        return f"{prefix} interrupted"
    return f"{prefix} {type(e).__name__}: {one_line(e, 400)} ({DEBUG_ENV}=1 shows the traceback)"


def _assets_hint(message: str) -> str:
    """What to do when a file the config takes from the shared assets is missing."""
    assets = assets_dir()
    if assets not in message or Path(assets).is_dir():
        return ""
    return (f" (the config reads the shared assets at {assets}, which do not exist: set VAETRAIN_ASSETS=/path/to/assets,"
            f" point the config at your own files, or run `vaetrain train experiment=tiny`, which needs none)")


# ---------------------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------------------
def run(command: str, argv: list[str]) -> Any:
    """Run ``vaetrain COMMAND *argv`` in this process through Hydra; returns the (last) job's result."""
    config_name, positional, _ = COMMANDS[command]
    argv, extra = _allow_option(list(argv))
    parser = get_args_parser()
    parser.prog = f"vaetrain {command}"
    args = parser.parse_intermixed_args(argv)
    # the job's name (Lightning's DDP re-launch appends its own, which then wins)
    args.overrides = [f"hydra.job.name={config_name}"] + _group_nulls(_positionals(command, args.overrides, positional))
    job = _Job(command, user_prefixes(extra))
    _register_resolvers()
    if not (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion):
        _precheck(config_name, args.overrides, job.extra)
    version.setbase("1.3")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; the one-line report is ours
    _run_hydra(args=args, args_parser=parser, task_function=job, config_path=CONFIG_PATH, config_name=config_name)
    return job.result


def _completion_query(argv: list[str]) -> tuple[str, list[str]] | None:
    """Hydra's shell completion calls ``vaetrain -sc query=SHELL`` with the line typed so far in ``$COMP_LINE``:
    complete the subcommand itself, or hand the line without it to that subcommand's Hydra app."""
    if argv[:1] not in (["-sc"], ["--shell-completion"]) or not any(a.startswith("query=") for a in argv):
        return None
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    if len(words) < 2 or words[1] not in COMMANDS or len(words) == 2 and not line.endswith(" "):
        typed = words[1] if len(words) > 1 else ""
        print(" ".join(c for c in COMMANDS if c.startswith(typed)))
        return "", []
    os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]]) + (" " if line.endswith(" ") else "")
    return words[1], argv


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    query = _completion_query(argv)
    if query is not None:
        if query[0]:
            run(*query)
        return
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SystemExit(f"vaetrain: unknown subcommand {command!r}\n\n{_usage()}")
    _quiet_third_parties()
    try:
        run(command, rest)
    except SystemExit:
        raise
    except BrokenPipeError:  # `vaetrain train --cfg job | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None
    except BaseException as e:
        if _debug():
            raise
        raise SystemExit(_failure(command, e)) from None


if __name__ == "__main__":
    main()
