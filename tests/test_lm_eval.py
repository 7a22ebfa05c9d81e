"""lm-evaluation-harness on the transformers export, offline: a multiple-choice task defined in
YAML over a local JSONL file, its accuracy checked against the same log-likelihoods computed
directly with looptrain's own model and tokenizer.

Skipped only when lm-eval is not installed (`pip install 'looptrain[lmeval]'`).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from looptrain import exit_codes  # noqa: E402
from looptrain.checkpoint.exported import load_exported, save_exported  # noqa: E402
from looptrain.config.schema import ModelConfig  # noqa: E402
from looptrain.data.loader import SINGLE_PROCESS_ENV  # noqa: E402
from looptrain.data.tokenizer import Tokenizer  # noqa: E402
from looptrain.hf.export import export_hf  # noqa: E402
from test_hf_export import perturbed_model  # noqa: E402

TASK = "looptrain_local_choice"
DOCS = [
    {"context": "And God said, Let there be", "choices": ["light", "sheep", "water", "a king"], "label": 0},
    {"context": "In the beginning God created the heaven and the", "choices": ["earth", "sea", "sword"], "label": 0},
    {"context": "The LORD is my shepherd; I shall not", "choices": ["want", "run", "sing", "eat"], "label": 0},
    {"context": "And the evening and the morning were the first", "choices": ["day", "night", "year"], "label": 0},
    {"context": "Blessed are the meek: for they shall inherit the", "choices": ["land", "earth", "gold"], "label": 1},
    {"context": "Thou shalt love thy neighbour as", "choices": ["thyself", "a brother", "the LORD"], "label": 0},
    {"context": "Ask, and it shall be given you; seek, and ye shall", "choices": ["find", "lose", "wait"], "label": 0},
    {"context": "For God so loved the", "choices": ["world", "city", "river", "temple"], "label": 0},
]


@pytest.fixture(scope="module", autouse=True)
def streaming_env():
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SINGLE_PROCESS_ENV.items():
            mp.setenv(key, value)
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        "doc_to_target: label\n"
        "doc_to_choice: choices\n"
        'target_delimiter: " "\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return str(folder)


@pytest.fixture
def export(tmp_path, bible_data):
    cfg = ModelConfig(vocab_size=512, d_model=32, n_heads=4, core_layers=2, loops=2, max_seq_len=64,
                      readout="final_only")
    model = perturbed_model(cfg, seed=5)
    save_exported(model.state_dict(), cfg, tmp_path / "src")
    return str(export_hf(tmp_path / "src", tmp_path / "hf", tokenizer=os.path.join(bible_data, "tokenizer.model")))


def direct_accuracy(export_dir: str, depth: int) -> float:
    """lm-eval's multiple-choice accuracy by hand: sum log p(" " + choice | context), argmax vs label,
    with the context/continuation split lm-eval uses for causal models (encode the whole, cut at the
    context's length)."""
    model = load_exported(export_dir)
    tok = Tokenizer.load(os.path.join(export_dir, "tokenizer.model"))
    correct = 0
    with torch.no_grad():
        for doc in DOCS:
            scores = []
            for choice in doc["choices"]:
                context, continuation = doc["context"], " " + choice
                whole = tok.encode(context + continuation)
                n_ctx = len(tok.encode(context))
                logits = model.logits(model(torch.tensor([whole[:-1]]), depth=depth).features[-1])[0]
                logp = torch.log_softmax(logits.double(), dim=-1)
                scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole))))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return correct / len(DOCS)


def test_eval_tasks_at_several_depths_match_direct_loglikelihoods(tmp_path, task_dir, export, bible_data, capsys):
    from looptrain.cli import main

    out = tmp_path / "eval"
    code = main(["eval", export, "--data", bible_data, "--depths", "1..3", "--batches", "1", "--batch-size", "2",
                 "--tasks", TASK, "--task-dir", task_dir, "--task-depths", "1,2,3", "--out", str(out),
                 "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == exit_codes.OK, captured.err
    (result,) = json.loads((out / "results.json").read_text())
    tasks = result["tasks"]
    assert tasks["depths"] == [1, 2, 3]
    accs = tasks["metrics"][TASK]["acc"]
    assert accs == [pytest.approx(direct_accuracy(export, d), abs=1e-12) for d in (1, 2, 3)]
    assert "## Tasks" in (out / "results.md").read_text() and (out / "tasks.png").stat().st_size > 0
    assert len((out / "tasks.csv").read_text().strip().splitlines()) == 1 + 3


def test_eval_tasks_bad_input_is_one_line(tmp_path, task_dir, export, bible_data, capsys):
    from looptrain.cli import main

    code = main(["eval", export, "--data", bible_data, "--depths", "1", "--batches", "1", "--batch-size", "2",
                 "--tasks", "no_such_task_xyz", "--task-dir", task_dir, "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == exit_codes.BAD_INPUT and "unknown task" in err and len(err.strip().splitlines()) == 1


LM_EVAL_CLI = r"""
import sys
# This machine's torchvision is a CUDA build beside a CPU torch (see looptrain.hf.runtime).
from looptrain.data.streaming_import import declare_missing_torchvision_operators
declare_missing_torchvision_operators()
from lm_eval.__main__ import cli_evaluate
sys.argv = ["lm_eval"] + sys.argv[1:]
cli_evaluate()
"""


@pytest.mark.slow
def test_lm_eval_cli_loads_the_export_with_trust_remote_code(tmp_path, task_dir, export):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`: lm-eval's own loading path."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    results = tmp_path / "lm_eval_out"
    proc = subprocess.run(
        [sys.executable, "-c", LM_EVAL_CLI, "--model", "hf", "--model_args",
         f"pretrained={export},trust_remote_code=True,dtype=float32", "--tasks", TASK, "--include_path", task_dir,
         "--device", "cpu", "--batch_size", "4", "--output_path", str(results)],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = list(results.rglob("results_*.json"))
    acc = json.loads(found.read_text())["results"][TASK]["acc,none"]
    assert acc == pytest.approx(direct_accuracy(export, 2), abs=1e-12)
