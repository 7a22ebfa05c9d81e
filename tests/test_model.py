"""The looped LM family: shapes over the architecture grid, the paper's parameter
counts, the readout blind spot, scale control over many loops, truncated backprop,
extrapolation, causality and FLOP accounting."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from looptrain.config.schema import ModelConfig, RecipeError, literal_choices
from looptrain.model import LoopedLM, LoopOutput, build_model

CHOICES = literal_choices(ModelConfig)  # the schema's Literal values: the one list of each model choice
READOUTS, RECURRENCES, INJECTIONS = CHOICES["readout"], CHOICES["recurrence"], CHOICES["injection"]
# (block_style, positions, initial_state, norm): cycled over the 48 readout x recurrence
# x injection cases, each of these 24 variants drawn twice (a case without injection
# always starts from the embeddings, the only start that lets the tokens in).
VARIANTS = list(itertools.product(*(CHOICES[key] for key in ("block_style", "positions", "initial_state", "norm"))))


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, d_model=16, n_heads=2, core_layers=2, loops=3, max_seq_len=16, mlp_ratio=2.0)
    base.update(overrides)
    return ModelConfig(**base)


def make(seed: int = 0, **overrides) -> LoopedLM:
    torch.manual_seed(seed)
    return build_model(tiny(**overrides))


def tokens(batch: int = 2, seq: int = 10, vocab: int = 61, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def token_radial_cosine(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """max over tokens of |<g_t, h_t>| / (|g_t| |h_t|): the radial share of the gradient."""
    return ((grad * h).sum(-1).abs() / (grad.norm(dim=-1) * h.norm(dim=-1))).max()


# ------------------------------------------------------------------- shapes


GRID = list(itertools.product(READOUTS, RECURRENCES, INJECTIONS))


@pytest.mark.parametrize("index", range(len(GRID)), ids=["-".join(c) for c in GRID])
def test_every_architecture_combination_builds_runs_and_backpropagates(index):
    readout, recurrence, injection = GRID[index]
    block_style, positions, initial_state, norm = VARIANTS[index % len(VARIANTS)]
    if injection == "none":
        initial_state = "embeddings"  # the only start that lets the tokens in (see the rejection test)
    model = make(
        readout=readout, recurrence=recurrence, injection=injection, block_style=block_style,
        positions=positions, initial_state=initial_state, norm=norm, exit_gate=index % 2 == 0,
        prelude_layers=index % 3 == 0, coda_layers=index % 4 == 1,
    )
    x = tokens()
    out = model(x)
    assert isinstance(out, LoopOutput)
    assert len(out.states) == len(out.features) == 3
    for h, feats in zip(out.states, out.features):
        assert h.shape == feats.shape == (2, 10, 16)
        assert torch.isfinite(h).all() and torch.isfinite(feats).all()
    if model.cfg.exit_gate:
        assert [g.shape for g in out.gate_logits] == [(2, 10)] * 3
    else:
        assert out.gate_logits is None
    assert model.logits(out.features[-1]).shape == (2, 10, 61)

    loss = sum(F.cross_entropy(model.logits(f).flatten(0, 1), x.flatten()) for f in out.features)
    if out.gate_logits is not None:
        loss = loss + sum(g.sum() for g in out.gate_logits)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name


def test_every_model_choice_has_one_builder_per_schema_value_and_no_other():
    """Each Literal key of ModelConfig has a table in the model, keyed by exactly its values."""
    from looptrain.model.block import NORMALISED_BRANCH_OUTPUTS
    from looptrain.model.init import INIT_SCHEMES
    from looptrain.model.injection import INJECTIONS
    from looptrain.model.looped_lm import INITIAL_STATES
    from looptrain.model.norms import NORMS
    from looptrain.model.positions import POSITIONS
    from looptrain.model.readout import READOUTS as READOUT_BUILDERS
    from looptrain.model.recurrence import CARRY_NORMS, SKIP_DECAYS

    tables = {
        "norm": [NORMS], "block_style": [NORMALISED_BRANCH_OUTPUTS], "positions": [POSITIONS], "init": [INIT_SCHEMES],
        "injection": [INJECTIONS], "initial_state": [INITIAL_STATES], "readout": [READOUT_BUILDERS],
        "recurrence": [SKIP_DECAYS, CARRY_NORMS],
    }
    assert set(tables) == set(CHOICES), "a model.* Literal key without a builder table, or a table without a key"
    for key, key_tables in tables.items():
        for table in key_tables:
            assert set(table) == set(CHOICES[key]), f"model.{key}: table {sorted(table)} vs schema {CHOICES[key]}"


def test_a_choice_missing_from_its_table_is_named():
    from looptrain.model.choices import choose

    with pytest.raises(ValueError, match=r"model\.readout: unknown value 'fancy'; use one of rmsnorm, raw"):
        choose({"rmsnorm": 1, "raw": 2}, tiny(readout="fancy"), "readout")


@pytest.mark.parametrize("readout", READOUTS)
def test_readout_says_whether_the_last_exit_reads_differently(readout):
    """`depends_on_last_exit` is what evaluation at depth k needs to know; it must match the readout's behaviour."""
    model = make(readout=readout)
    h = torch.randn(2, 5, 16) * 5.0
    with torch.no_grad():
        differs = not torch.equal(model.readout(h, True), model.readout(h, False))
    assert model.readout.depends_on_last_exit == differs


