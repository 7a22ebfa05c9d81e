"""Distributed backends against the single-process reference, with real processes on gloo.

Each multi-rank test starts real worker processes through the local launcher
(the same code path as `looptrain train --nproc N`): every rank builds the
same tiny model, takes its half of fixed synthetic global batches, and runs
the backend's `forward_backward` / `optimizer_step`; rank 0 writes the
per-step global losses and grad norms as JSON. The reference is
`SingleBackend` in this process on the whole global batch.

This file is also the worker: `python tests/test_parallel.py SPEC.json`.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from looptrain.config import recipe_from_dict
from looptrain.config.loader import deep_merge
from looptrain.launch.local import launch_workers
from looptrain.parallel import build_backend
from looptrain.parallel.env import DistEnv
from looptrain.state import seed_everything
from looptrain.train_module import LoopedLMTrainModule, split_batch

STEPS = 5
GLOBAL_BATCH = 8
SEQ = 16
VOCAB = 97

# Prelude and coda blocks too, so that once-run and looped units are both covered.
TINY = {
    "name": "parallel-test",
    "model": {
        "vocab_size": VOCAB, "d_model": 32, "n_heads": 4, "prelude_layers": 1, "core_layers": 2,
        "coda_layers": 1, "loops": 3, "max_seq_len": SEQ, "dropout": 0.0,
    },
    "objective": {"supervision": "per_loop", "norm_penalty": {"weight": 0.01}},
    # A large lr and a clip well below the gradient norm: a wrong global norm
    # or a missed reduction shows up in the next step's loss.
    "optim": {"lr": 1e-2, "clip_grad_norm": 0.3, "weight_decay": 0.1},
    "train": {"micro_batch_size": GLOBAL_BATCH, "grad_accum": 1, "device": "cpu", "seed": 0},
    "tracking": {"mode": "disabled"},
}

FP32_TOL = 1e-5  # relative; observed differences are ~1e-7 (summation order of the reductions)
# bf16 (8-bit mantissa, relative rounding ~4e-3) through a 10-block-deep looped
# forward and 5 Adam steps at lr 1e-2: losses agree with fp32 to ~2e-4
# relative, gradient norms -- steered by small-gradient directions that bf16
# rounds coarsely -- to ~15%. The tolerances leave a margin over that; real
# bugs (a missed reduction, a wrong clip) move the loss by > 1e-2 here.
BF16_LOSS_TOL = 5e-3
BF16_NORM_TOL = 0.3


def make_recipe(overrides: dict, out_dir: str = "runs"):
    return recipe_from_dict(deep_merge(deep_merge(TINY, {"out_dir": out_dir}), overrides))


def global_batches() -> list[torch.Tensor]:
    """Learnable rows: token[t+1] = token[t] + stride (mod vocab), random start and stride in 1..3."""
    g = torch.Generator().manual_seed(1234)
    positions = torch.arange(SEQ + 1)
    batches = []
    for _ in range(STEPS):
        start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g)
        stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=g)
        batches.append((start + stride * positions) % VOCAB)
    return batches


def poison_block_output(model, at_step: list[int]):
    """From outside the model: make one step's forward NaN (so its gradients are NaN too)."""

    def hook(_module, _inputs, output):
        return output * float("nan") if at_step[0] == at_step[1] else output

    return model.core.layers[-1].register_forward_hook(hook)


class InjectedFailure(RuntimeError):
    pass


