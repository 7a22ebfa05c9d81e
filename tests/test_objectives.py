"""Per-exit losses: chunking is exact, weights and gates combine exits as documented."""

import pytest
import torch
import torch.nn.functional as F

from looptrain.config.schema import DepthConfig, NormPenaltyConfig, ObjectiveConfig
from looptrain.objectives import (
    IGNORE_INDEX,
    DepthSampler,
    chunked_cross_entropy,
    compute_objective,
    exit_distribution,
    norm_penalty,
    weighted_exits_cross_entropy,
)


def naive_ce(x, w, t):
    logits = x @ w.t()  # the full-vocabulary tensor the chunked version avoids
    return F.cross_entropy(logits.reshape(-1, w.shape[0]), t.reshape(-1), reduction="none",
                           ignore_index=IGNORE_INDEX).view(t.shape)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_ce_matches_naive_loss_and_gradients(chunk):
    torch.manual_seed(0)
    x = torch.randn(3, 21, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (3, 21))
    t[1, :5] = IGNORE_INDEX
    upstream = torch.randn(3, 21, dtype=torch.float64)

    got = chunked_cross_entropy(x, w, t, chunk_tokens=chunk)
    (got * upstream).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    want = naive_ce(x, w, t)
    (want * upstream).sum().backward()

    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, x.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, w.grad, rtol=1e-10, atol=1e-10)
    assert torch.all(got[1, :5] == 0)


def test_chunked_ce_fp32_close_to_naive():
    torch.manual_seed(1)
    x = torch.randn(2, 33, 32, requires_grad=True)
    w = torch.randn(300, 32, requires_grad=True)
    t = torch.randint(0, 300, (2, 33))
    got = chunked_cross_entropy(x, w, t, chunk_tokens=16).mean()
    got.backward()
    gx = x.grad.clone()
    x.grad = None
    want = naive_ce(x, w, t).mean()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_weighted_exits_ce_matches_naive_loss_and_gradients(chunk):
    """Gradients made in forward and scaled in backward equal autograd through full logits."""
    torch.manual_seed(2)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    feats = [torch.randn(3, 21, 16, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    frozen = torch.randn(3, 21, 16, dtype=torch.float64)  # an exit outside truncated backprop
    t = torch.randint(0, 50, (3, 21))
    t[1, :5] = IGNORE_INDEX
    coeffs = [0.5, 0.2, 0.1, 0.2]
    upstream = 0.37  # e.g. 1 / gradient accumulation

    loss, ce = weighted_exits_cross_entropy(feats + [frozen], w, t, coeffs, chunk_tokens=chunk)
    (loss * upstream).backward()
    got = [f.grad.clone() for f in feats] + [w.grad.clone()]
    for p in feats + [w]:
        p.grad = None
    count = (t != IGNORE_INDEX).sum()
    want_ce = torch.stack([naive_ce(f, w, t).sum() / count for f in feats + [frozen]])
    want = sum(c * x for c, x in zip(coeffs, want_ce))
    (want * upstream).backward()

    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ce, want_ce.detach(), rtol=1e-10, atol=1e-10)
    assert not ce.requires_grad
    for g, p in zip(got, feats + [w]):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-10)


def test_weighted_exits_ce_without_grad_and_under_bf16_autocast():
    torch.manual_seed(3)
    w = torch.randn(300, 32, requires_grad=True)
    x = torch.randn(2, 33, 32, requires_grad=True)
    t = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        loss, _ = weighted_exits_cross_entropy([x], w, t, [1.0], chunk_tokens=16)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, naive_ce(x, w, t).mean().detach(), rtol=1e-5, atol=1e-5)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = weighted_exits_cross_entropy([x], w, t, [1.0], chunk_tokens=16)
    assert loss.dtype == torch.float32  # the softmax runs in fp32
    loss.backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    naive_ce(x, w, t).mean().backward()
    torch.testing.assert_close(loss, naive_ce(x, w, t).mean().detach(), rtol=2e-2, atol=2e-2)
    assert torch.nn.functional.cosine_similarity(gx.flatten(), x.grad.flatten(), dim=0) > 0.99
    assert torch.nn.functional.cosine_similarity(gw.flatten(), w.grad.flatten(), dim=0) > 0.99