@pytest.mark.parametrize("initial_state", ["zeros", "noise"])
def test_a_start_that_ignores_the_tokens_needs_an_injection(initial_state):
    with pytest.raises(RecipeError, match="model.injection"):
        build_model(tiny(initial_state=initial_state, injection="none"))


def test_bad_inputs_are_named():
    model = make()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(seq=17))
    with pytest.raises(ValueError, match="depth"):
        model(tokens(), depth=0)
    with pytest.raises(ValueError, match="backprop_loops"):
        model(tokens(), backprop_loops=0)
    with pytest.raises(RecipeError, match="n_heads"):
        build_model(tiny(n_heads=3))
    with pytest.raises(RecipeError, match="readout"):
        build_model(tiny(readout="layernorm"))


# ---------------------------------------------------------- parameter counts


def paper_config(d_model: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=20000, d_model=d_model, n_heads=heads, core_layers=layers, loops=4, max_seq_len=256,
        mlp_ratio=4.0, tied_embeddings=True, dropout=0.1, readout="rmsnorm", recurrence="residual",
    )


@pytest.mark.parametrize(
    "d_model, layers, heads, expected_total, reference_total",
    [
        # tok 20000*512 + pos 256*512 = 10,371,072
        # + 8 layers * (qkv 3*512^2 + out 512^2 + SwiGLU 3*512*2048 + 2 norms*512 = 4,195,328) = 33,562,624
        # + readout RMSNorm 512                                           -> 43,934,208
        (512, 8, 8, 43_934_208, 43_935_234),
        # tok 20000*768 + pos 256*768 = 15,556,608
        # + 12 layers * (16*768^2 + 2*768 = 9,438,720) = 113,264,640 + readout RMSNorm 768 -> 128,822,016
        (768, 12, 12, 128_822_016, 128_823_554),
    ],
    ids=["44m", "129m"],
)
def test_paper_configs_reproduce_the_reference_parameter_counts(d_model, layers, heads, expected_total, reference_total):
    with torch.device("meta"):
        model = build_model(paper_config(d_model, layers, heads))
    counts = model.parameter_counts()
    assert counts["total"] == expected_total
    assert counts["embeddings"] == 20000 * d_model + 256 * d_model
    assert counts["core"] == layers * (16 * d_model**2 + 2 * d_model)
    assert counts["head"] == counts["prelude"] == counts["coda"] == 0
    assert counts["other"] == d_model  # the readout norm's gain
    # The reference AutoregressiveLoopLM also instantiates, whether used or not, an
    # inter-loop norm (d), an exit gate Linear(d, 1) with bias (d + 1) and a scalar
    # damping parameter (1): 2d + 2 parameters that its baseline never uses.
    assert reference_total - expected_total == 2 * d_model + 2


def test_tied_head_shares_the_embedding_storage_and_untied_head_does_not():
    tied = make(tied_embeddings=True)
    assert tied.head_weight is tied.tok_embed.weight
    assert tied.head_weight.data_ptr() == tied.tok_embed.weight.data_ptr()
    assert tied.parameter_counts()["head"] == 0

    untied = make(tied_embeddings=False)
    assert untied.head_weight.data_ptr() != untied.tok_embed.weight.data_ptr()
    assert untied.parameter_counts()["head"] == 61 * 16
    assert untied.parameter_counts()["total"] == tied.parameter_counts()["total"] + 61 * 16