def run_steps(recipe, env: DistEnv, nan_step: int | None = None, crash: tuple[int, int] | None = None) -> dict:
    """Train STEPS steps; this rank takes its contiguous share of each global batch."""
    seed_everything(recipe.train.seed)
    from looptrain.model import build_model

    backend = build_backend(recipe, env)
    backend.setup(LoopedLMTrainModule(build_model(recipe.model), recipe.objective))
    backend.module.train()
    step_counter = [0, -1 if nan_step is None else nan_step]
    poison_block_output(backend.model, step_counter)
    world, rank = backend.data_parallel_size, env.rank
    accum = recipe.train.grad_accum
    losses, grad_norms = [], []
    for step, batch in enumerate(global_batches()):
        if crash is not None and (rank, step) == tuple(crash):
            raise InjectedFailure(f"injected failure on rank {rank} at step {step}")
        share = batch.chunk(world)[rank]
        step_loss = torch.zeros((), dtype=torch.float64)
        for micro, rows in enumerate(share.chunk(accum)):
            tokens, targets = split_batch(rows)
            out = backend.forward_backward(
                tokens.to(env.device), targets.to(env.device), depth=recipe.model.loops,
                backprop_loops=recipe.objective.backprop_loops,
                measure_all_exits=False, last_micro_step=micro == accum - 1,
            )
            step_loss += out.loss.detach().double().cpu() / accum
        grad_norm = backend.optimizer_step(recipe.optim.lr)
        losses.append(all_reduce_mean(env, step_loss).item())
        grad_norms.append(float(grad_norm))
        step_counter[0] += 1
    tokens, targets = split_batch(global_batches()[0].chunk(world)[rank])
    val = backend.evaluate(tokens, targets).loss.detach().double()
    return {"losses": losses, "grad_norms": grad_norms, "val": all_reduce_mean(env, val).item()}


def all_reduce_mean(env, tensor: torch.Tensor) -> torch.Tensor:
    """The mean over ranks, in place (the trainer reduces its metrics in one packed all-reduce instead)."""
    if env.distributed:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        tensor /= env.world_size
    return tensor


def reference(overrides: dict | None = None, nan_step: int | None = None) -> dict:
    """SingleBackend in this process on the whole global batch."""
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    return run_steps(make_recipe(overrides or {}), env, nan_step)


def write_spec(tmp_path, overrides: dict, *, nan_step: int | None = None, parallel_attrs: dict | None = None,
               crash: tuple[int, int] | None = None):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "overrides": overrides, "out_dir": str(tmp_path / "runs"), "result": str(tmp_path / "result.json"),
        "nan_step": nan_step, "parallel_attrs": parallel_attrs or {}, "crash": crash,
    }))
    return spec


def run_ranks(tmp_path, overrides: dict, *, nan_step: int | None = None, parallel_attrs: dict | None = None,
              nproc: int = 2, timeout_s: float = 150) -> dict:
    """Run the worker as `nproc` ranks; `parallel_attrs` are set on recipe.parallel after loading."""
    spec = write_spec(tmp_path, overrides, nan_step=nan_step, parallel_attrs=parallel_attrs)
    log = io.StringIO()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    status = launch_workers([sys.executable, os.path.abspath(__file__), str(spec)], nproc, env=env, out=log,
                            timeout_s=timeout_s)
    assert status == 0, f"workers failed with status {status}:\n{log.getvalue()[-6000:]}"
    return json.loads((tmp_path / "result.json").read_text())


def worker_main(spec_path: str) -> None:
    from looptrain.parallel import init_distributed, shutdown_distributed

    spec = json.loads(open(spec_path).read())
    recipe = make_recipe(spec["overrides"], spec["out_dir"])
    for key, value in spec["parallel_attrs"].items():
        setattr(recipe.parallel, key, value)
    env = init_distributed(recipe.train.device, "gloo", timeout_minutes=3)
    torch.set_num_threads(1)
    result = run_steps(recipe, env, spec["nan_step"], spec["crash"])
    if env.is_main:
        with open(spec["result"], "w") as f:
            json.dump(result, f)
    shutdown_distributed()


def assert_close(got: dict, want: dict, tol: float, nan_step: int | None = None, norm_tol: float | None = None) -> None:
    """Per-step losses (and the final eval loss) within `tol`, grad norms within `norm_tol`, relative."""
    assert len(got["losses"]) == len(want["losses"]) == STEPS
    for key, key_tol in (("losses", tol), ("grad_norms", tol if norm_tol is None else norm_tol)):
        for step, (a, b) in enumerate(zip(got[key], want[key])):
            if step == nan_step:
                assert not math.isfinite(a) and not math.isfinite(b), f"{key}[{step}]: {a}, {b} should be non-finite"
                continue
            assert math.isfinite(a), f"{key}[{step}] is not finite"
            assert abs(a - b) <= key_tol * max(1.0, abs(b)), f"{key}[{step}]: {a} vs reference {b} (tol {key_tol})"
    assert abs(got["val"] - want["val"]) <= tol * max(1.0, abs(want["val"]))


