"""mitigate.plan: the rules, the forecast, the constructed one-disrupted-head case, and apply()."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import mitigate
from mitigate.optim.lrcp import LowRankCircuitProjection
from mitigate.planning import (
    PRIOR_INTERCEPT,
    Candidate,
    PRIOR_SLOPE,
    Diagnosis,
    MitigationPlan,
    PlanPolicy,
    decide,
    forecast_forgetting,
    plan,
    select_candidate,
)

VOCAB = 64
HEADS = 8


def tiny_llama(layers: int = 2, seed: int = 0) -> nn.Module:
    cfg = AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


def batches(seed: int, *, labels: bool = True, n: int = 2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 8), generator=g)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if labels:
            b["labels"] = ids.clone()
        out.append(b)
    return out


def one_head_task(layer: int, head: int):
    """Old task: next-token LM loss (batches with labels). New task (batches without labels):
    make head ``head`` of block ``layer`` attend to the first token. Its gradient reaches the
    Q/K rows of exactly that head (plus embeddings/norms/lower blocks), so in the probe only that
    head's Q/K weights move within its block: a one-hot weight-distance pattern."""

    def loss_fn(model, batch):
        if "labels" in batch:
            return model(**batch).loss
        att = model(**batch, output_attentions=True).attentions[layer][:, head]  # (B, T, T)
        return -(att[..., 0] + 1e-6).log().mean()

    return loss_fn


# ---------------------------------------------------------------------------- end to end


def test_plan_picks_exactly_the_disrupted_head_and_leaves_the_model_alone():
    model = tiny_llama()
    model.train()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    policy = PlanPolicy(min_freeze_bottom=0, compute_curvature=False, verify=False)
    p = plan(model, batches(1), batches(2, labels=False), one_head_task(0, 5), probe_steps=8, lr=1e-2, policy=policy)
    assert p.freeze_heads == {0: [5]}
    assert p.freeze_bottom == 0
    # population z of a one-hot distance pattern over N = 16 heads: √(N − 1)
    assert p.diagnosis.weight_z[0][5] == pytest.approx(math.sqrt(15), rel=1e-6)
    assert any("head 5 in block 0" in r and "z 3.87" in r for r in p.reasons)
    # no side effects on the model
    assert model.training
    for n, q in model.named_parameters():
        assert torch.equal(q, w0[n]) and q.grad is None


