"""Downstream tasks through lm-evaluation-harness, at several inference depths.

    looptrain eval RUN_OR_EXPORT --tasks hellaswag,arc_easy [--task-depths 1..8] [--task-dir DIR]

Each model is run as the transformers export's own class (`looptrain.hf`) with
`inference_depth` set per depth and handed to lm-eval as an `HFLM` instance, so
the numbers are exactly those of `lm_eval --model hf --model_args
pretrained=EXPORT,trust_remote_code=True` at that depth. `--task-dir` adds a
folder of task YAML files (lm-eval's `include_path`), e.g. tasks over local
data files for offline use. The per-depth metrics join the run's entry in
results.json (key "tasks"), tasks.csv, a "Tasks" table in results.md and
tasks.png (metric vs depth).

lm-eval is an optional extra: `pip install 'looptrain[lmeval]'`.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from looptrain.eval.load import EvalError

TASK_COLUMNS = ("run", "task", "metric", "depth", "value")


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default=None,
                        help="lm-evaluation-harness tasks, comma-separated (needs `pip install 'looptrain[lmeval]'`)")
    parser.add_argument("--task-depths", default=None,
                        help="inference depths for the tasks, same syntax as --depths (default: --depths)")
    parser.add_argument("--task-dir", default=None, help="folder of extra task YAML files (lm-eval include_path)")
    parser.add_argument("--task-limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task")


def _import_lm_eval():
    try:
        from looptrain.hf.runtime import import_transformers

        import_transformers()
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise EvalError(f"--tasks needs lm-evaluation-harness ({err}); pip install 'looptrain[lmeval]'") from None
    return lm_eval, HFLM, TaskManager


def task_manager(tasks: Sequence[str], task_dir: Optional[str] = None):
    """lm-eval's TaskManager, once every task in `tasks` is known to it (else EvalError naming them).

    `looptrain eval` calls it before the perplexity passes, so a typo costs seconds, not the whole evaluation.
    """
    _, _, TaskManager = _import_lm_eval()
    if task_dir is not None and not Path(task_dir).is_dir():
        raise EvalError(f"--task-dir {task_dir}: no such directory")
    manager = TaskManager(include_path=task_dir) if task_dir else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalError(f"--tasks: unknown task(s) {', '.join(unknown)}; see `lm_eval ls tasks` or add --task-dir")
    return manager


def _export_dir(path: Path, scratch: Path) -> Path:
    from looptrain.eval.load import is_exported

    if is_exported(path):
        return path
    from looptrain.checkpoint.tools import export_checkpoint

    export_checkpoint(path, scratch)
    return scratch


def task_metrics(results: dict, task: str) -> dict[str, float]:
    """lm-eval's numeric metrics of one task ("acc,none" -> "acc"), without the stderr entries."""
    out = {}
    for key, value in results.get(task, {}).items():
        name = key.split(",")[0]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name \
                and name != "sample_len":
            out[name] = float(value)
    return out


def run_tasks(
    path: str | os.PathLike,
    tasks: Sequence[str],
    depths: Sequence[int],
    *,
    task_dir: Optional[str] = None,
    limit: Optional[int] = None,
    num_fewshot: Optional[int] = None,
    tokenizer: Optional[str] = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> dict:
    """{"depths": [...], "metrics": {task: {metric: [value per depth]}}} for one model."""
    from looptrain.generate import hf_model_from_export, load_tokenizer
    from looptrain.hf.tokenization_looptrain import LoopTrainTokenizer

    lm_eval, HFLM, _ = _import_lm_eval()
    manager = task_manager(tasks, task_dir)
    source = Path(path)
    hf_tokenizer = LoopTrainTokenizer(vocab_file=load_tokenizer(source, tokenizer).path)
    metrics: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="looptrain-tasks-") as tmp:
        export = _export_dir(source, Path(tmp))
        for depth in depths:
            model = hf_model_from_export(export, inference_depth=depth).to(device)
            lm = HFLM(pretrained=model, tokenizer=hf_tokenizer, batch_size=batch_size, device=device)
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                log_samples=False, bootstrap_iters=0, verbosity="ERROR",
            )
            for task in tasks:
                for name, value in task_metrics(out["results"], task).items():
                    metrics.setdefault(task, {}).setdefault(name, []).append(value)
    return {"depths": list(depths), "metrics": metrics}


def attach_task_results(results: list[dict], paths: Sequence[str], args) -> None:
    """Run --tasks for every evaluated model and add them to its result dict (key "tasks")."""
    from looptrain.eval.cli import parse_depths
    from looptrain.eval.run import default_depths

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise EvalError("--tasks: name at least one task, e.g. --tasks hellaswag,arc_easy")
    for result, path in zip(results, paths):
        depths = parse_depths(args.task_depths or args.depths) or default_depths(result["trained_depth"])
        result["tasks"] = run_tasks(path, tasks, depths, task_dir=args.task_dir, limit=args.task_limit,
                                    num_fewshot=args.num_fewshot, device="cpu" if args.device == "auto" else args.device)


def task_rows(results: Sequence[dict]) -> list[dict]:
    rows = []
    for r in results:
        t = r.get("tasks")
        if not t:
            continue
        for task, named in t["metrics"].items():
            for metric, values in named.items():
                rows.extend({"run": r["name"], "task": task, "metric": metric, "depth": d, "value": v}
                            for d, v in zip(t["depths"], values))
    return rows


def task_markdown(results: Sequence[dict]) -> str:
    lines = ["## Tasks (lm-evaluation-harness) per inference depth", ""]
    for r in results:
        t = r.get("tasks")
        if not t:
            continue
        lines.append(f"| {r['name']} | " + " | ".join(f"depth {d}" for d in t["depths"]) + " |")
        lines.append("|---|" + "---:|" * len(t["depths"]))
        for task, named in t["metrics"].items():
            for metric, values in named.items():
                lines.append(f"| {task} {metric} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_tasks(results: Sequence[dict], path: str | os.PathLike) -> str:
    from looptrain.eval.plots import _colors, _figure, _save

    series = [(r["name"], task, metric, r["tasks"]["depths"], values)
              for r in results if r.get("tasks")
              for task, named in r["tasks"]["metrics"].items() for metric, values in named.items()]
    fig, (ax,) = _figure(6.4, 4.0)
    for color, (run, task, metric, depths, values) in zip(_colors(len(series)), series):
        ax.plot(depths, values, marker="o", color=color, label=f"{run}: {task} {metric}")
    ax.set_xlabel("inference depth (loops)")
    ax.set_ylabel("task metric")
    ax.set_title("downstream tasks vs inference depth")
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_task_reports(results: Sequence[dict], out_dir: str | os.PathLike) -> dict[str, str]:
    """tasks.csv, tasks.png and the Tasks section appended to results.md."""
    csv_path = os.path.join(out_dir, "tasks.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TASK_COLUMNS)
        writer.writeheader()
        writer.writerows(task_rows(results))
    with open(os.path.join(out_dir, "results.md"), "a") as f:
        f.write("\n" + task_markdown(results))
    return {"tasks_csv": csv_path, "tasks_png": plot_tasks(results, os.path.join(out_dir, "tasks.png"))}