# ----------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fp32_reference() -> dict:
    ref = reference({})
    # the run must actually learn and clip, or equality would prove little
    assert ref["losses"][-1] < ref["losses"][0] - 0.05
    assert min(ref["grad_norms"]) > TINY["optim"]["clip_grad_norm"]
    return ref


@pytest.fixture(scope="session")
def deepspeed_comm_op() -> None:
    """Build DeepSpeed's CPU shared-memory comm op once (~70-120 s the first time, then cached
    under TORCH_EXTENSIONS_DIR, see conftest.py), so that no test's time limit includes it."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load()


# ------------------------------------------------------- single process


def test_activation_checkpointing_changes_no_loss(fp32_reference):
    for mode in ("block", "loop"):
        got = reference({"parallel": {"activation_checkpointing": mode}})
        assert_close(got, fp32_reference, 1e-6)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(fp32_reference):
    """parallel.compile: each block through torch.compile (inductor, C++ on CPU); fusion may
    reorder floating-point sums, hence a tolerance above the fp32 backends' 1e-5."""
    got = reference({"parallel": {"compile": True}})
    assert_close(got, fp32_reference, 1e-4)


def test_bf16_autocast_stays_near_fp32(fp32_reference):
    got = reference({"train": {"precision": "bf16"}})
    assert_close(got, fp32_reference, BF16_LOSS_TOL, norm_tol=BF16_NORM_TOL)
    assert got["losses"] != fp32_reference["losses"]  # bf16 really ran


def test_non_finite_gradient_skips_the_step():
    """A NaN step changes neither weights nor optimizer state, drops its gradients, reports a NaN norm."""
    from looptrain.model import build_model

    recipe = make_recipe({})
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    backend = build_backend(recipe, env)
    backend.setup(LoopedLMTrainModule(build_model(recipe.model), recipe.objective))
    step = [0, 1]
    poison_block_output(backend.model, step)
    batches = global_batches()

    def train_step(batch):
        tokens, targets = split_batch(batch)
        out = backend.forward_backward(tokens, targets, depth=recipe.model.loops, backprop_loops=None,
                                       measure_all_exits=False, last_micro_step=True)
        return out.loss.detach(), backend.optimizer_step(recipe.optim.lr)

    train_step(batches[0])
    step[0] = 1
    weights = {k: v.clone() for k, v in backend.module.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in backend.optimizer.state.values()]
    loss, grad_norm = train_step(batches[1])
    assert torch.isnan(loss) and not torch.isfinite(grad_norm)
    for key, value in backend.module.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(backend.optimizer.state.values(), moments))
    assert all(p.grad is None for p in backend.module.parameters())
    step[0] = 2
    loss, grad_norm = train_step(batches[2])
    assert torch.isfinite(loss) and torch.isfinite(grad_norm)


def test_mfu_peak_from_recipe_or_gpu_table():
    from looptrain.perf import GPU_PEAKS, peak_flops

    assert peak_flops(torch.device("cpu"), "fp32", override=123e12) == 123e12
    assert peak_flops(torch.device("cpu"), "fp32") != peak_flops(torch.device("cpu"), "fp32")  # NaN: no CPU MFU
    assert GPU_PEAKS["H100"]["bf16"] == 989e12


def test_fsdp2_only_options_are_rejected_elsewhere():
    from looptrain.config import RecipeError

    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    for parallel, named in (({"replicate": 2}, "parallel.replicate"), ({"param_dtype": "bf16"}, "param_dtype")):
        recipe = make_recipe({"parallel": parallel})
        with pytest.raises(RecipeError, match=named):
            build_backend(recipe, env).setup(LoopedLMTrainModule(torch.nn.Module(), recipe.objective))


def test_hsdp_mesh_must_divide_the_world():
    from looptrain.config import RecipeError
    from looptrain.parallel.fsdp2 import build_mesh

    with pytest.raises(RecipeError, match="parallel.replicate=3 does not divide the world size 4"):
        build_mesh("cpu", 4, 3)


