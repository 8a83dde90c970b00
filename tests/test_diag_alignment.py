"""Gradient alignment on constructed gradients: identical tasks, negated losses, per-group splits
of a fused GPT-2 ``c_attn`` vs separate llama projections, per-head cosines, and the tracker."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VOCAB, build
from torch import nn

from mitigate.diagnostics import AlignmentTracker, gradient_alignment, task_gradient

torch.set_num_threads(1)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def signed_loss(model, batch):
    """Per-example mean loss, multiplied by the batch's sign (a hand-set task)."""
    return batch["sign"] * (model(batch["x"]).squeeze(-1) - batch["y"]).square().mean()


def _toy_batches(seed: int, sign: float = 1.0, sizes=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(n, 4, generator=g), "y": torch.randn(n, generator=g), "sign": sign} for n in sizes]


def test_identical_tasks_give_one_and_negated_loss_minus_one():
    model = Toy()
    a = _toy_batches(0)
    rep = gradient_alignment(model, a, a, signed_loss)
    assert rep.global_cosine == pytest.approx(1.0, abs=1e-12)
    neg = [{**b, "sign": -1.0} for b in a]
    rep = gradient_alignment(model, a, neg, signed_loss)
    assert rep.global_cosine == pytest.approx(-1.0, abs=1e-12)
    assert set(rep.per_group) == {"other"} and rep.conflict_rate["other"] == 1.0  # unmapped model


def test_task_gradient_is_the_size_weighted_mean():
    model = Toy()
    batches = _toy_batches(1, sizes=(2, 7))
    g = task_gradient(model, batches, signed_loss)
    whole = {"x": torch.cat([b["x"] for b in batches]), "y": torch.cat([b["y"] for b in batches]), "sign": 1.0}
    signed_loss(model, whole).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(g[n], p.grad, rtol=1e-6, atol=1e-7)


def test_against_an_independent_computation_and_no_side_effects():
    model = Toy()
    a, b = _toy_batches(2), _toy_batches(3)
    model.train()
    model.a.eval()
    sentinel = torch.full_like(model.b.weight, 7.0)
    model.b.weight.grad = sentinel.clone()
    rep = gradient_alignment(model, a, b, signed_loss)
    assert model.training and not model.a.training  # flags restored per module
    assert torch.equal(model.b.weight.grad, sentinel) and model.a.weight.grad is None
    flat = []
    for batches in (a, b):
        grads = [torch.zeros_like(p) for p in model.parameters()]
        total = 0
        for batch in batches:
            n = batch["x"].shape[0]
            gs = torch.autograd.grad(signed_loss(model, batch), list(model.parameters()))
            grads = [acc + n * gi for acc, gi in zip(grads, gs)]
            total += n
        flat.append(torch.cat([x.reshape(-1) for x in grads]) / total)
    assert rep.global_cosine == pytest.approx(float(F.cosine_similarity(flat[0], flat[1], dim=0)), abs=1e-6)
    assert rep.norm_a == pytest.approx(float(flat[0].norm()), rel=1e-5)


def _lm_batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (3, 8), generator=g)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[2, 6:] = 0
    return [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}]


def _grads(model, batches):
    model.zero_grad()
    for b in batches:
        model(**b).loss.backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def _cos(pairs):
    a = torch.cat([x.reshape(-1).double() for x, _ in pairs])
    b = torch.cat([y.reshape(-1).double() for _, y in pairs])
    return float(a @ b / (a.norm() * b.norm()))


