"""The checks the typed configs share.

The configs (`DatasetConfig`, `SamplerConfig`, `TrainConfig` and its sections,
`MemoryConfig`) are dataclasses with one convention: `validate()` raises a `ValueError`
(subclass) that names the setting and returns the config, so ``Config(...).validate()``
reads as one expression; `from_dict` refuses unknown keys by name (`reject_unknown_keys`).

NaN compares false with everything, so a bare ``if value <= 0: fail`` lets it through (and
ComfyUI's min/max checks do too); `check_number` states what is allowed instead and refuses
everything else: ``lora_alpha must be a finite number > 0, got nan``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any


def reject_unknown_keys(cls: type, data: Mapping[str, Any], error: type[Exception], what: str) -> None:
    """Raise `error` naming every key of `data` that is not a field of the dataclass `cls`,
    e.g. ``unknown dataset settings: fps, size``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise error(f"unknown {what}: {', '.join(unknown)}")


def _bound(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, integer: bool = False, hint: str = "",
                 error: type[Exception] = ValueError) -> None:
    """Raise `error` unless `value` is a finite number (an int when `integer`) within
    [low, high] (`low_open` / `high_open` exclude the bound; None: unbounded). `hint` follows
    the range in the message, e.g. "(0 = never)"."""
    if integer:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    if low is not None and high is not None:
        span = f" in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}{')' if high_open else ']'}"
    elif low is not None:
        span = f" {'>' if low_open else '>='} {_bound(low)}"
    elif high is not None:
        span = f" {'<' if high_open else '<='} {_bound(high)}"
    else:
        span = ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        shown = repr(value)
    else:
        shown = repr(int(value) if isinstance(value, numbers.Integral) else float(value))
    kind = "an integer" if integer else "a finite number"
    raise error(f"{name} must be {kind}{span}{' ' + hint if hint else ''}, got {shown}")
