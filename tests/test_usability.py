"""Everyday use: start-up time, progress, threads, MFU, eval output, paths, profiling and plots."""

import json
import os
import subprocess
import sys

import pytest

from looptrain import exit_codes
from looptrain.config import RecipeError, load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_recipe(tmp_path, data_dir, *extra):
    return load_recipe(os.path.join(ROOT, "recipes/quickstart.yaml"), [
        f"data.dir={data_dir}", f"out_dir={tmp_path}", "name=tiny", "model.vocab_size=512", "model.max_seq_len=64",
        "model.d_model=32", "model.n_heads=4", "model.core_layers=1", "model.loops=2", "train.micro_batch_size=4",
        "train.steps=6", "train.log_every=2", "train.val_every=0", "optim.schedule.warmup_steps=0", *extra,
    ])


# --------------------------------------------------------------------- start-up


def test_help_and_argument_errors_answer_without_importing_torch():
    script = (
        "import sys\n"
        "from looptrain.cli import main\n"
        "for argv in (['--help'], [], ['nosuch'], ['train'], ['train', '--help'], ['plot', '--help'],\n"
        "             ['eval'], ['prepare', '--help'], ['status', '--help'], ['info', '--nope'], ['inspect', '--help'],\n"
        "             ['export', '--help'], ['generate', '--help'], ['launch', '--help'], ['sweep', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'streaming', 'wandb', 'matplotlib') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"
    assert "usage: looptrain" in proc.stdout and "invalid choice: 'nosuch'" in proc.stderr


def test_every_command_still_parses_its_own_arguments():
    from looptrain.cli import build_parser

    args = build_parser(["eval", "runs/a", "--depths", "1..4"]).parse_args(["eval", "runs/a", "--depths", "1..4"])
    assert args.paths == ["runs/a"] and args.depths == "1..4" and callable(args.func)
    args = build_parser().parse_args(["plot", "runs/a", "-o", "x.png"])
    assert args.run_dirs == ["runs/a"] and args.out == "x.png"


# ------------------------------------------------------------------- threads


def test_threads_auto_follows_omp_then_slurm_then_cores_per_local_rank():
    from looptrain.threads import choose_threads

    assert choose_threads(3, {"OMP_NUM_THREADS": "8"}) == (3, "train.threads")
    assert choose_threads("auto", {"OMP_NUM_THREADS": "2", "SLURM_CPUS_PER_TASK": "6"})[0] == 2
    assert choose_threads("auto", {"SLURM_CPUS_PER_TASK": "6", "LOCAL_WORLD_SIZE": "4"})[0] == 6
    assert choose_threads("auto", {"LOCAL_WORLD_SIZE": "4"}, cores=16) == (4, "16 available cores / 4 local rank(s)")
    assert choose_threads("auto", {"LOCAL_WORLD_SIZE": "4"}, cores=2)[0] == 1
    assert choose_threads("auto", {}, cores=6)[0] == 6
    with pytest.raises(RecipeError, match="train.threads"):
        choose_threads(0, {})
    with pytest.raises(RecipeError, match="OMP_NUM_THREADS='x'"):
        choose_threads("auto", {"OMP_NUM_THREADS": "x"})
    with pytest.raises(RecipeError, match="expected 'auto' or int"):
        load_recipe(os.path.join(ROOT, "recipes/quickstart.yaml"), ["train.threads=many"])


def test_cgroup_quota_caps_the_cores(tmp_path):
    from looptrain.threads import CGROUP_V1_PERIOD, CGROUP_V1_QUOTA, CGROUP_V2_MAX, cgroup_cpu_limit

    def write(path, text):
        target = tmp_path / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    assert cgroup_cpu_limit(str(tmp_path)) is None
    write(CGROUP_V1_QUOTA, "-1\n")
    write(CGROUP_V1_PERIOD, "100000\n")
    assert cgroup_cpu_limit(str(tmp_path)) is None  # v1 without a quota
    write(CGROUP_V1_QUOTA, "250000\n")
    assert cgroup_cpu_limit(str(tmp_path)) == 3  # 2.5 CPUs -> 3 threads
    write(CGROUP_V2_MAX, "max 100000\n")
    assert cgroup_cpu_limit(str(tmp_path)) is None
    write(CGROUP_V2_MAX, "200000 100000\n")
    assert cgroup_cpu_limit(str(tmp_path)) == 2


def test_mfu_has_no_cpu_probe_and_uses_only_true_peaks():
    import torch

    from looptrain.perf import GPU_PEAKS, peak_flops

    assert peak_flops(torch.device("cpu"), "fp32") != peak_flops(torch.device("cpu"), "fp32")  # NaN: no MFU
    assert peak_flops(torch.device("cpu"), "bf16", override=2e12) == 2e12
    assert all(p["bf16"] >= p["tf32"] >= p["fp32"] for p in GPU_PEAKS.values())


# ----------------------------------------------------------- a run, observed


def test_run_reports_threads_eta_no_cpu_mfu_profile_and_memory(tmp_path, bible_data, capsys):
    import torch

    from looptrain.train import main_worker

    before = torch.get_num_threads()
    recipe = tiny_recipe(tmp_path, bible_data, "train.threads=1", "train.profile.start=2", "train.profile.steps=2",
                         "train.memory_snapshot=true")
    try:
        assert main_worker(recipe) == exit_codes.OK
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "looptrain: 1 intra-op thread(s) per rank (train.threads;" in out
    step_lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 3 and all(" elapsed, eta " in line for line in step_lines)
    assert step_lines[-1].startswith("step 6/6 | ") and " elapsed, eta 0:00 | " in step_lines[-1]
    assert all("mfu" not in line for line in step_lines)  # CPU without train.peak_tflops: no MFU
    with open(os.path.join(recipe.run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert all("perf/mfu" not in r and r["time/elapsed_s"] > 0 for r in records)
    assert records[-1]["time/eta_s"] == 0

    profile = os.path.join(recipe.run_dir, "profile")
    assert sorted(os.listdir(profile)) == ["rank0.steps3-4.ops.txt", "rank0.steps3-4.pt.trace.json"]
    with open(os.path.join(profile, "rank0.steps3-4.pt.trace.json")) as f:
        trace = json.load(f)
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert {"train step 3", "train step 4", "aten::mm"} <= names and "train step 5" not in names
    assert "aten::mm" in open(os.path.join(profile, "rank0.steps3-4.ops.txt")).read()
    with open(os.path.join(recipe.run_dir, "memory", "rank0.json")) as f:
        report = json.load(f)
    assert report["device"] == "cpu" and report["peak_rss_gib"] > 0.05
    grew = report["peak_rss_grew_at_step"]
    assert grew[0]["step"] == 1 and all(1 <= g["step"] <= 6 for g in grew)


@pytest.mark.slow
def test_profile_is_written_on_every_rank(tmp_path, bible_data):
    recipe = os.path.join(ROOT, "recipes/quickstart.yaml")
    cmd = [sys.executable, "-m", "looptrain.cli", "train", recipe, f"data.dir={bible_data}", f"out_dir={tmp_path}",
           "name=two", "model.vocab_size=512", "model.max_seq_len=64", "model.d_model=32", "model.n_heads=4",
           "model.core_layers=1", "model.loops=2", "train.micro_batch_size=4", "train.steps=4", "train.log_every=2",
           "train.val_every=0", "parallel.backend=fsdp2", "train.profile.start=1", "train.profile.steps=2",
           "--nproc", "2"]
    env = dict(os.environ, WANDB_MODE="disabled", TMPDIR=str(tmp_path))
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 intra-op thread(s) per rank (OMP_NUM_THREADS" in proc.stdout  # launcher: available cores / 2
    files = sorted(os.listdir(tmp_path / "two" / "profile"))
    assert [f for f in files if f.endswith(".pt.trace.json")] == [
        "rank0.steps2-3.pt.trace.json", "rank1.steps2-3.pt.trace.json"]


# ----------------------------------------------------------------- progress


def test_tokenizer_training_prints_its_phases_with_times(tmp_path, capsys):
    from looptrain.data.tokenizer import train_tokenizer

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) + f" {i}." for i in range(200)]
    train_tokenizer(docs, tmp_path / "tok.model", 420, progress=True)
    err = capsys.readouterr().err.splitlines()
    assert [line.split("] ", 1)[1].split(" on ")[0] for line in err] == [
        "tokenizer: sampling training lines", "tokenizer: training a 420-piece BPE", "tokenizer: trained"]
    assert "200 lines" in err[1] and all(line.startswith("[") and " s] " in line for line in err)
    train_tokenizer(docs, tmp_path / "quiet.model", 420)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------- eval


@pytest.fixture(scope="module")
def readout_results():
    import torch

    from looptrain.config.schema import ModelConfig
    from looptrain.eval.run import evaluate_model
    from looptrain.model import build_model

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (2, 17), generator=g) for _ in range(2)]
    results = []
    for readout in ("final_only", "rmsnorm"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(vocab_size=512, d_model=32, n_heads=4, core_layers=1, loops=3,
                                        max_seq_len=64, readout=readout))
        results.append(evaluate_model(model, batches, [1, 2, 3, 4], name=readout, device="cpu"))
    return results