def test_counts_split_into_parts_that_sum_to_the_total():
    model = make(prelude_layers=1, coda_layers=2, injection="concat", recurrence="contractive", exit_gate=True)
    counts = model.parameter_counts()
    layer = 16 * 3 * 16 + 16 * 16 + 3 * 16 * 32 + 2 * 16
    assert (counts["prelude"], counts["core"], counts["coda"]) == (layer, 2 * layer, 2 * layer)
    # concat adapter 32*16, skip decay 16, readout gain 16, exit gate 16 + 1
    assert counts["other"] == 32 * 16 + 16 + 16 + 17
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]


def test_meta_build_then_materialise_matches_a_direct_build():
    cfg = tiny(positions="rope", injection="contractive", recurrence="contractive", readout="alpha")
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(3)
    model.init_weights()
    direct = LoopedLM(cfg)
    torch.manual_seed(3)
    direct.init_weights()
    for (name, a), (_, b) in zip(model.state_dict(keep_vars=True).items(), direct.state_dict(keep_vars=True).items()):
        assert torch.equal(a, b), name
    assert torch.equal(model.core.rotary.cos, direct.core.rotary.cos)
    x = tokens()
    assert torch.equal(model(x).features[-1], direct(x).features[-1])


def test_normal_init_uses_init_std():
    model = make(d_model=64, n_heads=4, init_std=0.05)
    assert model.tok_embed.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert model.core.layers[0].mlp.w1.weight.std().item() == pytest.approx(0.05, rel=0.05)


def test_torch_default_init_matches_the_reference_code():
    from looptrain.model.init import initialize

    model = make(d_model=64, n_heads=4)
    initialize(model, std=0.02, scheme="torch_default")
    assert model.tok_embed.weight.std().item() == pytest.approx(1.0, rel=0.05)  # nn.Embedding: N(0, 1)
    w1 = model.core.layers[0].mlp.w1.weight
    assert w1.abs().max().item() <= 1 / 64**0.5  # nn.Linear: U(+-1/sqrt(fan_in))
    with pytest.raises(ValueError, match="model.init"):
        initialize(model, std=0.02, scheme="xavier")


# ---------------------------------------------------------------- blind spot


def exit_radial_cosines(readout: str) -> list[float]:
    """For each exit k, the radial share of d CE_k / d h_k (through the readout alone).

    RMSNorm's eps breaks scale invariance by about eps / (mean(h^2) + eps): at the
    0.02 init the state's mean square is ~1e-3, so eps=1e-5 would leak ~1 %. A
    tiny eps isolates the geometry being tested."""
    model = make(readout=readout, loops=3, norm_eps=1e-12).double()
    x = tokens()
    out = model(x)
    cosines = []
    for h, feats in zip(out.states, out.features):
        loss = F.cross_entropy(model.logits(feats).flatten(0, 1), x.flatten())
        (grad,) = torch.autograd.grad(loss, h, retain_graph=True)
        cosines.append(token_radial_cosine(grad, h).item())
    return cosines


def test_rmsnorm_readout_gradient_has_no_radial_component():
    assert max(exit_radial_cosines("rmsnorm")) < 1e-5


@pytest.mark.parametrize("readout", ["raw", "alpha"])
def test_scale_visible_readouts_pass_a_radial_gradient(readout):
    assert min(exit_radial_cosines(readout)) > 1e-3


def test_norm_penalty_gives_the_objective_a_radial_gradient_behind_rmsnorm():
    """The whole objective (per-loop CE + penalty) w.r.t. the last loop's state, which feeds
    only its exit and the penalty: no radial share without the penalty, a clear one with the
    paper's lambda = 0.01 (small at init, where mean(h^2) ~ 1e-3 makes the penalty's pull weak)."""
    from looptrain.config.schema import NormPenaltyConfig, ObjectiveConfig
    from looptrain.objectives import compute_objective

    model = make(readout="rmsnorm", loops=3, norm_eps=1e-12).double()
    x = tokens()
    out = model(x)
    cosines = {}
    for weight in (0.0, 0.01):
        cfg = ObjectiveConfig(norm_penalty=NormPenaltyConfig(weight=weight))
        loss = compute_objective(out.states, out.features, model.head_weight, x, cfg).loss
        (grad,) = torch.autograd.grad(loss, out.states[-1], retain_graph=True)
        cosines[weight] = token_radial_cosine(grad, out.states[-1]).item()
    assert cosines[0.0] < 1e-6
    assert cosines[0.01] > 1e-4 and cosines[0.01] > 100 * cosines[0.0]


