"""Low-Rank Circuit Projection: outputs on the remembered subspace survive real optimizer steps.

Every "unchanged" check compares a protected module's output on the *recorded* prior-task inputs
before and after training (inputs captured with our own hook, independently of LRCP's), so the
tests fail if any part of the projection (orientation, rows, LoRA handling, the update hold) is
wrong.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from mitigate.errors import StateMismatchError
from mitigate.optim.lrcp import LowRankCircuitProjection, LRCPConfig, select_rank

VOCAB = 64


def tiny_llama(seed: int = 0) -> nn.Module:
    cfg = AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


def tiny_gpt2(seed: int = 0) -> nn.Module:
    cfg = AutoConfig.for_model(
        "gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


def lm_batches(seed: int, n: int = 2, bsz: int = 2, length: int = 4, vocab: tuple[int, int] = (0, VOCAB)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(vocab[0], vocab[1], (bsz, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def capture_inputs(model: nn.Module, names: list[str], batches) -> dict[str, torch.Tensor]:
    """Inputs (tokens, d_in) reaching each named module (eval mode, no grad)."""
    mods = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hs = [mods[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).clone())) for n in names]
    was = model.training
    model.eval()
    with torch.no_grad():
        for b in batches:
            model(**b)
    model.train(was)
    for h in hs:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def module_outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mods = dict(model.named_modules())
    with torch.no_grad():
        return {n: mods[n](x).clone() for n, x in inputs.items()}


def train(model, opt, batches, steps: int) -> None:
    model.train()
    for i in range(steps):
        opt.zero_grad()
        model(**batches[i % len(batches)]).loss.backward()
        opt.step()


def max_rel_change(before: dict, after: dict) -> float:
    return max(float((after[n] - before[n]).abs().max() / before[n].abs().max().clamp_min(1e-12)) for n in before)


# ---------------------------------------------------------------------------- core guarantee


def test_outputs_on_prior_subspace_unchanged_after_adamw_all_linear():
    """Task A uses 6 tokens in 2×2 sequences of 4, so every module's inputs span ≤ 16 of its
    32/64 dims; after 5 AdamW steps on task B every protected Linear maps them as before.
    Weight decay 0 here; the decay case is the next test."""
    model = tiny_llama()
    a, b = lm_batches(1, vocab=(0, 6)), lm_batches(2)
    opt = LowRankCircuitProjection(
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0), model,
        targets="all_linear", energy=1.0, max_rank=None,
    )
    assert len(opt.targets) == 2 * 7  # q, k, v, o, gate, up, down per block
    ranks = opt.remember(model, a)
    assert all(0 < r <= 16 for r in ranks.values())
    xs = capture_inputs(model, opt.targets, a)
    before = module_outputs(model, xs)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, b, 5)
    after = module_outputs(model, xs)
    assert max_rel_change(before, after) < 1e-5
    # and the weights did move, substantially, in the complement
    moved = [n for n, p in model.named_parameters() if "layers" in n and "proj" in n and (p - w0[n]).abs().max() > 1e-3]
    assert len(moved) == 14
    st = opt.stats()
    assert all(0.0 < s.removed_last < 1.0 and s.tasks == 1 for s in st.values())


def test_update_hold_neutralises_decoupled_weight_decay_and_adam_preconditioning():
    """Gradient-only projection is not enough under AdamW: √v preconditioning and decoupled
    decay move W U. hold='gradient' breaks the guarantee (and warns about decay); hold='update'
    keeps it with weight_decay=0.1."""
    results = {}
    for hold in ("gradient", "update"):
        model = tiny_llama()
        a, b = lm_batches(1, vocab=(0, 6)), lm_batches(2)
        opt = LowRankCircuitProjection(
            torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model,
            targets=["q_proj", "down_proj"], energy=1.0, max_rank=None, hold=hold,
        )
        opt.remember(model, a)
        xs = capture_inputs(model, opt.targets, a)
        before = module_outputs(model, xs)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            train(model, opt, b, 5)
        results[hold] = (max_rel_change(before, module_outputs(model, xs)), [str(x.message) for x in w])
    assert results["update"][0] < 1e-5
    assert results["gradient"][0] > 1e-3
    assert any("weight_decay" in m for m in results["gradient"][1])
    assert not any("weight_decay" in m for m in results["update"][1])


def test_gradient_projection_matches_formula_and_stats():
    """G ← G − (G U) Uᵀ for nn.Linear; removed fraction = ‖G U‖ / ‖G‖."""
    model = tiny_llama()
    opt = LowRankCircuitProjection(torch.optim.SGD(model.parameters(), lr=0.0), model, targets=["layers.0.self_attn.q_proj"], rank=3)
    opt.remember(model, lm_batches(1))
    U = opt.subspace("model.layers.0.self_attn.q_proj")
    assert U.shape == (32, 3)
    torch.testing.assert_close(U.T @ U, torch.eye(3), atol=1e-6, rtol=0)
    model(**lm_batches(2)[0]).loss.backward()
    p = model.model.layers[0].self_attn.q_proj.weight
    G = p.grad.clone()
    opt.transform_gradients()
    torch.testing.assert_close(p.grad, G - (G @ U) @ U.T, atol=1e-6, rtol=1e-5)
    s = opt.stats()["model.layers.0.self_attn.q_proj"]
    assert s.rank == 3
    assert s.removed_last == pytest.approx(float((G @ U).norm() / G.norm()), rel=1e-4)


@pytest.mark.parametrize("hold", ["update", "gradient"])
def test_nonfinite_gradient_passes_untouched_and_stats_stay_finite(hold):
    """Issue 15 item 6: one NaN gradient element became a whole NaN input row after the step and
    removed_mean stayed NaN for good. Now the gradients pass through untouched (as in
    GradientProjection), the step is counted, and removed_mean averages the finite steps."""
    name = "model.layers.0.self_attn.q_proj"
    model = tiny_llama()
    opt = LowRankCircuitProjection(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                   targets=["layers.0.self_attn.q_proj"], rank=3, hold=hold)
    opt.remember(model, lm_batches(1))
    p = model.model.layers[0].self_attn.q_proj.weight
    model(**lm_batches(2)[0]).loss.backward()
    p.grad[0, 0] = float("nan")
    G = p.grad.clone()
    opt.transform_gradients()
    assert torch.equal(p.grad.nan_to_num(7.0), G.nan_to_num(7.0))  # untouched, NaN where it was
    opt.zero_grad()
    model(**lm_batches(2)[0]).loss.backward()
    p.grad[0, 0] = float("nan")
    opt.step()
    assert int(p.isnan().sum()) == 1  # SGD put the NaN where the gradient had it, nowhere else
    with torch.no_grad():
        p[0, 0] = 0.0
    opt.zero_grad()
    model(**lm_batches(3)[0]).loss.backward()
    opt.step()
    s = opt.stats()[name]
    assert s.nonfinite_skips == 2 and math.isfinite(s.removed_mean) and s.removed_mean > 0
    assert s.removed_mean == pytest.approx(s.removed_last, rel=1e-6)  # the one finite step


def test_rank_selection_by_energy():
    sigma = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.5, 0.0], dtype=torch.float64)  # total 10
    assert select_rank(sigma, energy=0.5, rank=None, budget=6) == 1
    assert select_rank(sigma, energy=0.8, rank=None, budget=6) == 2
    assert select_rank(sigma, energy=0.81, rank=None, budget=6) == 3
    assert select_rank(sigma, energy=1.0, rank=None, budget=6) == 5  # never a zero direction
    assert select_rank(sigma, energy=1.0, rank=None, budget=2) == 2
    assert select_rank(sigma, energy=0.5, rank=4, budget=6) == 4


# ---------------------------------------------------------------------------- merging


def _linear_model(d: int = 12) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 5))


def _subspace_inputs(basis: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, basis.shape[1], generator=g) @ basis.T for _ in range(2)]


@pytest.mark.parametrize("merge", ["weighted", "concat"])
def test_subspaces_merge_to_union_orthonormal_within_budget(merge):
    d = 12
    g = torch.Generator().manual_seed(3)
    S1 = torch.linalg.qr(torch.randn(d, 3, generator=g)).Q
    S2 = torch.linalg.qr(torch.randn(d, 3, generator=g)).Q
    model = _linear_model(d)
    opt = LowRankCircuitProjection(torch.optim.SGD(model.parameters(), lr=0.1), model, targets=["0"], energy=1.0, max_rank=None, merge=merge)
    assert opt.remember(model, _subspace_inputs(S1, 20, 0)) == {"0": 3}
    assert opt.remember(model, _subspace_inputs(S2, 20, 1)) == {"0": 6}
    U = opt.subspace("0")
    torch.testing.assert_close(U.T @ U, torch.eye(6), atol=1e-5, rtol=0)
    for S in (S1, S2):  # the union spans both: projecting onto U reproduces each basis
        torch.testing.assert_close(U @ (U.T @ S), S, atol=1e-5, rtol=0)
    assert opt.stats()["0"].tasks == 2

    budget = LowRankCircuitProjection(torch.optim.SGD(model.parameters(), lr=0.1), model, targets=["0"], energy=1.0, max_rank=4, merge=merge)
    budget.remember(model, _subspace_inputs(S1, 20, 0))
    assert budget.remember(model, _subspace_inputs(S2, 20, 1)) == {"0": 4}
    U4 = budget.subspace("0")
    torch.testing.assert_close(U4.T @ U4, torch.eye(4), atol=1e-5, rtol=0)
    assert float((U @ (U.T @ U4) - U4).abs().max()) < 1e-5  # the budgeted basis lies in the union


def test_weighted_merge_keeps_the_most_energetic_directions():
    """With a budget of 1, the kept direction is the task with the larger input energy."""
    d = 6
    e = torch.eye(d)
    model = _linear_model(d)
    opt = LowRankCircuitProjection(torch.optim.SGD(model.parameters(), lr=0.1), model, targets=["0"], energy=1.0, max_rank=1)
    opt.remember(model, [torch.randn(30, 1) * 0.1 @ e[:, :1].T])
    opt.remember(model, [torch.randn(30, 1) * 10.0 @ e[:, 3:4].T])
    U = opt.subspace("0")
    assert float(U[3, 0].abs()) == pytest.approx(1.0, abs=1e-4)


def test_float_max_rank_is_a_fraction_of_d_in_and_attention_mask_excludes_padding():
    model = tiny_llama()
    a = lm_batches(1, n=1, bsz=2, length=6)
    opt = LowRankCircuitProjection(torch.optim.SGD(model.parameters(), lr=0.1), model, targets=["layers.0.self_attn.q_proj"], energy=1.0, max_rank=0.25)
    assert opt.remember(model, a)["model.layers.0.self_attn.q_proj"] == 8  # ⌊0.25·32⌋
    # padding: only the 3 unmasked tokens count
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    opt2 = LowRankCircuitProjection(torch.optim.SGD(model.parameters(), lr=0.1), model, targets=["layers.0.self_attn.q_proj"], energy=1.0, max_rank=None)
    ranks = opt2.remember(model, [{"input_ids": ids, "attention_mask": mask}])
    assert ranks["model.layers.0.self_attn.q_proj"] == 3
    assert opt2.stats()["model.layers.0.self_attn.q_proj"].tokens == 3


# ---------------------------------------------------------------------------- LoRA


def test_lora_only_adapters_projected_and_outputs_unchanged():
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    a, b = lm_batches(1, vocab=(0, 6)), lm_batches(2)
    opt = LowRankCircuitProjection(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0), model, targets=["q_proj", "v_proj"], energy=1.0, max_rank=None)
    assert len(opt.targets) == 4 and all(t.endswith(("q_proj", "v_proj")) for t in opt.targets)
    opt.remember(model, a)
    xs = capture_inputs(model, opt.targets, a)
    before = module_outputs(model, xs)
    # one step by hand: only lora_A gradients are projected; lora_B untouched (fresh adapter: B = 0)
    model.train()
    model(**b[0]).loss.backward()
    name = opt.targets[0]
    mod = dict(model.named_modules())[name]
    U = opt.subspace(name)
    gA, gB = mod.lora_A["default"].weight.grad.clone(), mod.lora_B["default"].weight.grad.clone()
    opt.transform_gradients()
    torch.testing.assert_close(mod.lora_A["default"].weight.grad, gA - (gA @ U) @ U.T, atol=1e-7, rtol=1e-5)
    assert torch.equal(mod.lora_B["default"].weight.grad, gB)
    assert mod.base_layer.weight.grad is None
    opt.zero_grad()
    b0 = mod.lora_B["default"].weight.detach().clone()
    train(model, opt, b, 5)
    assert float((mod.lora_B["default"].weight - b0).detach().abs().max()) > 1e-3  # the adapter learned
    assert float((mod.lora_A["default"].weight @ U).abs().max()) < 1e-5
    assert max_rel_change(before, module_outputs(model, xs)) < 1e-5


def test_lora_with_trained_b_projects_b_in_rank_space():
    """When B ≠ 0 at remember time, A U is held and B's update is projected against orth(A U)."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    a, b = lm_batches(1, vocab=(0, 3), n=1, bsz=1, length=2), lm_batches(2)
    opt = LowRankCircuitProjection(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05), model, targets=["q_proj"], energy=1.0, max_rank=None)
    opt.remember(model, a)
    xs = capture_inputs(model, opt.targets, a)
    before = module_outputs(model, xs)
    train(model, opt, b, 6)
    assert max_rel_change(before, module_outputs(model, xs)) < 1e-5


