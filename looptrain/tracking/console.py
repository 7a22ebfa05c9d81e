"""One readable console line per log call.

Training lines read `step 120/1000 | 1:02 elapsed, eta 7:36 | loss 4.812 | ce[1..4] 5.12 4.80 4.61 4.55
| |h4| 31.2 rms 1.38 | gnorm 0.82 | 12.3k tok/s | lr 3.00e-04`; validation
lines start with `val` and show the loss and perplexity per exit.
"""

from __future__ import annotations

import math
import re
from typing import Optional


def _per_loop(metrics: dict[str, float], prefix: str) -> dict[int, float]:
    pattern = re.compile(re.escape(prefix) + r"/(\d+)$")
    out = {}
    for key, value in metrics.items():
        m = pattern.match(key)
        if m:
            out[int(m.group(1))] = value
    return dict(sorted(out.items()))


def _num(value: float, spec: str = ".4g") -> str:
    return format(value, spec) if math.isfinite(value) else str(value)


def _rate(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _clock(seconds: float) -> str:
    """h:mm:ss (or m:ss); '?' before the pace is known."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _series(label: str, values: dict[int, float], spec: str) -> str:
    ks = list(values)
    span = f"{ks[0]}" if len(ks) == 1 else f"{ks[0]}..{ks[-1]}"
    return f"{label}[{span}] " + " ".join(_num(v, spec) for v in values.values())


def _step(step: int, total: Optional[int]) -> str:
    return f"step {step}/{total}" if total else f"step {step}"


def train_line(step: int, total: Optional[int], metrics: dict[str, float]) -> Optional[str]:
    keys = [k for k in metrics if k.startswith(("train/", "norm/", "perf/"))]
    if not keys:
        return None
    parts = [_step(step, total)]
    if "time/elapsed_s" in metrics:
        parts.append(f"{_clock(metrics['time/elapsed_s'])} elapsed, eta {_clock(metrics.get('time/eta_s', math.nan))}")
    if "train/loss" in metrics:
        parts.append(f"loss {_num(metrics['train/loss'], '.4f')}")
    exits = _per_loop(metrics, "train/loss_exit")
    if exits:
        parts.append(_series("ce", exits, ".2f"))
    if metrics.get("train/norm_penalty"):
        parts.append(f"pen {_num(metrics['train/norm_penalty'], '.3g')}")
    if "train/depth" in metrics:
        parts.append(f"depth {_num(metrics['train/depth'], '.3g')}")
    means, rms = _per_loop(metrics, "norm/mean"), _per_loop(metrics, "norm/rms")
    if means:
        k = max(means)
        text = f"|h{k}| {_num(means[k], '.4g')}"
        if k in rms:
            text += f" rms {_num(rms[k], '.3g')}"
        parts.append(text)
    if "train/grad_norm" in metrics:
        parts.append(f"gnorm {_num(metrics['train/grad_norm'], '.3g')}")
    if "perf/tokens_per_s" in metrics:
        parts.append(f"{_rate(metrics['perf/tokens_per_s'])} tok/s")
    if "perf/mfu" in metrics:
        parts.append(f"mfu {100 * metrics['perf/mfu']:.1f}%")
    if "train/lr" in metrics:
        parts.append(f"lr {_num(metrics['train/lr'], '.2e')}")
    return " | ".join(parts)


def val_line(step: int, total: Optional[int], metrics: dict[str, float]) -> Optional[str]:
    losses, ppls = _per_loop(metrics, "val/loss"), _per_loop(metrics, "val/ppl")
    if not losses and not ppls:
        return None
    parts = ["val " + _step(step, total)]
    if losses:
        parts.append(_series("loss", losses, ".3f"))
    if ppls:
        k = max(ppls)
        parts.append(f"ppl[{k}] {_num(ppls[k], '.4g')}")
    return " | ".join(parts)


def format_lines(step: int, total: Optional[int], metrics: dict[str, float]) -> list[str]:
    """The console lines for one log call (training and/or validation)."""
    lines = [line for line in (train_line(step, total, metrics), val_line(step, total, metrics)) if line]
    if not lines and metrics:
        lines.append(_step(step, total) + " | " + " ".join(f"{k} {_num(v)}" for k, v in sorted(metrics.items())))
    return lines
