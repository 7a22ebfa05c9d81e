"""Strict JSON for metric records that may hold NaN or infinity.

Python's json writes NaN/Infinity as bare tokens that other JSON readers
reject. A diverging run is exactly when those values matter, so they are
written as the strings "NaN", "Infinity" and "-Infinity", which `float()`
turns back into the numbers.
"""

from __future__ import annotations

import math
from typing import Any


def json_safe(obj: Any) -> Any:
    """A copy of `obj` whose non-finite floats are strings."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return "NaN"
        if math.isinf(obj):
            return "Infinity" if obj > 0 else "-Infinity"
        return obj
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return json_safe(obj.item())
    return obj