def test_eval_tables_say_which_readout_they_use(readout_results):
    import math

    from looptrain.eval.report import exit_readout_differs, markdown

    final_only, rmsnorm = readout_results
    assert exit_readout_differs(final_only) and not exit_readout_differs(rmsnorm)
    text = markdown(readout_results)
    assert text.count("## Perplexity by inference depth") == 1
    assert all(text.count(h) == 1 for h in ("## RMS of the raw state", "## Early exit"))
    assert "read out by its final readout" in text and "read by that exit's own readout" in text
    header = next(line for line in text.splitlines() if line.startswith("| depth |"))
    assert header == "| depth | final_only | final_only (exit k readout) | rmsnorm |"
    row1 = next(line for line in text.splitlines() if line.startswith("| 1 |")).strip("| ").split(" | ")
    d = final_only["depth"]
    assert float(row1[1]) == pytest.approx(math.exp(d["loss"][0]), rel=1e-3)
    assert float(row1[2]) == pytest.approx(math.exp(d["exit_loss"][0]), rel=1e-3)
    assert row1[1] != row1[2]
    assert "exit k readout" not in markdown([rmsnorm])


def test_eval_progress_bars_on_stderr(readout_results, capsys):
    import torch

    from looptrain.config.schema import ModelConfig
    from looptrain.eval.run import evaluate_model
    from looptrain.model import build_model

    model = build_model(ModelConfig(vocab_size=512, d_model=32, n_heads=4, core_layers=1, loops=2, max_seq_len=64))
    batches = [torch.randint(0, 512, (2, 17)) for _ in range(3)]
    evaluate_model(model, batches, [1, 2, 3], name="m", device="cpu", diagnostics=True, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.replace("\r", "\n")
    for label in ("m: depths 1..3", "m: early-exit policies", "m: radial gradient", "m: radial clamp"):
        assert label in err
    assert "3/3" in err and "batch/s" in err and "6/6" in err


# --------------------------------------------------------------------- paths


def test_missing_dataset_names_the_absolute_path_and_the_users_own_command(tmp_path, monkeypatch):
    from looptrain.data.errors import DataError
    from looptrain.data.loader import check_dataset

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        check_dataset("data/mycorpus", seq_len=64, vocab_size=512)
    message = str(err.value)
    absolute = str(tmp_path / "data" / "mycorpus")
    assert message.startswith(f"{absolute} (data/mycorpus relative to the current directory): no dataset here")
    assert f"looptrain prepare YOUR_TEXT_OR_JSONL_FILES --out {absolute}`" in message
    assert "bible" not in message


def test_dataset_json_records_absolute_source_paths(tmp_path, monkeypatch):
    from looptrain.data.prepare import prepare_dataset

    monkeypatch.chdir(tmp_path)
    words = "one two three four five six seven eight nine ten eleven twelve".split()
    paragraphs = [" ".join(words[(i + j) % 12] for j in range(60)) for i in range(40)]
    (tmp_path / "text.txt").write_text("\n\n".join(paragraphs))
    summary = prepare_dataset(["text.txt"], "data/own", vocab_size=400, seq_len=16, progress=False)
    assert summary["source"]["files"] == [str(tmp_path / "text.txt")]
    again = prepare_dataset(["text.txt"], "data/again", seq_len=16, tokenizer_path="data/own/tokenizer.model",
                            progress=False)
    assert again["tokenizer_source"] == str(tmp_path / "data" / "own" / "tokenizer.model")


# --------------------------------------------------------------------- plots


def _fake_run(root, name, events):
    run = root / name
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(5, 65, 5):
            record = {"step": step}
            for k in (1, 2):
                record[f"norm/mean/{k}"] = 0.1 * step * k
                record[f"norm/rms/{k}"] = 0.01 * step * k
                record[f"train/loss_exit/{k}"] = 6.0 - 0.01 * step
            f.write(json.dumps(record) + "\n")
            if step % 20 == 0:
                f.write(json.dumps({"step": step, "val/loss/1": 5.5, "val/loss/2": 5.4}) + "\n")
    (run / "recipe.yaml").write_text("name: x\nmonitor:\n  final_rms: {warn: 0.5, halt: 1.2}\n")
    with open(run / "events.jsonl", "w") as f:
        for step, rule, action in events:
            f.write(json.dumps({"step": step, "rule": rule, "level": "WARN", "action": action, "message": "m"}) + "\n")
    return str(run)


def test_plot_draws_val_loss_and_the_monitored_rms_with_thresholds_and_events(tmp_path):
    from looptrain.plot import PANELS, build_figure, plot_runs

    events = [(15, "growth", "alert"), (25, "final_rms", "alert"), (30, "final_rms", "log"), (60, "final_rms", "halt")]
    run = _fake_run(tmp_path, "a", events)
    fig = build_figure([run])
    axes = {family: ax for (family, _, _), ax in zip(PANELS, fig.axes)}
    monitor = axes["monitor"]
    labels = [t.get_text() for t in monitor.get_legend().get_texts()]
    assert labels == ["RMS h2", "warn 0.5", "halt 1.2", "alert (growth, final_rms)", "halt (final_rms)"]
    markers = [line for line in monitor.get_lines() if line.get_marker() in ("^", "X")]
    assert [(int(m.get_xdata()[0]), m.get_marker()) for m in markers] == [(15, "^"), (25, "^"), (60, "X")]
    assert [round(float(m.get_ydata()[0]), 6) for m in markers] == [0.3, 0.5, 1.2]  # on the RMS curve
    val = [line for line in axes["val/loss"].get_lines() if line.get_label().startswith("k=")]
    assert [list(line.get_xdata()) for line in val] == [[20, 40, 60], [20, 40, 60]]
    assert monitor.get_yscale() == "log"
    out = plot_runs([run, _fake_run(tmp_path, "b", [])], str(tmp_path / "p.png"))
    assert os.path.getsize(out) > 10000


def _tick_labels_overlap(fig) -> list[str]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    clashes = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in axis.get_ticklabels(which="both")
                     if t.get_visible() and t.get_text()]
            for i, (a, box_a) in enumerate(boxes):
                for b, box_b in boxes[i + 1:]:
                    if box_a.overlaps(box_b):
                        clashes.append(f"{a} / {b}")
    return clashes


