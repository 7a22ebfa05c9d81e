"""How token positions enter the model, per `model.positions`.

learned: a learned absolute table added to the token embeddings (the paper).
rope:    rotary tables applied to q and k in every attention (`rotary.py`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PositionScheme:
    learned_table: bool  # LoopedLM.pos_embed
    rotary: bool  # LoopCore.rotary, lent to the prelude and coda by the model


# model.positions -> where positions enter.
POSITIONS = {
    "learned": PositionScheme(learned_table=True, rotary=False),
    "rope": PositionScheme(learned_table=False, rotary=True),
}
