"""How numbers look in tables, consoles and JSON: one formatter and one JSON converter for all of ermgap."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MISSING = "–"


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats with `digits` decimals (tiny non-zero values in 2 significant digits),
    NaN/None as an en dash, anything else as str()."""
    if value is None:
        return MISSING
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return MISSING
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.2g}"
        return f"{value:.{digits}f}"
    return str(value)


def json_safe(obj: Any, *, nan_to_none: bool = True) -> Any:
    """Plain JSON values: numpy/torch scalars to int/float/bool, containers recursively, and NaN/inf
    to None (strict JSON; undefined gaps are null) unless `nan_to_none=False` (Ray reports and
    metrics.json keep NaN, which Python's json reads back as a float)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v, nan_to_none=nan_to_none) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, nan_to_none=nan_to_none) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) or not nan_to_none else None
    if hasattr(obj, "item") and callable(obj.item):  # a 0-d torch tensor or numpy array
        return json_safe(obj.item(), nan_to_none=nan_to_none)
    return obj