# ---------------------------------------------------------------------------- GPT-2 Conv1D, fused QKV


def test_gpt2_conv1d_orientation_and_bias_freeze():
    model = tiny_gpt2()
    a, b = lm_batches(1, vocab=(0, 6)), lm_batches(2)
    opt = LowRankCircuitProjection(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0), model, targets=["attn.c_attn", "mlp.c_fc"], energy=1.0, max_rank=None, freeze_bias=True)
    opt.remember(model, a)
    # formula for Conv1D (in, out): G ← G − U (Uᵀ G)
    model(**b[0]).loss.backward()
    w = model.transformer.h[0].attn.c_attn.weight
    U = opt.subspace("transformer.h.0.attn.c_attn")
    G = w.grad.clone()
    opt.transform_gradients()
    torch.testing.assert_close(w.grad, G - U @ (U.T @ G), atol=1e-7, rtol=1e-5)
    assert float(model.transformer.h[0].attn.c_attn.bias.grad.abs().max()) == 0.0
    opt.zero_grad()
    xs = capture_inputs(model, opt.targets, a)
    before = module_outputs(model, xs)  # includes the bias
    train(model, opt, b, 6)
    assert max_rel_change(before, module_outputs(model, xs)) < 1e-5


def test_fused_qkv_qk_rows_protects_q_and_k_only():
    model = tiny_gpt2()
    a, b = lm_batches(1, vocab=(0, 6)), lm_batches(2)
    opt = LowRankCircuitProjection(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0), model, targets=["attn.c_attn"], energy=1.0, max_rank=None, qkv_rows="qk", freeze_bias=True)
    opt.remember(model, a)
    xs = capture_inputs(model, opt.targets, a)
    before = module_outputs(model, xs)
    train(model, opt, b, 6)
    after = module_outputs(model, xs)
    for n in opt.targets:  # c_attn output = [Q (32) | K (32) | V (32)]
        qk_b, qk_a = before[n][:, :64], after[n][:, :64]
        assert float((qk_a - qk_b).abs().max() / qk_b.abs().max()) < 1e-5
        v_b, v_a = before[n][:, 64:], after[n][:, 64:]
        assert float((v_a - v_b).abs().max() / v_b.abs().max()) > 1e-3


