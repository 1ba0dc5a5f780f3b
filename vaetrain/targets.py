"""Which ``_target_``s a config may name: a config shared by someone else must not be able to run code.

Hydra's ``instantiate`` calls whatever a ``_target_`` names (``builtins.open``, ``shutil.copyfile``,
``numpy.load`` with ``allow_pickle``, ``torch.load`` with ``weights_only=False``...). Before anything is built, every
``_target_`` of the composed config (nested ones, inside lists too) is checked twice:

1. as written, before anything is imported (importing a module runs its code): it must lie under an allowed prefix;
2. as located: the object's own ``__module__.__qualname__`` must be allowed too, so that a path through an allowed
   module (``vaetrain.commands.train.os.system``, ``vaetrain.formats.loading.torch.load``) cannot reach the rest.

vaetrain's own part of the list holds classes only (its models, losses, data module, callbacks and loggers), plus the
model readers; its writers and commands are not on it. The command's own (top-level) target must be a vaetrain
command. The user extends the list for trusted setups only from the command line (``allow_targets=[mypkg.]``) or the
environment (``VAETRAIN_ALLOW_TARGETS=mypkg.,other.``), never from a config file: an experiment cannot widen its
own permissions.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

from hydra.utils import get_object

from vaetrain.safe import UserError

ENV = "VAETRAIN_ALLOW_TARGETS"

# classes under these may be built
CLASS_PREFIXES = ("vaetrain.models.", "vaetrain.losses.", "vaetrain.data.", "vaetrain.engine.", "torch.optim.",
                  "lightning.pytorch.loggers.", "lightning.pytorch.callbacks.")
# functions that may be called (as written, and as located)
FUNCTIONS = ("vaetrain.formats.load_autoencoder", "vaetrain.formats.loading.load_autoencoder",
             "vaetrain.formats.load_weights", "vaetrain.formats.loading.load_weights")
# classes under the prefixes above that write where they are told to
DENIED = ("vaetrain.data.tars.ShardWriter",)
COMMANDS = "vaetrain.commands."


def user_prefixes(option: Iterable[str] = ()) -> tuple[str, ...]:
    """The prefixes the user trusts: ``allow_targets=[...]`` plus ``$VAETRAIN_ALLOW_TARGETS`` (comma-separated)."""
    env = [p.strip() for p in os.environ.get(ENV, "").split(",")]
    return tuple(p for p in [*option, *env] if p)


def walk_targets(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """``(config key, target)`` for every ``_target_`` in a plain (resolved) config, depth first."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield key or "_target_", node["_target_"]
        for k, v in node.items():
            if k != "_target_":
                yield from walk_targets(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from walk_targets(v, f"{key}[{i}]")


def _under(name: str, prefixes: Iterable[str]) -> bool:
    # "mypkg." and "mypkg" both mean the package mypkg and what is inside it, never "mypkgevil"
    return any(name == p.rstrip(".") or name.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


def _written_ok(target: str, extra: tuple[str, ...]) -> bool:
    return (_under(target, CLASS_PREFIXES) or target in FUNCTIONS or _under(target, extra)) \
        and not _under(target, DENIED)


def _located_ok(obj: Any, extra: tuple[str, ...]) -> tuple[bool, str]:
    name = f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', None)}"
    if _under(name, extra):
        return True, name
    if _under(name, DENIED):
        return False, name
    return (isinstance(obj, type) and _under(name, CLASS_PREFIXES)) or name in FUNCTIONS, name


def check_targets(config: dict, extra: tuple[str, ...] = ()) -> None:
    """Raise a one-line :class:`UserError` naming the first key whose ``_target_`` is not allowed."""
    hint = f"allow_targets=[PREFIX.] or {ENV}=PREFIX. if you trust it"
    for key, target in walk_targets(config):
        where = f"{key}._target_" if key != "_target_" else key
        if not isinstance(target, str) or not target.replace(".", "").replace("_", "").isalnum():
            raise UserError(f"{where}={target!r}: not a dotted Python name; refused")
        top = key == "_target_"
        if top and not _under(target, (COMMANDS,)):
            raise UserError(f"{where}={target}: a command's target must be a vaetrain command ({COMMANDS}...); refused")
        if not top and not _written_ok(target, extra):
            raise UserError(f"{where}={target}: not an allowed target (vaetrain's models, losses, data, engine and "
                            f"loaders, torch.optim, Lightning loggers/callbacks); refused, nothing was built ({hint})")
        try:
            obj = get_object(target)
        except Exception as e:  # an import error of the user's own module, or a name that is not there
            raise UserError(f"{where}={target}: cannot be imported ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]})") from None
        ok, name = _located_ok(obj, extra)
        if top:
            ok = callable(obj) and _under(name, (COMMANDS,))
        if not ok:
            raise UserError(f"{where}={target}: is {name}, which is not an allowed target; refused, nothing was "
                            f"built ({hint})")


# Hydra's own part of the config (hydra.*) names objects too: its callbacks, launcher and sweeper (Hydra and its
# plugins: hydra-submitit-launcher, optuna...) and the logging handlers, formatters and filters it configures
HYDRA_PREFIXES = ("hydra.", "hydra_plugins.")
LOGGING_PREFIXES = ("logging.",)


def check_hydra_targets(hydra: dict, extra: tuple[str, ...] = ()) -> None:
    """Raise a one-line :class:`UserError` for an object in ``hydra.*`` that is not Hydra's, a plugin's or a
    logging class (nothing of it is built yet: Hydra builds its callbacks before running anything)."""
    for part in ("callbacks", "launcher", "sweeper"):
        for key, target in walk_targets(hydra.get(part) or {}, f"hydra.{part}"):
            name = target if isinstance(target, str) else repr(target)
            ok = isinstance(target, str) and _under(target, HYDRA_PREFIXES + extra)
            if ok:
                obj = get_object(target)
                ok = _under(f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', None)}",
                            HYDRA_PREFIXES + extra)
            if not ok:
                raise UserError(f"{key}._target_={name}: not Hydra's or a Hydra plugin's; refused, nothing was built")
    for part in ("job_logging", "hydra_logging"):
        for kind, entries in (hydra.get(part) or {}).items():
            for name, entry in (entries.items() if isinstance(entries, dict) else []):
                for field in ("()", "class"):
                    value = entry.get(field) if isinstance(entry, dict) else None
                    if value is not None and not (isinstance(value, str) and _under(value, LOGGING_PREFIXES + extra)):
                        raise UserError(f"hydra.{part}.{kind}.{name}.{field}={value}: not a logging class; refused")