@pytest.mark.parametrize("low,high", [(1.1, 1.9), (3.0, 30.0), (0.4, 95.0), (1e-3, 1e4)])
def test_norm_histogram_tick_labels_do_not_overlap(tmp_path, monkeypatch, low, high):
    import torch

    from looptrain.eval import plots
    from looptrain.eval.diagnostics import norm_histograms

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or str(path))
    norms = torch.exp(torch.linspace(torch.log(torch.tensor(low)), torch.log(torch.tensor(high)), 400)).repeat(3, 1)
    result = {"name": "r", "diagnostics": {"histogram": norm_histograms(norms).to_dict()}}
    plots.plot_norm_histograms([result, dict(result, name="s")], tmp_path / "h.png")
    assert _tick_labels_overlap(figures[0]) == []
    ax = figures[0].axes[0]
    low_shown, high_shown = ax.get_xlim()
    labelled = [t for t, label in zip(ax.xaxis.get_majorticklocs(), ax.xaxis.get_ticklabels())
                if low_shown <= t <= high_shown and label.get_text()]
    assert len(labelled) >= 3  # still readable: a few labelled ticks on every range


def test_norms_plot_compares_runs_on_one_axis(readout_results, tmp_path, monkeypatch):
    from looptrain.eval import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or str(path))
    plots.plot_norms(readout_results, tmp_path / "n.png")
    (ax,) = figures[0].axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["final_only (K=3)", "rmsnorm (K=3)"]
    assert _tick_labels_overlap(figures[0]) == []
