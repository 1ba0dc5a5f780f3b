"""Keyword arguments from a config checked against what the callable takes, so that a typo or a wrong type fails in
one line naming the config key and the value (``trainer.max_steps=abc``, ``+trainer.max_stepz=3``,
``loss.mse.weight=abc``) before anything is built, instead of a TypeError deep inside a library.

Only plain annotations are checked (int, float, bool, str, None, ``Literal`` and unions of them); anything else is
left to the callable.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from typing import Any, Callable, Literal, Mapping

from vaetrain.safe import UserError

_SIMPLE = (int, float, bool, str, type(None))


def _kinds(annotation: Any) -> list | None:
    """The simple types / Literal values an annotation allows, or None when it is not made of simple parts."""
    if annotation is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [_kinds(a) for a in typing.get_args(annotation)]
        return None if any(p is None for p in parts) else [k for p in parts for k in p]
    if origin is Literal:
        return [("literal", v) for v in typing.get_args(annotation)]
    return [annotation] if annotation in _SIMPLE else None


def _fits(value: Any, kinds: list) -> bool:
    if value is None or not isinstance(value, (str, int, float, bool)):
        return True  # None means "the default"; objects and containers are the callable's business
    for k in kinds:
        if isinstance(k, tuple):
            if value == k[1] and type(value) is type(k[1]):
                return True
        elif k is str and isinstance(value, str):
            return True
        elif k is bool and isinstance(value, bool):
            return True
        elif k is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        elif k is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
    return False


def _expected(kinds: list) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    return " or ".join(dict.fromkeys(repr(k[1]) if isinstance(k, tuple) else names[k] for k in kinds))


def _name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', getattr(fn, '__name__', '?'))}"


def check_call(fn: Callable, kwargs: Mapping[str, Any], where: str = "", context: str = "") -> None:
    """Raise a one-line :class:`UserError` if ``fn(**kwargs)`` would get a key it does not take or a value of a
    plainly wrong type. ``where`` is the config key of ``kwargs`` (``trainer``), ``context`` a note for the message."""
    try:
        params = inspect.signature(fn, eval_str=True).parameters
    except (NameError, TypeError, ValueError, SyntaxError):
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    note = f" ({context})" if context else ""
    for key, value in kwargs.items():
        if key.startswith("_") and key.endswith("_"):
            continue  # Hydra's own keys (_partial_, _args_...)
        full = f"{where}.{key}" if where else key
        if key not in named:
            if takes_any:
                continue
            close = difflib.get_close_matches(key, named, n=1)
            hint = f"; did you mean {where + '.' if where else ''}{close[0]}?" if close else ""
            if context and not close:  # e.g. an experiment's student settings left on another student
                hint = f"; set by another config for another choice? drop it with ~{full}"
            raise UserError(f"{full}: not an option of {_name(fn)}{note}{hint}")
        kinds = _kinds(params[key].annotation)
        if kinds and not _fits(value, kinds):
            raise UserError(f"{full}={value}: expected {_expected(kinds)}{note}")