def test_attention_qk_preset_restricts_fused_rows():
    model = tiny_gpt2()
    opt = LowRankCircuitProjection(torch.optim.SGD(model.parameters(), lr=0.1), model, targets="attention_qk")
    assert opt.targets == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    rows = opt._units["transformer.h.0.attn.c_attn"].projs[0].rows
    assert torch.equal(rows, torch.arange(64))


def test_seed_preset_early_attention_and_deep_ffn():
    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=2)
    model = AutoModelForCausalLM.from_config(cfg)
    opt = LowRankCircuitProjection(torch.optim.SGD(model.parameters(), lr=0.1), model)
    layers_attn = {int(t.split(".")[2]) for t in opt.targets if "self_attn" in t}
    layers_mlp = {int(t.split(".")[2]) for t in opt.targets if ".mlp." in t}
    assert layers_attn == {0, 1} and layers_mlp == {2, 3, 4, 5}


# ---------------------------------------------------------------------------- state and errors


def test_state_dict_round_trip_is_exact():
    a, b = lm_batches(1, vocab=(0, 6)), lm_batches(2)

    def make():
        m = tiny_llama()
        o = LowRankCircuitProjection(torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01), m, targets="all_linear", energy=0.9)
        return m, o

    m1, o1 = make()
    o1.remember(m1, a)
    train(m1, o1, b, 3)
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2, o2 = make()
    m2.load_state_dict(ck["model"])
    o2.load_state_dict(ck["opt"])
    for n in o1.targets:
        assert torch.equal(o1.subspace(n), o2.subspace(n))
    assert o2.stats()["model.layers.0.mlp.up_proj"].removed_mean == pytest.approx(o1.stats()["model.layers.0.mlp.up_proj"].removed_mean)
    train(m1, o1, b[1:], 1)
    train(m2, o2, b[1:], 1)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p1, p2), n