def test_plan_with_bottom_freeze_rescores_heads_above_it_and_apply_freezes_and_wraps():
    model = tiny_llama()
    old = batches(1)
    loss_fn = one_head_task(1, 5)
    p = plan(model, old, batches(2, labels=False), loss_fn, probe_steps=8, lr=1e-2, policy=PlanPolicy(min_freeze_bottom=1, compute_curvature=False, cka_drop_lrcp=0.0, verify=False))
    assert p.freeze_bottom == 1 and p.freeze_embeddings
    assert p.freeze_heads == {1: [5]}  # z among block 1's 8 heads: one-hot → √7 > 2.5
    assert p.lrcp_targets == [f"model.layers.1.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
    assert p.old_batches is not None and p.old_batches[0] is old[0]
    text = str(p)
    assert "freeze bottom blocks    1 + embeddings" in text and "L1: [5]" in text
    d = json.loads(json.dumps(p.to_dict()))
    assert d["freeze_heads"] == {"1": [5]} and d["freeze_bottom"] == 1

    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    applied = p.apply(model, base)
    assert isinstance(applied.optimizer, LowRankCircuitProjection)
    assert applied.optimizer.optimizer is base
    assert applied.optimizer.targets == p.lrcp_targets
    assert all(s.rank > 0 and s.tasks == 1 for s in applied.optimizer.stats().values())
    assert len(applied.freeze_reports) == 2 and applied.regularizers == []
    assert not model.model.embed_tokens.weight.requires_grad
    assert not any(q.requires_grad for q in model.model.layers[0].parameters())
    pen = applied.penalty()
    assert isinstance(pen, torch.Tensor) and pen.ndim == 0 and float(pen) == 0.0

    qw = model.model.layers[1].self_attn.q_proj.weight
    kw = model.model.layers[1].self_attn.k_proj.weight
    q0, k0 = qw.detach().clone(), kw.detach().clone()
    rows = slice(5 * 4, 6 * 4)  # head_dim 4
    model.train()
    for b in batches(3):
        applied.optimizer.zero_grad()
        (model(**b).loss + applied.penalty()).backward()
        applied.optimizer.step()
    assert torch.equal(qw[rows], q0[rows]) and torch.equal(kw[rows], k0[rows])
    assert not torch.equal(qw, q0)  # the other heads trained
    applied.undo()
    assert model.model.embed_tokens.weight.requires_grad


def test_apply_builds_and_consolidates_the_curvature_regularizer(monkeypatch):
    calls = []

    class FakeReg(nn.Module):
        def __init__(self, model, *, strength, k):
            super().__init__()
            calls.append(("init", strength, k))
            self.w = next(model.parameters())

        def consolidate(self, batches, loss_fn=None):
            calls.append(("consolidate", len(batches), loss_fn))

        def reg(self):
            return self.w.sum() * 0 + 2.5

    monkeypatch.setitem(vars(mitigate), "CurvatureRegularizer", FakeReg)  # bypass the lazy import
    model = tiny_llama()
    d = _diag(2, lam=(10.0, 4.0))
    old = batches(1)
    dec = decide(d, model, PlanPolicy(min_freeze_bottom=0, curvature_strength=3.0, curvature_k=2))
    assert dec["curvature"] and dec["curvature_strength"] == 3.0
    p = MitigationPlan(forecast=forecast_forgetting(0.0), diagnosis=d, policy=PlanPolicy(curvature_k=2), old_batches=old, loss_fn=None, **dec)
    applied = p.apply(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert calls == [("init", 3.0, 2), ("consolidate", 2, None)]
    assert float(applied.penalty().detach()) == 2.5 and len(applied.regularizers) == 1


@pytest.mark.slow
def test_apply_with_the_real_curvature_regularizer():
    reg_mod = pytest.importorskip("mitigate.regularizers.curvature")
    model = tiny_llama(layers=1)
    d = _diag(1, lam=(10.0, 4.0))
    pol = PlanPolicy(min_freeze_bottom=0)
    dec = decide(d, model, pol)
    p = MitigationPlan(forecast=forecast_forgetting(0.0), diagnosis=d, policy=pol, old_batches=batches(1, n=1), **dec)
    applied = p.apply(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    (reg,) = applied.regularizers
    assert isinstance(reg, reg_mod.CurvatureRegularizer) and reg.num_tasks == 1
    with torch.no_grad():  # move away from the anchor: the penalty becomes positive
        for q in model.parameters():
            q.add_(0.01)
    pen = applied.penalty()
    assert pen.ndim == 0 and pen.requires_grad and float(pen.detach()) > 0


@pytest.mark.slow
def test_plan_measures_lambda_max_before_and_after_the_probe():
    model = tiny_llama(layers=1)
    policy = PlanPolicy(lambda_max_iter=8, lambda_tol=0.1, diagnostic_batches=1, verify=False)
    p = plan(model, batches(1, n=1), batches(2, n=1), probe_steps=3, lr=1e-2, policy=policy)
    d = p.diagnosis
    assert d.lambda_before is not None and d.lambda_after is not None and d.lambda_before > 0
    assert p.curvature == (d.lambda_after / d.lambda_before < policy.lambda_ratio)


def test_plan_input_errors():
    model = tiny_llama(layers=1)
    with pytest.raises(ValueError, match="non-empty"):
        plan(model, [], batches(2))
    with pytest.raises(ValueError, match="probe_steps"):
        plan(model, batches(1), batches(2), probe_steps=0)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        PlanPolicy(cka_drop_lrcp=1.5)
    with pytest.raises(ValueError, match="cosine"):
        PlanPolicy(head_conflict_cosine=-2.0)


# ---------------------------------------------------------------------------- the rules


def _diag(L: int, *, gcos: float = 0.0, cka=None, lam=(None, None), H: int = HEADS) -> Diagnosis:
    z = [[0.0] * H for _ in range(L)]
    return Diagnosis(
        model_type="llama", num_layers=L, n_heads=H, global_cosine=gcos, layer_cosine=[0.0] * L,
        head_cosine=[[0.0] * H for _ in range(L)], entropy_change=[[0.0] * H for _ in range(L)],
        weight_z=z, weight_distance=[[1.0] * H for _ in range(L)], cka=list(cka or [1.0] * L),
        lambda_before=lam[0], lambda_after=lam[1],
    )


def test_rule_similar_tasks_freeze_more_bottom_blocks_within_the_cap():
    model = tiny_llama(layers=4)
    pol = PlanPolicy(min_freeze_bottom=1)
    assert decide(_diag(4, gcos=0.1), model, pol)["freeze_bottom"] == 1
    assert decide(_diag(4, gcos=0.1), model)["freeze_bottom"] == 0  # default: no floor
    dec = decide(_diag(4, gcos=0.6), model, pol)
    assert dec["freeze_bottom"] == 2 and dec["freeze_embeddings"]
    assert any("similar" in r and "+0.600" in r for r in dec["reasons"])
    capped = decide(_diag(4, gcos=0.6), model, PlanPolicy(similar_task_freeze_bottom=4))
    assert capped["freeze_bottom"] == 2  # ⌊0.5 · 4⌋
    assert decide(_diag(4), model, PlanPolicy(min_freeze_bottom=0))["freeze_bottom"] == 0


def test_rule_bottom_blocks_with_many_disrupted_heads_are_frozen_whole():
    model = tiny_llama(layers=4)
    d = _diag(4)
    d.entropy_change[0][1] = d.entropy_change[0][2] = 2.0  # 25% of block 0
    d.entropy_change[1][3] = 2.0  # 12.5% of block 1: below 15%
    dec = decide(d, model, PlanPolicy(min_freeze_bottom=0))
    assert dec["freeze_bottom"] == 1
    assert dec["freeze_heads"] == {1: [3]}
    assert any("(0, 1)" in r and "frozen bottom" in r for r in dec["reasons"])


def test_rule_heads_conflict_needs_motion_and_cap_keeps_the_most_severe():
    model = tiny_llama(layers=2)
    d = _diag(2)
    d.head_cosine[1][0], d.weight_z[1][0] = -0.5, 1.5  # conflicting and moved: frozen
    d.head_cosine[1][1], d.weight_z[1][1] = -0.5, 0.5  # conflicting, did not move: kept
    d.head_cosine[1][2], d.weight_z[1][2] = +0.5, 3.0  # moved a lot (z > 2.5): frozen
    pol = PlanPolicy(min_freeze_bottom=0)
    dec = decide(d, model, pol)
    assert dec["freeze_heads"] == {1: [0, 2]}
    few = decide(d, model, dataclasses.replace(pol, max_frozen_head_fraction=1 / 16))  # budget 1
    assert few["freeze_heads"] == {1: [2]}
    assert any("not frozen" in r for r in few["reasons"])


def test_rule_lrcp_on_drifting_unfrozen_blocks_and_attention_under_strong_conflict():
    model = tiny_llama(layers=4)
    pol = PlanPolicy(min_freeze_bottom=1)
    dec = decide(_diag(4, cka=[0.5, 0.99, 0.9, 0.97]), model, pol)
    assert dec["freeze_bottom"] == 1  # block 0 is frozen: its drift needs no LRCP
    assert dec["lrcp_targets"] == [f"model.layers.2.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
    unfrozen = decide(_diag(4, cka=[0.5, 0.99, 0.9, 0.97]), model)  # default: block 0 trains
    assert unfrozen["lrcp_targets"] == [f"model.layers.{i}.mlp.{m}" for i in (0, 2) for m in ("gate_proj", "up_proj", "down_proj")]
    strong = decide(_diag(4, gcos=-0.5, cka=[0.5, 0.99, 0.9, 0.97]), model, pol)
    assert "model.layers.2.self_attn.q_proj" in strong["lrcp_targets"] and len(strong["lrcp_targets"]) == 7


def test_rule_curvature_on_flattening_only():
    model = tiny_llama(layers=2)
    assert decide(_diag(2, lam=(10.0, 7.0)), model)["curvature"]
    assert not decide(_diag(2, lam=(10.0, 9.0)), model)["curvature"]
    dec = decide(_diag(2), model)
    assert not dec["curvature"] and any("λ_max unavailable" in r for r in dec["reasons"])


# ---------------------------------------------------------------------------- forecast


def test_prior_forecast_encodes_the_seed_and_says_it_is_a_prior():
    lo, hi = forecast_forgetting(0.2), forecast_forgetting(-0.3)
    assert hi.expected_forgetting / lo.expected_forgetting == pytest.approx(2.4, rel=0.01)
    assert lo.expected_forgetting == pytest.approx(PRIOR_INTERCEPT + PRIOR_SLOPE * 0.2)
    assert lo.low < lo.expected_forgetting < lo.high
    assert "prior" in lo.basis and "not a measurement" in lo.basis
    assert forecast_forgetting(1.0).expected_forgetting == 0.0  # clipped to [0, 1]


def test_calibrated_forecast_fits_the_line_with_a_bootstrap_interval():
    exact = [(c, 0.3 - 0.5 * c) for c in (-0.5, -0.2, 0.0, 0.3, 0.6)]
    f = forecast_forgetting(0.1, exact)
    assert f.expected_forgetting == pytest.approx(0.25, abs=1e-12)
    assert f.low == pytest.approx(0.25, abs=1e-9) and f.high == pytest.approx(0.25, abs=1e-9)

    g = torch.Generator().manual_seed(0)
    xs = torch.rand(40, generator=g) * 2 - 1
    ys = 0.2 - 0.4 * xs + 0.05 * torch.randn(40, generator=g)
    f = forecast_forgetting(0.0, list(zip(xs.tolist(), ys.tolist())), seed=1)
    assert f.low < 0.2 < f.high
    assert 0.08 < f.high - f.low < 0.3  # ≈ 2 · 1.645 · 0.05
    assert "fit on 40" in f.basis
    assert forecast_forgetting(0.0, list(zip(xs.tolist(), ys.tolist())), seed=1) == f  # seeded


def test_forecast_errors():
    with pytest.raises(ValueError, match="at least 3"):
        forecast_forgetting(0.0, [(0.1, 0.2), (0.2, 0.1)])
    with pytest.raises(ValueError, match="distinct"):
        forecast_forgetting(0.0, [(0.1, 0.2), (0.1, 0.1), (0.1, 0.3)])
    with pytest.raises(ValueError, match="finite"):
        forecast_forgetting(float("nan"))


# ---------------------------------------------------------------------------- verification


def test_select_candidate_least_forgetting_at_enough_plasticity_simplest_on_ties():
    C = lambda name, old, new: Candidate(name, 0, False, old, new)  # noqa: E731
    pol = PlanPolicy(min_plasticity=0.9, verify_tolerance=0.05)
    cands = [C("none", 1.0, 2.0), C("a", 0.5, 1.9), C("b", 0.2, 1.5), C("c", 0.49, 1.95)]
    assert select_candidate(cands, 1.0, 2.0, pol) == 1  # b learns too little; a and c tie (0.01 < 0.05)
    assert select_candidate(cands, 1.0, 2.0, dataclasses.replace(pol, verify_tolerance=0.0)) == 3
    assert select_candidate(cands, 1.0, 2.0, dataclasses.replace(pol, min_plasticity=0.5)) == 2
    assert select_candidate([C("x", 0.3, -1.0)], 1.0, 2.0, pol) == 0  # none eligible: best of all
    with pytest.raises(ValueError):
        select_candidate([], 1.0, 2.0, pol)


def test_plan_verifies_candidates_by_probing_copies():
    model = tiny_llama()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    pol = PlanPolicy(min_freeze_bottom=0, compute_curvature=False)
    p = plan(model, batches(1), batches(2), probe_steps=4, lr=1e-2, policy=pol)
    d = p.diagnosis
    names = [c.name for c in p.candidates]
    assert len(names) == len(set(names)) >= 2 and sum(c.chosen for c in p.candidates) == 1
    chosen = next(c for c in p.candidates if c.chosen)
    assert chosen.freeze_bottom == p.freeze_bottom
    # the unmitigated candidate reports the main probe's own numbers
    none = p.candidates[0]
    assert none.name == "freeze 0" and none.old_loss_increase == pytest.approx(d.old_loss[1] - d.old_loss[0])
    base_old, base_new = none.old_loss_increase, none.new_loss_decrease
    strict = select_candidate(p.candidates, base_old, base_new, pol)
    # the best by the numbers, or a simpler one when the difference is within the probe's noise
    assert p.candidates.index(chosen) == strict or (
        p.candidates.index(chosen) < strict and any(r.startswith("probe noise:") and "keeping the simpler" in r for r in p.reasons)
    )
    assert p.reasons[0].startswith("verified by probing")
    assert "verified candidate" in str(p)
    assert json.loads(json.dumps(p.to_dict()))["candidates"][p.candidates.index(chosen)]["chosen"]
    for n, q in model.named_parameters():
        assert torch.equal(q, w0[n]) and q.grad is None


# ---------------------------------------------------------------------------- the EWC anchor


def test_apply_ewc_anchor_on_the_trainable_parameters_with_lambda_scale_over_mean_fisher():
    model = tiny_llama()
    old = batches(1)
    pol = PlanPolicy(min_freeze_bottom=1)
    dec = {**decide(_diag(2), model, pol, freeze_bottom=1, protect=False), "ewc_scale": 2.0}
    p = MitigationPlan(forecast=forecast_forgetting(0.0), diagnosis=_diag(2), policy=pol, old_batches=old, **dec)
    assert "EWC anchor              scale 2" in str(p) and p.to_dict()["ewc_scale"] == 2.0
    applied = p.apply(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    (ewc,) = applied.regularizers
    assert isinstance(ewc, mitigate.EWC)
    fisher = ewc.fisher()
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert set(fisher) == trainable and "model.embed_tokens.weight" not in fisher  # frozen: not anchored
    mean = sum(float(f.double().sum()) for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    assert ewc.lambda_ * mean == pytest.approx(2.0, rel=1e-9) and ewc.strength_mode == "relative"
    # the same Fisher as a standalone EWC on the frozen model: (λ/2) Σ F (θ − θ*)² after a move
    ref = mitigate.EWC(model, strength=ewc.lambda_)
    ref.consolidate(old)
    assert float(applied.penalty().detach()) == 0.0
    with torch.no_grad():
        for q in model.parameters():
            if q.requires_grad:
                q.add_(0.01)
    expect = 0.5 * ewc.lambda_ * sum(float((f * 0.01**2).sum()) for f in fisher.values())
    assert float(applied.penalty().detach()) == pytest.approx(expect, rel=1e-4)
    assert float(ref().detach()) == pytest.approx(expect, rel=1e-4)


def test_plan_probes_ewc_anchor_candidates_and_a_strong_anchor_forgets_less():
    model = tiny_llama()
    pol = PlanPolicy(min_freeze_bottom=0, max_freeze_bottom_fraction=0.0, compute_curvature=False, ewc_scales=(1e3,), min_plasticity=0.0, ewc_on="best", noise_z=0.0)
    p = plan(model, batches(1), batches(2), probe_steps=6, lr=1e-2, policy=pol)
    # ewc_on="best": structures without an anchor, then the anchor on the best of them
    *structures, anchored = p.candidates
    assert all(c.ewc_scale == 0.0 for c in structures) and anchored.ewc_scale == 1e3
    strict = select_candidate(structures, structures[0].old_loss_increase, structures[0].new_loss_decrease, pol)
    # the anchor goes on the best structure, or on a simpler one within the probe's noise of it
    (i,) = [j for j, c in enumerate(structures) if anchored.name == c.name + " + EWC 1000"]
    best = structures[i]
    assert i <= strict and anchored.protect == best.protect
    assert anchored.old_loss_increase < 0.5 * best.old_loss_increase  # the anchor holds the old task
    chosen = next(c for c in p.candidates if c.chosen)
    assert p.ewc_scale == chosen.ewc_scale == 1e3  # no plasticity required: least forgetting wins
    every = plan(model, batches(1), batches(2), probe_steps=6, lr=1e-2, policy=dataclasses.replace(pol, ewc_on="every"))
    n = len(structures)
    assert [c.name for c in every.candidates] == [c.name for c in structures] + [c.name + " + EWC 1000" for c in structures]
    for free, anchored in zip(every.candidates[:n], every.candidates[n:]):
        assert anchored.old_loss_increase < 0.5 * free.old_loss_increase
    none = PlanPolicy(min_freeze_bottom=0, max_freeze_bottom_fraction=0.0, compute_curvature=False, ewc_scales=())
    q = plan(model, batches(1), batches(2), probe_steps=2, lr=1e-2, policy=none)
    assert all(c.ewc_scale == 0.0 for c in q.candidates) and q.ewc_scale == 0.0


def test_policy_ewc_scales_validation():
    assert PlanPolicy(ewc_scales=[1, 2.5]).ewc_scales == (1.0, 2.5)
    for bad in ((0.0,), (-1.0,), (float("nan"),), 3.0, "13", (True,)):
        with pytest.raises(ValueError, match="ewc_scales"):
            PlanPolicy(ewc_scales=bad)
    with pytest.raises(ValueError, match="ewc_fisher"):
        PlanPolicy(ewc_fisher="diag")
    with pytest.raises(ValueError, match="ewc_on"):
        PlanPolicy(ewc_on="all")


def test_plan_leaves_the_global_rng_where_it_was():
    model = tiny_llama(layers=1)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)

    def masked_lm(m, batch):  # a loss that draws from the global RNG (random label masking)
        keep = torch.rand(batch["labels"].shape) < 0.8
        return m(input_ids=batch["input_ids"], labels=batch["labels"].masked_fill(~keep, -100)).loss

    plan(model, batches(1), batches(2), masked_lm, probe_steps=2, lr=1e-2, policy=PlanPolicy(compute_curvature=False, ewc_scales=(1.0,)))
    assert torch.equal(torch.rand(4), expected)


def test_verification_estimates_the_anchor_fisher_once_per_structure(monkeypatch):
    calls = []
    real = mitigate.EWC.estimate_fisher

    def counting(self, *a, **k):
        calls.append(sorted(n for n, q in self.model.named_parameters() if q.requires_grad))
        return real(self, *a, **k)

    monkeypatch.setattr(mitigate.EWC, "estimate_fisher", counting)
    model = tiny_llama()
    base = dict(min_freeze_bottom=0, compute_curvature=False, ewc_scales=(1.0, 2.0, 3.0))
    p = plan(model, batches(1), batches(2), probe_steps=2, lr=1e-2, policy=PlanPolicy(**base, ewc_on="best"))
    assert len(calls) == 1 and sum(c.ewc_scale > 0 for c in p.candidates) == 3
    calls.clear()
    p = plan(model, batches(1), batches(2), probe_steps=2, lr=1e-2, policy=PlanPolicy(**base, ewc_on="every"), budget_steps=100)
    structures = [c for c in p.candidates if c.ewc_scale == 0]
    assert len(calls) == len(structures) >= 2 and sum(c.ewc_scale > 0 for c in p.candidates) == 3 * len(structures)


# ---------------------------------------------------------------------------- budget and noise


def _count_adamw_steps(monkeypatch):
    steps = []
    real = torch.optim.AdamW.step

    def counting(self, *a, **k):
        steps.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting)
    return steps


def test_plan_respects_its_probe_budget_and_logs_the_estimate_up_front(monkeypatch, caplog):
    import logging

    from mitigate.planning import _depth_grid

    assert _depth_grid(0, 12, 4) == [0, 3, 6, 12]  # {0, L/8, L/4, L/2} on 24 blocks
    assert _depth_grid(0, 2, 4) == [0, 1, 2] and _depth_grid(1, 15, 4) == [1, 3, 7, 15]
    steps = _count_adamw_steps(monkeypatch)
    model = tiny_llama(layers=4)
    pol = PlanPolicy(compute_curvature=False, ewc_scales=(0.5, 1.0, 2.0, 4.0))
    caplog.set_level(logging.INFO, logger="mitigate.planning")
    # 1 timing step + 3 (diagnosis) + 3·k ≤ 25 → k = 7 probes; 4 blocks, cap 2: up to 6 structures
    # (5 probed) + 4 anchors do not fit, so the budget trims the anchors
    p = plan(model, batches(1), batches(2), probe_steps=3, lr=1e-2, policy=pol, budget_steps=25, progress=False)
    assert len(steps) <= 25
    probed = sum(1 for c in p.candidates if c.freeze_bottom or c.protect or c.ewc_scale)
    assert len(steps) == 1 + 3 + 3 * probed and probed == 7  # the timing step, the diagnosis probe, 7 probes
    assert any(r.startswith("plan budget:") for r in p.reasons)
    first = [r.getMessage() for r in caplog.records if r.name == "mitigate.planning"][0]
    assert "up to 7 verification probes of 3 steps" in first and "≈" in first and "budget 25 steps" in first
    with pytest.raises(ValueError, match="budget_steps"):
        plan(model, batches(1), batches(2), probe_steps=3, budget_steps=3)
    with pytest.raises(ValueError, match="budget_s"):
        plan(model, batches(1), batches(2), probe_steps=3, budget_s=0)
    with pytest.raises(ValueError, match="max_depths"):
        PlanPolicy(max_depths=0)


def test_plan_fits_lambda_max_and_the_probes_to_its_time_budget(monkeypatch):
    # a budget far below one probe step: λ_max is skipped and no verification probe fits, each
    # said in the reasons; only the timing step and the diagnosis probe run
    steps = _count_adamw_steps(monkeypatch)
    model = tiny_llama(layers=4)
    p = plan(model, batches(1), batches(2), probe_steps=3, lr=1e-2, budget_s=1e-6, progress=False)
    assert len(steps) == 1 + 3
    assert any(r.startswith("plan budget: λ_max not measured") for r in p.reasons)
    assert any(r.startswith("plan budget: 0 verification probes of 3 steps fit in budget_s=1e-06 s") for r in p.reasons)
    assert p.diagnosis.lambda_before is None and not p.policy.compute_curvature
    assert [c.name for c in p.candidates] == ["freeze 0"]  # the unmitigated probe itself
    # the default budget (540 s) leaves a tiny model's plan whole
    steps.clear()
    p = plan(model, batches(1), batches(2), probe_steps=3, lr=1e-2, budget_steps=25, progress=False)
    assert p.diagnosis.lambda_before is not None and not any("fit in" in r or "λ_max not measured" in r for r in p.reasons)


def test_plan_refuses_to_pick_between_candidates_within_the_probe_noise():
    model = tiny_llama()
    # one structure (no freezing, no head/LRCP rule can fire) and a negligible anchor: two
    # candidates that are the same training run up to a 1e-12 penalty
    pol = PlanPolicy(
        max_freeze_bottom_fraction=0.0, compute_curvature=False, cka_drop_lrcp=1.0, entropy_increase_bits=1e9,
        weight_z=1e9, conflict_z=1e9, ewc_scales=(1e-12,), verify_tolerance=0.0, min_plasticity=0.0,
    )
    old = batches(1, n=4)
    p = plan(model, old, batches(2), probe_steps=4, lr=1e-2, policy=pol, progress=False)
    assert [c.name for c in p.candidates] == ["freeze 0", "freeze 0 + EWC 1e-12"]
    assert p.candidates[0].chosen and p.ewc_scale == 0.0  # the simplest
    assert any(r.startswith("probe noise:") for r in p.reasons)
    # select_candidate: a lower old loss that is within noise_z paired SE keeps the simpler one
    C = lambda name, old: Candidate(name, 0, False, old, 1.0)  # noqa: E731
    rows_a, rows_b = [0.0, 1.0, 0.0, 1.0], [0.1, 0.7, 0.3, 0.7]  # paired gap 0.05, SE 0.0866
    pol2 = PlanPolicy(verify_tolerance=0.0, min_plasticity=0.0)
    assert select_candidate([C("a", 0.5), C("b", 0.45)], 0.5, 1.0, pol2, [rows_a, rows_b]) == 0
    assert select_candidate([C("a", 0.5), C("b", 0.45)], 0.5, 1.0, dataclasses.replace(pol2, noise_z=0.0), [rows_a, rows_b]) == 1
    far = [v - 1.0 for v in rows_a]  # a clear 1.0 gap with zero spread... SE 0 → never "noise"
    assert select_candidate([C("a", 0.5), C("b", -0.5)], 0.5, 1.0, pol2, [rows_a, far]) == 1
