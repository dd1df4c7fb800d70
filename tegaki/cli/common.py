"""What several commands share: a flag's default, read from the library function the flag feeds.

A default is written once, in the library; the command reads it from there with `default_of`, so
`tegaki trace --top` and `trace(top_k=...)` cannot disagree.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def default_of(function: Callable, parameter: str) -> Any:
    """The default value of one parameter of a library function."""
    default = inspect.signature(function).parameters[parameter].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{function.__qualname__}({parameter}) has no default to offer a flag")
    return default
