"""The ``vaetrain`` command: ``vaetrain SUBCOMMAND [POSITIONAL...] [key=value ...]``.

This is the only layer that knows Hydra. Each subcommand is a config in ``vaetrain/conf/`` whose
``_target_`` is a plain Python function; overrides are Hydra's ``key=value`` syntax, and the
composed config is instantiated (recursively, so teachers, students, losses and data modules
arrive as objects) and the function is called. Functions that take a ``config`` argument also get
the fully resolved config as a plain dict (saved into checkpoints for reproducibility).
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

from lightning.fabric.utilities.seed import seed_everything

from vaetrain.safe import UserError

# name -> (config name, positional argument keys; "+" marks one that takes all remaining positionals)
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


def conf_dir() -> Path:
    """The configs shipped inside the package (``vaetrain/conf``)."""
    return Path(__file__).resolve().parent / "conf"


def assets_dir() -> str:
    """Where the shared real weights/photos live: $VAETRAIN_ASSETS, else ../shared/assets of the repo."""
    return os.environ.get("VAETRAIN_ASSETS", str(Path(__file__).resolve().parents[2] / "shared" / "assets"))


def _usage() -> str:
    lines = ["usage: vaetrain SUBCOMMAND [ARGS...] [key=value ...]", "", "subcommands:"]
    lines += [f"  {name:<14} {doc}" for name, (_, _, doc) in COMMANDS.items()]
    lines += ["", "`vaetrain SUBCOMMAND --help` prints that command's composed config: every key=value it takes."]
    return "\n".join(lines)


def _split(argv: list[str], positional: list[str]) -> list[str]:
    # Hydra's delete syntax (~key) carries no "="
    pos = [a for a in argv if "=" not in a and not a.startswith("~")]
    overrides = [a for a in argv if "=" in a or a.startswith("~")]
    if not positional:
        if pos:
            raise SystemExit(f"vaetrain: unexpected argument {pos[0]!r}; options are key=value")
        return overrides
    out = []
    for i, key in enumerate(positional):
        if key.endswith("+"):
            n_after = len(positional) - i - 1
            take, pos = pos[: len(pos) - n_after], pos[len(pos) - n_after:]
            if not take:
                raise SystemExit(f"vaetrain: missing {key[:-1]}")
            out.append(f"{key[:-1]}=[{','.join(_quote(t) for t in take)}]")
        elif pos:
            out.append(f"{key}={_quote(pos.pop(0))}")
    if pos:
        raise SystemExit(f"vaetrain: unexpected argument {pos[0]!r}")
    return out + overrides


def _quote(v: str) -> str:
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


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


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("assets"):
        OmegaConf.register_new_resolver("assets", lambda p="": str(Path(assets_dir()) / p))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=_group_nulls(overrides))


def run(command: str, argv: list[str]):
    """Compose ``command``'s config with ``argv`` and call its target. Returns the target's result."""
    from hydra.errors import HydraException, InstantiationException
    from hydra.utils import get_method, instantiate
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    config_name, positional, _ = COMMANDS[command]
    want_help = "--help" in argv or "-h" in argv
    argv = [a for a in argv if a not in ("--help", "-h")]
    try:
        cfg = compose(config_name, [a for a in argv if "=" in a] if want_help else _split(argv, positional))
        if want_help:
            print(OmegaConf.to_yaml(cfg))
            return None
        target = get_method(cfg._target_)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        args = OmegaConf.create({k: v for k, v in resolved.items() if k != "_target_"})
        if "seed" in resolved:
            # before anything is built: the student's and discriminator's initial weights come from the seed
            seed_everything(int(resolved["seed"]), workers=True, verbose=False)
        kwargs = instantiate(args, _convert_="all")
    except InstantiationException as e:
        if e.__cause__ is not None and not isinstance(e.__cause__, (HydraException, OmegaConfBaseException)):
            raise e.__cause__ from None
        raise SystemExit(f"vaetrain {command}: config error: {_one_line(e)}") from None
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise SystemExit(f"vaetrain {command}: config error: {_one_line(e)}") from None
    if "config" in inspect.signature(target).parameters:
        kwargs["config"] = resolved
    return target(**kwargs)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:500]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SystemExit(f"vaetrain: unknown subcommand {command!r}\n\n{_usage()}")
    if "--help" in rest or "-h" in rest:
        rest = [a for a in rest if a not in ("--help", "-h")] + ["--help"]
    try:
        run(command, rest)
    except (UserError, FileNotFoundError) as e:
        raise SystemExit(f"vaetrain {command}: {e}{_assets_hint(str(e))}") from None


def _assets_hint(message: str) -> str:
    """What to do when a file the config takes from the shared assets is missing."""
    assets = assets_dir()
    if assets not in message or Path(assets).is_dir():
        return ""
    return (f" (the config reads the shared assets at {assets}, which do not exist: set VAETRAIN_ASSETS=/path/to/assets,"
            f" point the config at your own files, or run `vaetrain train experiment=tiny`, which needs none)")


if __name__ == "__main__":
    main()