# -------------------------------------------------------------------- FSDP2

HALF = {"train": {"micro_batch_size": GLOBAL_BATCH // 2}}


@pytest.mark.slow
def test_fsdp2_matches_single_process(tmp_path, fp32_reference):
    got = run_ranks(tmp_path, deep_merge(HALF, {"parallel": {"backend": "fsdp2"}}))
    assert_close(got, fp32_reference, FP32_TOL)


@pytest.mark.slow
def test_fsdp2_truncated_backprop(tmp_path):
    """The first loops run without grad: looped blocks then get no post-backward hook for those calls."""
    truncated = {"objective": {"backprop_loops": 1}}
    got = run_ranks(tmp_path, deep_merge(truncated, deep_merge(HALF, {"parallel": {"backend": "fsdp2"}})))
    assert_close(got, reference(truncated), FP32_TOL)


@pytest.mark.slow
def test_fsdp2_hsdp_accumulation_loop_checkpointing_and_nan_skip(tmp_path):
    """2-D (replicate, shard) mesh, two micro-steps per step, loop checkpointing, one NaN step."""
    overrides = {
        "parallel": {"backend": "fsdp2", "replicate": 2, "activation_checkpointing": "loop"},
        "train": {"micro_batch_size": GLOBAL_BATCH // 4, "grad_accum": 2},
    }
    got = run_ranks(tmp_path, overrides, nan_step=2)
    assert_close(got, reference(nan_step=2), FP32_TOL, nan_step=2)


@pytest.mark.slow
def test_fsdp2_resharding_looped_blocks_per_call(tmp_path, fp32_reference):
    """The memory-saving variant: looped blocks re-gathered at every call, block checkpointing."""
    overrides = deep_merge(HALF, {"parallel": {"backend": "fsdp2", "activation_checkpointing": "block"}})
    got = run_ranks(tmp_path, overrides, parallel_attrs={"reshard_looped_blocks": True})
    assert_close(got, fp32_reference, FP32_TOL)


@pytest.mark.slow
def test_fsdp2_bf16_stays_near_fp32(tmp_path, fp32_reference):
    overrides = deep_merge(HALF, {"parallel": {"backend": "fsdp2", "param_dtype": "bf16"},
                                  "train": {"precision": "bf16"}})
    got = run_ranks(tmp_path, overrides)
    assert_close(got, fp32_reference, BF16_LOSS_TOL, norm_tol=BF16_NORM_TOL)


# ---------------------------------------------------------------- DeepSpeed


def test_deepspeed_config_follows_the_recipe():
    from looptrain.parallel.deepspeed_backend import deepspeed_config

    recipe = make_recipe({
        "train": {"micro_batch_size": 3, "grad_accum": 5, "precision": "bf16"},
        "optim": {"lr": 2e-3, "betas": [0.8, 0.9], "eps": 1e-7, "weight_decay": 0.05, "clip_grad_norm": None},
        "parallel": {"backend": "deepspeed", "zero_stage": 3,
                     "deepspeed": {"zero_optimization": {"overlap_comm": True}, "train_batch_size": 60}},
    })
    config = deepspeed_config(recipe, world_size=4)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 5
    assert config["train_batch_size"] == 60
    assert config["gradient_clipping"] == 0.0
    assert config["bf16"] == {"enabled": True}
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": True}  # merged, not replaced
    assert config["optimizer"] == {"type": "AdamW", "params": {
        "lr": 2e-3, "betas": [0.8, 0.9], "eps": 1e-7, "weight_decay": 0.05, "torch_adam": True}}


@pytest.mark.parametrize("override, named", [
    ({"train_micro_batch_size_per_gpu": 2}, "train.micro_batch_size"),
    ({"zero_optimization": {"stage": 1}}, "parallel.zero_stage"),
    ({"optimizer": {"params": {"lr": 1.0}}}, "optim.lr"),
    ({"fp16": {"enabled": True}}, "train.precision=bf16"),
    ({"scheduler": {"type": "WarmupLR"}}, "optim.schedule"),
])
def test_deepspeed_overrides_cannot_contradict_the_recipe(override, named):
    from looptrain.config import RecipeError
    from looptrain.parallel.deepspeed_backend import deepspeed_config

    recipe = make_recipe({"parallel": {"backend": "deepspeed", "deepspeed": override}})
    with pytest.raises(RecipeError, match=named):
        deepspeed_config(recipe, world_size=2)



@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, extra, nan_step",
    [
        (1, {"train": {"micro_batch_size": GLOBAL_BATCH // 4, "grad_accum": 2}}, None),
        (2, HALF, 2),
        (3, deep_merge(HALF, {"parallel": {"activation_checkpointing": "loop"}}), None),
    ],
    ids=["zero1-accumulation", "zero2-nan-skip", "zero3-loop-checkpointing"],
)
def test_deepspeed_matches_single_process(tmp_path, deepspeed_comm_op, stage, extra, nan_step):
    overrides = deep_merge(extra, {"parallel": {"backend": "deepspeed", "zero_stage": stage}})
    got = run_ranks(tmp_path, overrides, nan_step=nan_step)
    assert_close(got, reference(nan_step=nan_step), FP32_TOL, nan_step=nan_step)
    written = json.loads((tmp_path / "runs" / "parallel-test" / "deepspeed_config.json").read_text())
    assert written["zero_optimization"]["stage"] == stage
    assert written["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.slow
def test_deepspeed_bf16_stays_near_fp32(tmp_path, deepspeed_comm_op, fp32_reference):
    overrides = deep_merge(HALF, {"parallel": {"backend": "deepspeed", "zero_stage": 2},
                                  "train": {"precision": "bf16"}})
    got = run_ranks(tmp_path, overrides)
    assert_close(got, fp32_reference, BF16_LOSS_TOL, norm_tol=BF16_NORM_TOL)
    written = json.loads((tmp_path / "runs" / "parallel-test" / "deepspeed_config.json").read_text())
    assert written["bf16"]["enabled"] is True


# ------------------------------------------------- end to end through the CLI

E2E_OVERRIDES = [
    "model.vocab_size=512", "model.max_seq_len=64", "model.d_model=64", "model.n_heads=4", "model.core_layers=1",
    "train.steps=6", "train.log_every=2", "train.val_every=3", "train.val_batches=2", "train.device=cpu",
    # the global sample order then depends only on the global batch, not on the world size
    "data.num_canonical_nodes=1",
]


def e2e_args(data_dir: str, out_dir, *extra: str) -> list[str]:
    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes/quickstart.yaml")
    return [recipe, f"data.dir={data_dir}", f"out_dir={out_dir}", *E2E_OVERRIDES, *extra]


def logged(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keys = ("train/loss", "train/grad_norm", "val/loss/4")
    return [{k: r[k] for k in ("step", *keys) if k in r} for r in rows if any(k in r for k in keys)]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, bible_data) -> list[dict]:
    from looptrain.config import load_recipe
    from looptrain.train import main_worker

    out = tmp_path_factory.mktemp("single")
    recipe = load_recipe(*_split(e2e_args(bible_data, out, "name=single", "train.micro_batch_size=8")))
    assert main_worker(recipe) == 0
    return logged(recipe.run_dir)


def _split(args: list[str]) -> tuple[str, list[str]]:
    return args[0], args[1:]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher, backend", [
    ("nproc", ["parallel.backend=fsdp2"]),
    ("nproc", ["parallel.backend=deepspeed", "parallel.zero_stage=3"]),
    ("deepspeed", ["parallel.backend=deepspeed", "parallel.zero_stage=2"]),
    ("torchrun", ["parallel.backend=fsdp2"]),
], ids=["nproc-fsdp2", "nproc-deepspeed-zero3", "deepspeed-launcher-zero2", "torchrun-fsdp2"])
def test_two_ranks_through_the_cli_train_like_one_process(
    tmp_path, bible_data, single_process_run, deepspeed_comm_op, launcher, backend
):
    """`looptrain train --nproc 2`, torchrun and DeepSpeed's own launcher, on real text: the same logged
    losses, grad norms and validation losses as one process with the same global batch, and a
    final checkpoint."""
    args = ["train", *e2e_args(bible_data, tmp_path, "name=two", "train.micro_batch_size=4", *backend)]
    if launcher == "nproc":
        cmd = [sys.executable, "-m", "looptrain.cli", *args, "--nproc", "2"]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(_free_port()), "-m", "looptrain.cli", *args]
    else:  # runs `python -m looptrain.cli --local_rank=N train ...` per rank
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
               "--master_port", str(_free_port()), "--module", "looptrain.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    got = logged(tmp_path / "two")
    assert [r["step"] for r in got] == [r["step"] for r in single_process_run] and len(got) >= 5
    for mine, ref in zip(got, single_process_run):
        assert mine.keys() == ref.keys()
        for key in mine:
            assert mine[key] == pytest.approx(ref[key], rel=FP32_TOL), (key, mine, ref)
    assert os.path.isdir(tmp_path / "two" / "checkpoints")
    assert "step 6/6" in proc.stdout


# ----------------------------------------------------------- local launcher


def python_ranks(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_launcher_prefixes_output_and_sets_rank_variables():
    out = io.StringIO()
    status = launch_workers(python_ranks("""
        import os
        print(os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"],
              os.environ["LOCAL_WORLD_SIZE"], os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]) > 0)
    """), 3, out=out)
    assert status == 0
    lines = sorted(out.getvalue().splitlines())
    assert lines == [f"[rank {r}] {r} 3 {r} 3 127.0.0.1 True" for r in range(3)]


@pytest.mark.slow
def test_launcher_crash_on_one_rank_ends_the_job(tmp_path):
    """Rank 1 raises mid-training; rank 0 is inside FSDP collectives. The job ends promptly
    with rank 1's status and its error, printed once."""
    spec = write_spec(tmp_path, deep_merge(HALF, {"parallel": {"backend": "fsdp2"}}), crash=(1, 2))
    out = io.StringIO()
    start = time.monotonic()
    status = launch_workers([sys.executable, os.path.abspath(__file__), str(spec)], 2, out=out,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout_s=120)
    elapsed = time.monotonic() - start
    log = out.getvalue()
    assert status == 1, log
    assert log.count("InjectedFailure: injected failure on rank 1 at step 2") == 1, log
    assert "[rank 1]" in log.split("InjectedFailure: injected failure")[0].splitlines()[-1]
    assert not (tmp_path / "result.json").exists()
    assert elapsed < 60, f"the job took {elapsed:.0f} s to stop"


def test_launcher_kills_a_rank_that_ignores_sigterm():
    """Rank 0 ignores SIGTERM and would sleep for 10 minutes: SIGKILL after the grace period."""
    out = io.StringIO()
    start = time.monotonic()
    status = launch_workers(python_ranks("""
        import os, signal, sys, time
        if os.environ["RANK"] == "1":
            time.sleep(0.5)
            sys.exit(3)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(600)
    """), 2, out=out, failure_grace_s=1.0)
    assert status == 3
    assert time.monotonic() - start < 20
    assert "[rank 0] ready" in out.getvalue()


def test_launcher_waits_for_peers_after_a_coordinated_halt():
    """HALTED is reached by every rank together: a slower rank 0 is not killed while it finishes."""
    out = io.StringIO()
    status = launch_workers(python_ranks("""
        import os, sys, time
        if os.environ["RANK"] == "0":
            time.sleep(1.5)  # e.g. writing the halt record
            print("halt record written", flush=True)
        sys.exit(17)
    """), 2, out=out, failure_grace_s=0.2)
    assert status == 17
    assert "[rank 0] halt record written" in out.getvalue()


def test_launcher_timeout_and_bad_arguments():
    status = launch_workers(python_ranks("import time; time.sleep(600)"), 2, out=io.StringIO(),
                            timeout_s=1.0, failure_grace_s=1.0)
    assert status == 124
    from looptrain.launch.local import launch_local

    with pytest.raises(ValueError, match="--nproc"):
        launch_local(["train", "r.yaml", "--nproc", "2"], 2)
    with pytest.raises(ValueError, match="nproc must be >= 1"):
        launch_workers(python_ranks("pass"), 0)


if __name__ == "__main__":
    worker_main(sys.argv[1])