def test_state_mismatch_names_modules():
    m1 = tiny_llama()
    o1 = LowRankCircuitProjection(torch.optim.SGD(m1.parameters(), lr=0.1), m1, targets=["q_proj"])
    o1.remember(m1, lm_batches(1))
    sd = o1.state_dict()
    sd["mitigate"]["state"]["modules"]["model.layers.7.self_attn.q_proj"] = sd["mitigate"]["state"]["modules"]["model.layers.0.self_attn.q_proj"]
    o2 = LowRankCircuitProjection(torch.optim.SGD(m1.parameters(), lr=0.1), m1, targets=["q_proj"])
    with pytest.raises(StateMismatchError, match="layers.7"):
        o2.load_state_dict(sd)


def test_errors():
    model = tiny_llama()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="matched no linear module"):
        LowRankCircuitProjection(sgd, model, targets=["nonexistent_proj"])
    with pytest.raises(ValueError, match="energy"):
        LowRankCircuitProjection(sgd, model, energy=1.5)
    with pytest.raises(ValueError, match="max_rank"):
        LRCPConfig(max_rank=0)
    with pytest.raises(ValueError, match="hold"):
        LRCPConfig(hold="weights")
    opt = LowRankCircuitProjection(sgd, model, targets=["q_proj"], rank=33)
    with pytest.raises(ValueError, match="exceeds the input dimension"):
        opt.remember(model, lm_batches(1))
    opt = LowRankCircuitProjection(sgd, model, targets=["q_proj"])
    with pytest.raises(ValueError, match="no batches"):
        opt.remember(model, [])
    # a target that the forward never calls: nothing captured
    model.extra = nn.Linear(32, 3)
    opt = LowRankCircuitProjection(sgd, model, targets=["extra"])
    with pytest.raises(ValueError, match="no activations captured"):
        opt.remember(model, lm_batches(1))


