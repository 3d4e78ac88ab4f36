"""Field checks shared by every frozen config: one message format, naming the field.

check = validate.checker("ModelConfig")
check(d_model >= 1, "d_model", d_model, "must be an integer >= 1")
# ValueError: ModelConfig.d_model=0 is invalid: must be an integer >= 1
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np


def field_error(owner: str, field: str, value, allowed: str) -> ValueError:
    """ValueError("<owner>.<field>=<value> is invalid: <allowed>")."""
    return ValueError(f"{owner}.{field}={value!r} is invalid: {allowed}")


def checker(owner: str) -> Callable[[bool, str, object, str], None]:
    """check(ok, field, value, allowed): raise field_error(owner, ...) unless ok."""

    def check(ok: bool, field: str, value, allowed: str) -> None:
        if not ok:
            raise field_error(owner, field, value, allowed)

    return check


def is_int(v) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def is_pos_int(v) -> bool:
    return is_int(v) and v >= 1


NOT_FINITE = "must be a finite number (not NaN or inf)"


def is_nonfinite_float(v) -> bool:
    """A float that is NaN or infinite: such a value passes every `<` / `>` range check."""
    return isinstance(v, float | np.floating) and not math.isfinite(v)


def check_finite_floats(owner: str, obj, prefix: str = "") -> None:
    """Raise field_error(owner, prefix + name) for the first NaN / infinite float field of the
    dataclass `obj`."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if is_nonfinite_float(v):
            raise field_error(owner, prefix + f.name, v, NOT_FINITE)
