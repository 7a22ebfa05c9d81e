"""Looking up a model choice in its builder table.

Every recipe key with a fixed set of values (`model.readout`, `model.recurrence`,
`model.injection`, ...) has one table in the module that implements it, keyed by
exactly the values of the key's `Literal` type in `looptrain.config.schema`
(tests/test_model.py checks each table against the schema). Adding a value is
one entry in the `Literal` and one entry in its table.
"""

from __future__ import annotations

from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def choose(table: Mapping[str, T], cfg: Any, key: str) -> T:
    """The entry of `table` for the value of `cfg.<key>`, or a ValueError naming the key and its values."""
    value = getattr(cfg, key)
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"model.{key}: unknown value {value!r}; use one of {', '.join(table)}") from None