def test_remember_has_no_side_effects():
    model = tiny_llama()
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = LowRankCircuitProjection(torch.optim.SGD(model.parameters(), lr=0.1), model, targets="attention")
    opt.remember(model, lm_batches(1))
    assert model.training and all(m.training for m in model.modules())
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, torch.ones_like(p)) and torch.equal(p, w0[n])


def test_config_round_trips():
    cfg = LRCPConfig(targets=["q_proj"], rank=4, max_rank=0.3, merge="concat", qkv_rows="qk")
    assert LRCPConfig(**cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = nn.parallel.DistributedDataParallel(tiny_llama())
        opt = LowRankCircuitProjection(torch.optim.SGD(model.parameters(), lr=0.1), model, targets=["q_proj", "down_proj"], energy=0.95)
        opt.remember(model, lm_batches(10 + rank))  # each rank sees only its own shard
        if rank == 0:
            torch.save({n: opt.subspace(n) for n in opt.targets} | {"_ranks": {n: s.tokens for n, s in opt.stats().items()}}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_covariance_is_summed_across_ranks(tmp_path):
    """Two gloo ranks with different batches get the subspace of the union of their batches."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "u.pt")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    model = tiny_llama()
    ref = LowRankCircuitProjection(torch.optim.SGD(model.parameters(), lr=0.1), model, targets=["q_proj", "down_proj"], energy=0.95)
    ref.remember(model, lm_batches(10) + lm_batches(11))
    for n in ref.targets:
        U, V = got[n], ref.subspace(n)
        assert U.shape == V.shape
        torch.testing.assert_close(U @ U.T, V @ V.T, atol=1e-4, rtol=0)
        assert got["_ranks"][n] == ref.stats()[n].tokens == 32