def test_llama_groups_layers_and_gqa_heads():
    model = build("llama")  # 4 heads of 8, 2 K/V heads
    a, b = _lm_batches(0), _lm_batches(1)
    rep = gradient_alignment(model, a, b)
    ga, gb = _grads(model, a), _grads(model, b)

    def sel(pred):
        return [(ga[n], gb[n]) for n in ga if pred(n)]

    assert rep.per_group["q"] == pytest.approx(_cos(sel(lambda n: "q_proj" in n)), abs=1e-6)
    assert rep.per_group["k"] == pytest.approx(_cos(sel(lambda n: "k_proj" in n)), abs=1e-6)
    assert rep.per_group["ffn"] == pytest.approx(_cos(sel(lambda n: ".mlp." in n)), abs=1e-6)
    assert rep.per_layer[("o", 1)] == pytest.approx(_cos(sel(lambda n: "layers.1.self_attn.o_proj" in n)), abs=1e-6)
    assert {"q", "k", "v", "o", "ffn", "embed", "norm", "head"} <= set(rep.per_group)
    for layer in (0, 1):
        q = f"model.layers.{layer}.self_attn.q_proj.weight"
        k = f"model.layers.{layer}.self_attn.k_proj.weight"
        for h in range(4):
            rows_q, rows_k = slice(8 * h, 8 * h + 8), slice(8 * (h // 2), 8 * (h // 2) + 8)
            joint = _cos([(ga[q][rows_q], gb[q][rows_q]), (ga[k][rows_k], gb[k][rows_k])])
            assert float(rep.per_head[layer][h]) == pytest.approx(joint, abs=1e-6)
            assert float(rep.per_head_q[layer][h]) == pytest.approx(_cos([(ga[q][rows_q], gb[q][rows_q])]), abs=1e-6)
        assert rep.per_head_k[layer].shape == (2,)
    n_neg = sum(int((t < 0).sum()) for t in rep.per_head_q.values())
    assert rep.conflict_rate["q"] == pytest.approx(n_neg / 8)


def test_gpt2_fused_c_attn_is_split_into_q_k_v():
    model = build("gpt2")  # n_embd 32, 4 heads of 8; c_attn Conv1D weight (32, 96), bias (96,)
    a, b = _lm_batches(2), _lm_batches(3)
    rep = gradient_alignment(model, a, b)
    ga, gb = _grads(model, a), _grads(model, b)
    assert "qkv" not in rep.per_group
    cols = {"q": slice(0, 32), "k": slice(32, 64), "v": slice(64, 96)}
    for g, c in cols.items():
        pairs = []
        for layer in (0, 1):
            w, bias = f"transformer.h.{layer}.attn.c_attn.weight", f"transformer.h.{layer}.attn.c_attn.bias"
            pairs += [(ga[w][:, c], gb[w][:, c]), (ga[bias][c], gb[bias][c])]
        assert rep.per_group[g] == pytest.approx(_cos(pairs), abs=1e-6)
        w, bias = "transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_attn.bias"
        assert rep.per_layer[(g, 1)] == pytest.approx(_cos([(ga[w][:, c], gb[w][:, c]), (ga[bias][c], gb[bias][c])]), abs=1e-6)
    w, bias = "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"
    h = 2
    q, k = slice(8 * h, 8 * h + 8), slice(32 + 8 * h, 40 + 8 * h)
    expected = _cos([(ga[w][:, q], gb[w][:, q]), (ga[bias][q], gb[bias][q]), (ga[w][:, k], gb[w][:, k]), (ga[bias][k], gb[bias][k])])
    assert float(rep.per_head[0][h]) == pytest.approx(expected, abs=1e-6)
    # the same task on both sides: every group and head is exactly aligned
    same = gradient_alignment(model, a, a)
    for v in [*same.per_group.values(), *same.per_layer.values()]:
        assert v == pytest.approx(1.0, abs=1e-9)
    assert all(torch.allclose(t, torch.ones_like(t)) for t in same.per_head.values())
    assert all(v == 0.0 for v in same.conflict_rate.values())
    d = same.to_dict()
    assert d["per_layer"]["q/0"] == pytest.approx(1.0)


def test_tracker_records_early_steps_from_grad():
    model = build("llama")
    old, new = _lm_batches(0), _lm_batches(1)
    tracker = AlignmentTracker(model, old, max_steps=3, every=1)
    ref = _grads(model, old)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for step in range(5):
        opt.zero_grad()
        batch = old[0] if step == 0 else new[0]
        model(**batch).loss.backward()
        entry = tracker.update()
        if step == 0:  # the training gradient on the reference batch at the reference point
            assert entry["cosine"] == pytest.approx(1.0, abs=1e-6)
        if step == 1:
            cur = {n: p.grad for n, p in model.named_parameters()}
            assert entry["cosine"] == pytest.approx(_cos([(ref[n], cur[n]) for n in ref]), abs=1e-6)
        if step >= 3:
            assert entry is None
        opt.step()
    assert [e["step"] for e in tracker.history] == [0, 1, 2] and tracker.done
    s = tracker.summary()
    cos = [e["cosine"] for e in tracker.history]
    assert s.steps == 3 and s.mean_cosine == pytest.approx(sum(cos) / 3) and s.min_cosine == min(cos)
    assert s.fraction_negative == pytest.approx(sum(c < 0 for c in cos) / 3)
    assert "q" in s.per_group_mean


def test_tracker_every_and_batch_mode():
    model = build("llama")
    old = _lm_batches(0)
    tracker = AlignmentTracker(model, old, max_steps=6, every=2)
    for _ in range(6):
        tracker.update(old[0])  # gradient computed on the batch, no .grad written
    assert [e["step"] for e in tracker.history] == [0, 2, 4]
    assert all(e["cosine"] == pytest.approx(1.0, abs=1e-9) for e in tracker.history)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="max_steps"):
        AlignmentTracker(model, old, max_steps=0)
    assert math.isnan(AlignmentTracker(model, old).summary().mean_cosine)


def test_peft_lora_b_rows_of_fused_c_attn_are_split():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("gpt2"), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False))
    a, b = _lm_batches(4), _lm_batches(5)
    rep = gradient_alignment(model, a, b)
    ga, gb = _grads(model, a), _grads(model, b)
    b_names = [n for n in ga if "lora_B" in n]
    a_names = [n for n in ga if "lora_A" in n]
    assert len(b_names) == 2 and ga[b_names[0]].shape == (96, 2)
    for g, rows in {"q": slice(0, 32), "k": slice(32, 64), "v": slice(64, 96)}.items():
        assert rep.per_group[g] == pytest.approx(_cos([(ga[n][rows], gb[n][rows]) for n in b_names]), abs=1e-6)
    assert rep.per_group["qkv"] == pytest.approx(_cos([(ga[n], gb[n]) for n in a_names]), abs=1e-6)
    h = 1
    q, k = slice(8 * h, 8 * h + 8), slice(32 + 8 * h, 40 + 8 * h)
    n = b_names[1]
    assert float(rep.per_head[1][h]) == pytest.approx(_cos([(ga[n][q], gb[n][q]), (ga[n][k], gb[n][k])]), abs=1e-6)


def test_all_masked_batch_raises_instead_of_nan():
    """Issue 15 item 4: a batch whose labels are all -100 has a 0/0 loss; the alignment was NaN."""
    model = build("llama")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 6), generator=g)
    good = {"input_ids": ids, "labels": ids.clone()}
    masked = {"input_ids": ids, "labels": torch.full_like(ids, -100)}
    with pytest.raises(ValueError, match="batch 0 has a non-finite loss.*-100"):
        gradient_alignment(model, [masked], [good])
    with pytest.raises(ValueError, match="batch 1 has a non-finite loss"):
        task_gradient(model, [good, masked])
