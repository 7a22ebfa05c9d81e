"""The transformers export: logits equal to looptrain's model at every depth, the KV cache,
early-exit decoding, the tokenizer round trip, loading with no looptrain importable,
`looptrain export` / `looptrain generate` and their bad-input errors.

Models are small and randomly initialised (weights perturbed away from their
init so that norm gains, decays, alpha and the gate are not at trivial values).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from looptrain import exit_codes
from looptrain.checkpoint.exported import save_exported
from looptrain.config import load_recipe
from looptrain.config.schema import ModelConfig
from looptrain.hf.export import export_hf
from looptrain.hf.runtime import import_transformers
from looptrain.model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [
    "def f(x):\n    return  x * 2\t# tab\n\n        deeply   indented",
    "In the beginning God created the heaven and the earth. 1234567890 and 3.14159",
    "Ünïcödé — naïve café, 日本語のテキスト, emoji 🙂🚀, Ελληνικά",
    "   leading spaces, trailing spaces   \n\n\n",
    "</s> <s> <unk> are text here",
]


def _small(recipe: str, **shrink) -> ModelConfig:
    overrides = [f"model.{k}={v}" for k, v in shrink.items()]
    return load_recipe(os.path.join(ROOT, recipe), overrides).model


# Each recipe at a size that runs in well under a second per depth.
RECIPES = {
    "quickstart": lambda: _small("recipes/quickstart.yaml"),
    "paper44m": lambda: _small("recipes/paper/44m/perloop_rmsnorm.yaml"),
    "paper44m_final_only": lambda: _small("recipes/paper/44m/perloop_final_only.yaml", d_model=64, n_heads=4,
                                          core_layers=2, vocab_size=500),
    "huginn": lambda: _small("recipes/styles/huginn.yaml", d_model=64, n_heads=4, loops=3, vocab_size=500,
                             max_seq_len=64),
    "ouro": lambda: _small("recipes/styles/ouro.yaml", d_model=64, n_heads=4, core_layers=2, vocab_size=500,
                           max_seq_len=64),
    "parcae": lambda: _small("recipes/styles/parcae.yaml", d_model=64, n_heads=4, loops=3, vocab_size=500,
                             max_seq_len=64),
}
TINY = dict(vocab_size=300, d_model=32, n_heads=4, core_layers=2, loops=3, max_seq_len=48)
VARIANTS = {
    "alpha_readout_add_layernorm_bias": dict(readout="alpha", injection="add", norm="layernorm", bias=True),
    "raw_readout_rmsnorm_carry_untied": dict(readout="raw", recurrence="rmsnorm", tied_embeddings=False),
    "contractive_everything_gate": dict(injection="contractive", recurrence="contractive", initial_state="zeros",
                                        exit_gate=True, prelude_layers=1, coda_layers=1, positions="rope"),
    "sandwich_concat_noise": dict(block_style="sandwich", injection="concat", initial_state="noise",
                                  initial_state_std=0.5, coda_layers=1),
}


def perturbed_model(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1 or p.numel() < 1_000_000:  # gains, decays, alpha, gate: away from their init
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def transformers():
    return import_transformers()


def export_and_load(model, tmp_path, transformers, **load_kwargs):
    src, out = tmp_path / "src", tmp_path / "hf"
    save_exported(model.state_dict(), model.cfg, src)
    export_hf(src, out, with_tokenizer=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, **load_kwargs)
    return hf.eval(), out


def looptrain_logits(model, ids, depth, seed=0):
    torch.manual_seed(seed)  # the noise initial state draws from the global generator
    return model.logits(model(ids, depth=depth).features[-1])


def hf_logits(hf, ids, depth, seed=0, **kw):
    torch.manual_seed(seed)
    return hf(ids, depth=depth, use_cache=False, **kw).logits


# ----------------------------------------------------------------- parity


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "paper44m" else n
                                  for n in [*RECIPES, *VARIANTS]])
def test_logits_equal_looptrain_at_every_depth(name, tmp_path, transformers):
    cfg = RECIPES[name]() if name in RECIPES else ModelConfig(**TINY, **VARIANTS[name])
    model = perturbed_model(cfg)
    hf, _ = export_and_load(model, tmp_path, transformers)
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for depth in range(1, 2 * cfg.loops + 1):
            ref, got = looptrain_logits(model, ids, depth), hf_logits(hf, ids, depth)
            assert (ref - got).abs().max().item() <= 1e-5, (name, depth)


def test_depth_is_a_knob_per_load_and_per_call(tmp_path, transformers):
    model = perturbed_model(ModelConfig(**TINY))
    hf, out = export_and_load(model, tmp_path, transformers)
    assert hf.config.inference_depth == 3
    deep = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, inference_depth=5)
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert torch.allclose(deep(ids, use_cache=False).logits, looptrain_logits(model, ids, 5), atol=1e-5)
        assert torch.allclose(hf(ids, use_cache=False).logits, looptrain_logits(model, ids, 3), atol=1e-5)
        with pytest.raises(ValueError, match="depth must be an integer >= 1"):
            hf(ids, depth=0)


# ----------------------------------------------------------------- KV cache


def incremental_logits(hf, ids, prefix, **kw):
    out = hf(ids[:, :prefix], use_cache=True, **kw)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(prefix, ids.shape[1]):
        out = hf(ids[:, t:t + 1], past_key_values=cache, use_cache=True, **kw)
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("name", ["quickstart", "huginn", "ouro", "parcae", "contractive_everything_gate"])
def test_cached_decoding_equals_recomputation(name, tmp_path, transformers):
    cfg = RECIPES[name]() if name in RECIPES else ModelConfig(**TINY, **VARIANTS[name])
    model = perturbed_model(cfg)
    # A fixed per-position noise table makes the noise initial state deterministic.
    hf, _ = export_and_load(model, tmp_path, transformers, initial_state_seed=7)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for depth in (cfg.loops, cfg.loops + 2):
            full = hf(ids, depth=depth, use_cache=False).logits
            assert (incremental_logits(hf, ids, 4, depth=depth) - full).abs().max().item() <= 1e-5
        prompt = ids[:1, :4]
        greedy = hf.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt),
                             pad_token_id=0, eos_token_id=None)
        seq = prompt
        for _ in range(12):
            nxt = hf(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat((seq, nxt), dim=1)
    assert torch.equal(greedy, seq)


def test_left_padded_batch_generation_matches_each_prompt_alone(tmp_path, transformers):
    cfg = ModelConfig(**{**TINY, "positions": "rope"})
    hf, _ = export_and_load(perturbed_model(cfg), tmp_path, transformers)
    long, short = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[11, 12]])
    batch = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 0, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        both = hf.generate(batch, attention_mask=mask, **kw)
        alone = [hf.generate(p, attention_mask=torch.ones_like(p), **kw) for p in (long, short)]
    assert torch.equal(both[0], alone[0][0]) and torch.equal(both[1, 3:], alone[1][0])


# ----------------------------------------------------------------- early exit


def test_early_exit_thresholds_at_the_ends(tmp_path, transformers):
    model = perturbed_model(ModelConfig(**TINY))
    hf, _ = export_and_load(model, tmp_path, transformers)
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        never = hf(ids, use_cache=False, exit_policy="max_prob", exit_threshold=2.0)
        always = hf(ids, use_cache=False, exit_policy="max_prob", exit_threshold=0.0)
        assert torch.allclose(never.logits, looptrain_logits(model, ids, 3), atol=1e-5)
        assert (never.exit_loops == 3).all() and (always.exit_loops == 1).all() and always.loops_run == 1
        assert torch.allclose(always.logits, looptrain_logits(model, ids, 1), atol=1e-5)


@pytest.mark.parametrize("policy", ["max_prob", "entropy", "kl", "gate"])
def test_early_exit_decoding_with_cache_equals_the_same_policy_recomputed(policy, tmp_path, transformers):
    """Under exit_kv=copy a full pass and token-by-token decoding apply the same rule, so they agree;
    under exit_kv=compute every token that did not exit early has its exact full-depth logits."""
    cfg = ModelConfig(**{**TINY, "exit_gate": True, "loops": 4, "coda_layers": 1})
    model = perturbed_model(cfg)
    hf, _ = export_and_load(model, tmp_path, transformers)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        low, high = 0.0, 1.01  # every token exits at loop 1 / none exits early: bisect to a split
        for _ in range(40):
            kw = dict(exit_policy=policy, exit_threshold=(low + high) / 2)
            full = hf(ids, use_cache=False, exit_kv="copy", **kw)
            early = int((full.exit_loops < 4).sum())
            if 0 < early < 16:
                break
            low, high = (kw["exit_threshold"], high) if early == 16 else (low, kw["exit_threshold"])
        assert 0 < early < 16, (policy, full.exit_loops)  # some, not all, tokens exit early
        inc = incremental_logits(hf, ids, 1, exit_kv="copy", **kw)
        assert (inc - full.logits).abs().max().item() <= 1e-5
        exact = hf(ids, use_cache=False, exit_kv="compute", **kw)
        deep = hf(ids, use_cache=False).logits
        stayed = exact.exit_loops[0] == 4
        assert torch.allclose(exact.logits[0, stayed], deep[0, stayed], atol=1e-5)
        assert torch.allclose(incremental_logits(hf, ids, 1, exit_kv="compute", **kw), exact.logits, atol=1e-5)


def test_generate_takes_depth_and_exit_policy_per_call(tmp_path, transformers):
    """`generate(..., depth=, exit_policy=, exit_threshold=)` (cached) equals greedy recomputation of the whole
    prefix with the same knobs, and at depth 5 equals looptrain's own model at depth 5."""
    model = perturbed_model(ModelConfig(**{**TINY, "loops": 4}))
    hf, _ = export_and_load(model, tmp_path, transformers)
    prompt = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for knobs in ({"depth": 5}, {"exit_policy": "max_prob", "exit_threshold": 0.0045},
                      {"exit_policy": "entropy", "exit_threshold": 0.03, "depth": 6}):
            got = hf.generate(prompt, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(prompt),
                              pad_token_id=0, eos_token_id=None, **knobs)
            seq = prompt
            for _ in range(10):
                nxt = hf(seq, use_cache=False, **knobs).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat((seq, nxt), dim=1)
            assert torch.equal(got, seq), knobs
            if "exit_policy" not in knobs:
                ref = prompt
                for _ in range(10):
                    ref = torch.cat((ref, looptrain_logits(model, ref, 5)[:, -1].argmax(-1, keepdim=True)), dim=1)
                assert torch.equal(got, ref)


