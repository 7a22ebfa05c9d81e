"""Progress bars for evaluation steps that can take minutes (rate and ETA on stderr)."""

from __future__ import annotations

import sys
from typing import Iterable, Optional, Sized, TypeVar

T = TypeVar("T")


def progress_bar(items: Iterable[T], desc: str, unit: str, enabled: bool, total: Optional[int] = None) -> Iterable[T]:
    """`items` wrapped in a tqdm bar when enabled, else `items` itself.

    tqdm shows count, rate and ETA when the length is known; the bar goes to
    stderr so that the printed tables on stdout stay clean.
    """
    if not enabled:
        return items
    from tqdm import tqdm

    if total is None and isinstance(items, Sized):
        total = len(items)
    return tqdm(items, desc=desc, unit=unit, total=total, file=sys.stderr, dynamic_ncols=True, leave=True)