def test_final_only_readout_is_blind_only_at_the_last_exit():
    *intermediate, last = exit_radial_cosines("final_only")
    assert min(intermediate) > 1e-3
    assert last < 1e-5


def test_alpha_readout_spans_raw_to_reference_scale():
    model = make(readout="alpha", alpha_ref_rms=3.0)
    h = torch.randn(2, 5, 16) * 7.0
    with torch.no_grad():
        model.readout.alpha_logit.fill_(40.0)  # alpha = 1: exactly raw
        assert torch.equal(model.readout(h, False), h)
        model.readout.alpha_logit.fill_(-40.0)  # alpha = 0: every token at RMS s_ref
        rms = model.readout(h, False).pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.full_like(rms, 3.0), rtol=1e-4)


# ---------------------------------------------------------- scale over loops


def rms_trajectory(loops: int = 64, **overrides) -> torch.Tensor:
    """Per-loop RMS of the raw state with weights 10x the usual init (large updates)."""
    model = make(d_model=32, n_heads=4, init_std=0.2, **overrides).eval()
    with torch.no_grad():
        out = model(tokens(seq=8), depth=loops)
    return torch.stack([h.pow(2).mean().sqrt() for h in out.states])


def test_residual_recurrence_grows_the_state_without_bound():
    rms = rms_trajectory(recurrence="residual")
    assert rms[63] > 1.6 * rms[31]  # roughly linear growth: each loop adds a similar update
    assert rms[48:].max() > 1.25 * rms[16:32].max()  # fails the bound the controlled ones meet


@pytest.mark.parametrize(
    "overrides",
    [
        dict(recurrence="rmsnorm"),
        dict(recurrence="contractive"),
        dict(injection="contractive"),
        dict(injection="contractive", recurrence="contractive", initial_state="noise"),
    ],
    ids=["rmsnorm-carry", "contractive-recurrence", "contractive-injection", "both-contractive"],
)
def test_scale_controlled_recurrences_stay_bounded(overrides):
    rms = rms_trajectory(**overrides)
    assert torch.isfinite(rms).all()
    # Settled (or settling geometrically): the last quarter is barely above the second.
    assert rms[48:].max() < 1.25 * rms[16:32].max()


# ---------------------------------------------------------- truncated backprop


def test_truncated_backprop_runs_early_loops_without_graph():
    model = make(exit_gate=True)
    out = model(tokens(), depth=4, backprop_loops=1)
    assert [h.requires_grad for h in out.states] == [False, False, False, True]
    assert [f.requires_grad for f in out.features] == [False, False, False, True]
    assert [g.requires_grad for g in out.gate_logits] == [False, False, False, True]
    full = model(tokens(), depth=4, backprop_loops=4)
    assert all(h.requires_grad for h in full.states)


def test_truncated_backprop_gradient_is_the_last_loop_on_a_detached_input():
    model = make()
    x = tokens()

    def last_exit_loss(features: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model.logits(features).flatten(0, 1), x.flatten())

    core_params = list(model.core.parameters())
    out = model(x, depth=3, backprop_loops=1)
    truncated = torch.autograd.grad(last_exit_loss(out.features[-1]), core_params)

    # The same loop, by hand, from the (graph-free) state the second loop left behind.
    h = model.core(out.states[1], None)
    by_hand = torch.autograd.grad(last_exit_loss(model.readout(h, True)), core_params)
    for a, b in zip(truncated, by_hand):
        torch.testing.assert_close(a, b)

    full = torch.autograd.grad(last_exit_loss(model(x, depth=3).features[-1]), core_params)
    assert not torch.allclose(full[0], truncated[0])


# -------------------------------------------------- extrapolation, causality