# ----------------------------------------------------------------- tokenizer + no looptrain


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    from looptrain.data.tokenizer import train_tokenizer

    docs = [open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()] + TEXTS
    return str(train_tokenizer(docs, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=600))


def _export_with_tokenizer(tmp_path, sp_model, cfg):
    model = perturbed_model(cfg)
    src, out = tmp_path / "src", tmp_path / "hf"
    save_exported(model.state_dict(), cfg, src)
    export_hf(src, out, tokenizer=sp_model)
    return model, out


NO_LOOPTRAIN_SCRIPT = r"""
import json, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "looptrain" or name.startswith("looptrain."):
            raise ImportError("looptrain is not importable here")
sys.meta_path.insert(0, Block())
try:
    import looptrain
    sys.exit("looptrain imported")
except ImportError:
    pass
import torch
# This machine's torchvision is a CUDA build beside a CPU torch (see looptrain.hf.runtime):
# declare its two operators so that transformers imports at all. Not needed elsewhere.
lib = torch.library.Library("torchvision", "FRAGMENT")
for s in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
          "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
    try:
        lib.define(s)
    except RuntimeError:
        pass
from transformers import AutoModelForCausalLM, AutoTokenizer
d, texts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
ids = [tok(t)["input_ids"] for t in texts]
round_trip = [tok.decode(i) for i in ids]
x = torch.tensor([ids[1][:10]])
with torch.no_grad():
    logits = [model(x, depth=k, use_cache=False).logits.tolist() for k in range(1, 7)]
    gen = model.generate(x, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0,
                         eos_token_id=None)
print(json.dumps({"ids": ids, "round_trip": round_trip, "logits": logits, "input": x.tolist(),
                  "generated": gen.tolist(), "modules": sorted(m for m in sys.modules if "looptrain" in m)}))
"""