def _exits(depth=3, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    feats = [torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(depth)]
    states = [f * 3 for f in feats]
    t = torch.randint(0, 40, (2, 5))
    return w, feats, states, t


def test_per_loop_weighted_and_terminal():
    w, feats, states, t = _exits()
    ce = [naive_ce(f, w, t).mean() for f in feats]
    uniform = compute_objective(states, feats, w, t, ObjectiveConfig(supervision="per_loop"))
    assert uniform.loss.item() == pytest.approx(sum(c.item() for c in ce) / 3, rel=1e-12)
    weighted = compute_objective(states, feats, w, t, ObjectiveConfig(supervision="per_loop", loop_weights=[0, 1, 3]))
    assert weighted.loss.item() == pytest.approx((ce[1].item() + 3 * ce[2].item()) / 4, rel=1e-12)
    terminal = compute_objective(states, feats, w, t, ObjectiveConfig(supervision="terminal"))
    assert terminal.loss.item() == pytest.approx(ce[2].item(), rel=1e-12)
    assert torch.isnan(terminal.ce_per_exit[:2]).all()  # not measured unless asked
    measured = compute_objective(states, feats, w, t, ObjectiveConfig(supervision="terminal"), measure_all_exits=True)
    torch.testing.assert_close(measured.ce_per_exit, torch.stack(ce).detach())
    # Terminal supervision sends no gradient into the earlier exits.
    terminal.loss.backward()
    assert feats[0].grad is None and feats[2].grad is not None


def test_exit_gated_objective():
    w, feats, states, t = _exits()
    gates = [torch.randn(2, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    p = exit_distribution(gates)
    torch.testing.assert_close(p.sum(0), torch.ones(2, 5, dtype=p.dtype))
    cfg = ObjectiveConfig(supervision="exit_gated", gate_entropy_beta=0.1)
    res = compute_objective(states, feats, w, t, cfg, gate_logits=gates)
    ce_tok = torch.stack([naive_ce(f, w, t) for f in feats])
    entropy = -(p * p.log()).sum(0).mean()
    want = (p.float() * ce_tok.float()).sum(0).mean() - 0.1 * entropy.float()
    assert res.loss.item() == pytest.approx(want.item(), rel=1e-5)
    res.loss.backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates[:2])


def test_norm_penalty_forms_and_gradient():
    h = [torch.full((2, 3, 4), 2.0, requires_grad=True), torch.full((2, 3, 4), 4.0, requires_grad=True)]
    mean_sq = norm_penalty(h, NormPenaltyConfig(weight=0.01, form="mean_sq"))
    assert mean_sq.item() == pytest.approx(0.01 * (4 + 16) / 2)
    anchor = norm_penalty(h, NormPenaltyConfig(weight=1.0, form="anchor", target=3.0))
    assert anchor.item() == pytest.approx(((2 - 3) ** 2 + (4 - 3) ** 2) / 2, rel=1e-5)
    mean_sq.backward()
    # The penalty's gradient is radial: it points along h and shrinks it.
    for x in h:
        assert torch.all(x.grad > 0)


def test_depth_sampler_modes_are_reproducible():
    fixed = DepthSampler(DepthConfig(mode="fixed"), loops=4)
    assert {fixed.sample() for _ in range(10)} == {4}
    uni = DepthSampler(DepthConfig(mode="uniform", min=2, max=6), loops=4, seed=3)
    draws = [uni.sample() for _ in range(400)]
    assert set(draws) == {2, 3, 4, 5, 6}
    pln = DepthSampler(DepthConfig(mode="poisson_lognormal", mean=8, sigma=0.5, min=1, max=32), loops=8, seed=3)
    state = pln.state_dict()
    a = [pln.sample() for _ in range(500)]
    assert 1 <= min(a) and max(a) <= 32 and 6 < sum(a) / len(a) < 10
    pln.load_state_dict(state)
    assert [pln.sample() for _ in range(500)] == a  # resumable



def test_every_objective_choice_has_one_implementation_per_schema_value_and_no_other():
    from looptrain.config.schema import literal_choices
    from looptrain.objectives.depth import DEPTH_MODES
    from looptrain.objectives.supervision import PENALTY_FORMS, SUPERVISIONS

    assert set(SUPERVISIONS) == set(literal_choices(ObjectiveConfig)["supervision"])
    assert set(PENALTY_FORMS) == set(literal_choices(NormPenaltyConfig)["form"])
    assert set(DEPTH_MODES) == set(literal_choices(DepthConfig)["mode"])

def test_first_host_of_a_slurm_nodelist_without_scontrol():
    from looptrain.parallel.env import first_host_of_nodelist

    assert first_host_of_nodelist("n[1-2]") == "n1"
    assert first_host_of_nodelist("gpu[03-05,9],cpu1") == "gpu03"
    assert first_host_of_nodelist("node7,node8") == "node7"