@pytest.mark.parametrize("recurrence", RECURRENCES)
def test_running_more_loops_than_trained_extends_the_same_trajectory(recurrence):
    model = make(recurrence=recurrence).eval()
    x = tokens()
    with torch.no_grad():
        trained, deeper = model(x), model(x, depth=9)
    assert len(deeper.states) == 9
    for a, b in zip(trained.states, deeper.states):
        torch.testing.assert_close(a, b)
    assert torch.isfinite(deeper.features[-1]).all()


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_changing_a_future_token_leaves_earlier_positions_unchanged(positions):
    model = make(positions=positions, prelude_layers=1, coda_layers=1, injection="add").eval()
    x = tokens(seq=12)
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 61
    with torch.no_grad():
        a, b = model(x), model(y)
    for fa, fb in zip(a.features, b.features):
        torch.testing.assert_close(fa[:, :7], fb[:, :7], rtol=0, atol=1e-6)
        assert not torch.allclose(fa[:, 7], fb[:, 7])


def test_rope_attention_scores_depend_only_on_relative_position():
    from looptrain.model.rotary import RotaryTables, apply_rotary

    tables = RotaryTables(head_dim=8, max_seq_len=32, theta=10000.0)
    cos, sin = tables(32)
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def score(m: int, n: int) -> torch.Tensor:
        at = lambda v, p: apply_rotary(v.view(1, 1, 1, 8), cos[p : p + 1], sin[p : p + 1]).flatten()
        return at(q, m) @ at(k, n)

    torch.testing.assert_close(score(5, 2), score(25, 22))
    torch.testing.assert_close(score(3, 3), q @ k)  # zero offset: no rotation
    assert not torch.allclose(score(5, 2), score(5, 3))


def test_activation_checkpointing_of_the_whole_loop_keeps_outputs_and_gradients():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = make(positions="rope", injection="concat", recurrence="contractive")
    x = tokens()

    def loss_and_grads():
        model.zero_grad()
        loss = sum(F.cross_entropy(model.logits(f).flatten(0, 1), x.flatten()) for f in model(x).features)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain_grads = loss_and_grads()
    model.core = checkpoint_wrapper(model.core)
    wrapped_loss, wrapped_grads = loss_and_grads()
    torch.testing.assert_close(plain_loss, wrapped_loss)
    for a, b in zip(plain_grads, wrapped_grads):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------- FLOPs


def test_paper_44m_training_flops_per_token():
    with torch.device("meta"):
        model = build_model(paper_config(512, 8, 8))
    # Per loop and token, forward: 2 * 8 layers * 16 * 512^2 (matmuls) = 67,108,864
    # + 8 layers * 4 * 256 * 512 (attention, full T x T) = 4,194,304 + 2 * 20000 * 512 (head) = 20,480,000
    # = 91,783,168; 4 loops, x3 for forward + backward.
    assert model.flops_per_token() == 3 * 4 * 91_783_168 == 1_101_398_016
    assert model.flops_per_token(training=False) == 4 * 91_783_168


def test_flops_scale_with_depth_sequence_and_truncation():
    model = make(prelude_layers=1, coda_layers=1, injection="concat", exit_gate=True)
    per_loop = model.flops_per_token(depth=5, training=False) - model.flops_per_token(depth=4, training=False)
    assert per_loop > 0
    assert model.flops_per_token(depth=8) - model.flops_per_token(depth=4) == pytest.approx(4 * 3 * per_loop)
    assert model.flops_per_token(depth=4) == pytest.approx(3 * model.flops_per_token(depth=4, training=False))
    # Two of four loops forward-only: they cost 1x instead of 3x.
    assert model.flops_per_token(depth=4, backprop_loops=2) == pytest.approx(model.flops_per_token(depth=4) - 2 * 2 * per_loop)
    # Attention grows with T in every attention layer (1 prelude + 4 loops * (2 core + 1 coda)).
    extra = model.flops_per_token(depth=4, seq_len=16) - model.flops_per_token(depth=4, seq_len=8)
    assert extra == pytest.approx(3 * 4 * 8 * 16 * (1 + 4 * 3))
    # Terminal supervision reads the head at the last exit only.
    head = 2 * model.head_weight.numel()
    assert model.flops_per_token(depth=4) - model.flops_per_token(depth=4, exits=1) == pytest.approx(3 * 3 * head)