def test_export_loads_and_round_trips_with_no_looptrain_importable(tmp_path, sp_model):
    from looptrain.data.tokenizer import Tokenizer

    cfg = ModelConfig(**{**TINY, "vocab_size": 600, "coda_layers": 1, "positions": "rope"})
    model, out = _export_with_tokenizer(tmp_path, sp_model, cfg)
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "README.md", "tokenizer.model",
            "modeling_looptrain.py", "model.safetensors", "model_config.json"} <= set(os.listdir(out))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # its own dynamic-module cache
    proc = subprocess.run([sys.executable, "-I", "-c", NO_LOOPTRAIN_SCRIPT, str(out), json.dumps(TEXTS)],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    tokenizer = Tokenizer.load(sp_model)
    assert got["ids"] == [tokenizer.encode(t) for t in TEXTS]
    assert got["round_trip"] == TEXTS
    assert not [m for m in got["modules"] if m == "looptrain" or m.startswith("looptrain.")]
    x = torch.tensor(got["input"])
    with torch.no_grad():
        for depth in range(1, 7):
            ref = looptrain_logits(model, x, depth)
            assert (torch.tensor(got["logits"][depth - 1]) - ref).abs().max().item() <= 1e-5
        seq = x
        for _ in range(8):
            seq = torch.cat((seq, looptrain_logits(model, seq, 3)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert got["generated"] == seq.tolist()


def test_tokenizer_matches_looptrain_in_process(tmp_path, sp_model, transformers):
    from looptrain.data.tokenizer import Tokenizer

    _, out = _export_with_tokenizer(tmp_path, sp_model, ModelConfig(**{**TINY, "vocab_size": 600}))
    tok = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    ref = Tokenizer.load(sp_model)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == ref.encode(text) and tok.decode(ids) == text
    assert tok.eos_token_id == ref.eos_id and tok.bos_token_id == ref.bos_id


def test_model_card_holds_recipe_tokens_and_norms(tmp_path, sp_model):
    _, out = _export_with_tokenizer(tmp_path, sp_model, ModelConfig(**{**TINY, "vocab_size": 600}))
    card = (out / "README.md").read_text()
    assert "training tokens: unknown" in card and "K=3" in card and "## Recipe" in card
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_looptrain.LoopTrainForCausalLM"
    assert cfg["inference_depth"] == 3 and json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


# ----------------------------------------------------------------- CLI and bad input


def _run_cli(args, capsys):
    from looptrain.cli import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_cli_streams_and_matches_greedy(tmp_path, sp_model, capsys):
    from looptrain.data.tokenizer import Tokenizer
    from looptrain.generate import Knobs, Sampling, generate_steps, hf_model_from_export

    cfg = ModelConfig(**{**TINY, "vocab_size": 600, "max_seq_len": 64})
    model, out = _export_with_tokenizer(tmp_path, sp_model, cfg)
    code, stdout, stderr = _run_cli(["generate", str(out), "--prompt", "In the beginning", "--max-new-tokens", "12",
                                     "--temperature", "0", "--depth", "4"], capsys)
    assert code == exit_codes.OK, stderr
    tok = Tokenizer.load(sp_model)
    seq = tok.encode("In the beginning")
    with torch.no_grad():
        for _ in range(12):
            nxt = int(looptrain_logits(model, torch.tensor([seq]), 4)[0, -1].argmax())
            seq.append(nxt)
            if nxt == tok.eos_id:
                break
    assert stdout == tok.decode(seq) + "\n" and "tok/s" in stderr
    hf = hf_model_from_export(out)
    sampling = Sampling(max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=3, stop_at_eos=False)
    cached = [s.token for s in generate_steps(hf, seq[:4], sampling, Knobs(depth=2))]
    recomputed = [s.token for s in generate_steps(hf, seq[:4], sampling, Knobs(depth=2), use_cache=False)]
    assert cached == recomputed and len(cached) == 10


def test_bad_inputs_are_one_line_exit_2(tmp_path, sp_model, capsys):
    cfg = ModelConfig(**{**TINY, "vocab_size": 600})
    model, out = _export_with_tokenizer(tmp_path, sp_model, cfg)
    src = tmp_path / "src"

    def one_line_error(args, needle):
        code, _, err = _run_cli(args, capsys)
        assert code == exit_codes.BAD_INPUT and needle in err and len(err.strip().splitlines()) == 1, err

    one_line_error(["generate", str(out), "--prompt", "x", "--depth", "0"], "--depth must be >= 1")
    one_line_error(["generate", str(out), "--prompt", "x", "--exit-policy", "gate"], "needs a model trained with")
    one_line_error(["export", str(src), str(tmp_path / "again")], "no recipe says which dataset")
    # a recipe beside the export naming a dataset without a tokenizer
    (tmp_path / "data_without_tokenizer").mkdir()
    (src / "recipe.yaml").write_text(f"data:\n  dir: {tmp_path / 'data_without_tokenizer'}\n")
    one_line_error(["export", str(src), str(tmp_path / "again")], "has no tokenizer.model")
    one_line_error(["generate", str(src), "--prompt", "x"], "has no tokenizer.model")
    # a model the exported code cannot express
    config = json.loads((src / "model_config.json").read_text())
    config["model"]["positions"] = "alibi"
    (src / "model_config.json").write_text(json.dumps(config))
    one_line_error(["export", str(src), str(tmp_path / "again"), "--tokenizer", sp_model], "cannot be expressed")
    one_line_error(["export", str(src), str(out)], "already holds an export")
    assert not (tmp_path / "again").exists()


def test_old_format_stays_available(tmp_path, sp_model, capsys):
    from looptrain.checkpoint.exported import load_exported

    cfg = ModelConfig(**{**TINY, "vocab_size": 600})
    _, out = _export_with_tokenizer(tmp_path, sp_model, cfg)
    # the hf folder is also a plain looptrain export
    assert load_exported(out).cfg == cfg
    code, _, err = _run_cli(["export", str(out), str(tmp_path / "plain"), "--format", "looptrain"], capsys)
    assert code == exit_codes.BAD_INPUT and len(err.strip().splitlines()) == 1  # the old format reads checkpoints


@pytest.mark.slow
def test_export_and_generate_from_a_trained_run(tmp_path, bible_data, capsys, transformers):
    """A real run directory: `looptrain export RUN OUT` consolidates its checkpoint, ships the dataset's
    tokenizer and a model card with the training tokens and per-loop norms; `looptrain generate RUN` and
    the export decode the same greedy text."""
    from looptrain.data.loader import SINGLE_PROCESS_ENV
    from looptrain.train import main_worker

    recipe = load_recipe(os.path.join(ROOT, "recipes/quickstart.yaml"), [
        f"data.dir={bible_data}", f"out_dir={tmp_path}", "name=tiny", "model.vocab_size=512", "model.max_seq_len=64",
        "model.d_model=32", "model.n_heads=4", "model.core_layers=1", "model.loops=3", "train.micro_batch_size=4",
        "train.steps=2", "train.log_every=1", "train.val_every=0", "optim.schedule.warmup_steps=0",
    ])
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SINGLE_PROCESS_ENV.items():
            mp.setenv(key, value)
        assert main_worker(recipe) == exit_codes.OK
    capsys.readouterr()
    out = tmp_path / "exported"
    code, stdout, stderr = _run_cli(["export", recipe.run_dir, str(out)], capsys)
    assert code == exit_codes.OK, stderr
    card = (out / "README.md").read_text()
    assert f"training tokens: {2 * 4 * 64:,} (step 2)" in card and "| 3 |" in card and "quickstart" in card
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    assert hf.config.inference_depth == 3
    args = ["--prompt", "And God said", "--max-new-tokens", "10", "--temperature", "0"]
    code, from_run, err = _run_cli(["generate", recipe.run_dir, *args], capsys)
    assert code == exit_codes.OK, err
    code, from_export, err = _run_cli(["generate", str(out), *args], capsys)
    assert code == exit_codes.OK, err
    assert from_run == from_export and from_run.startswith("And God said")
