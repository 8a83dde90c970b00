"""Attention entropy on hand-built patterns and masks; disrupted heads on constructed weight
perturbations (separate, GQA and fused GPT-2 QKV)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import VOCAB, build

import mitigate
from mitigate.diagnostics import attention_entropy, disrupted_heads, head_weight_distance

torch.set_num_threads(1)


def test_uniform_attention_is_log2_T_with_and_without_mask():
    b, h, t = 2, 3, 8
    att = torch.full((b, h, t, t), 1.0 / t)
    ent = attention_entropy((att, att))
    assert ent.shape == (2, 3) and ent.dtype == torch.float32
    torch.testing.assert_close(ent, torch.full((2, 3), math.log2(t)))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 5:] = 0
    torch.testing.assert_close(attention_entropy((att,), mask), torch.full((1, 3), math.log2(t)))


def test_causal_rows_with_mask_average_over_valid_queries_only():
    b, h, t = 2, 1, 6
    att = torch.zeros(b, h, t, t, dtype=torch.float64)
    for q in range(t):
        att[:, :, q, : q + 1] = 1.0 / (q + 1)  # causal uniform: row q has support q + 1
    mask = torch.ones(b, t)
    mask[1, 4:] = 0  # example 1 has 4 real tokens
    rows = [math.log2(q + 1) for q in range(t)] + [math.log2(q + 1) for q in range(4)]
    expected = sum(rows) / len(rows)
    ent = attention_entropy([att], mask)
    assert ent.dtype == torch.float64
    assert float(ent[0, 0]) == pytest.approx(expected, rel=1e-12)
    # pad query rows holding garbage do not count
    att[1, :, 4:, :] = torch.softmax(torch.randn(2, t, dtype=torch.float64), -1)
    assert float(attention_entropy([att], mask)[0, 0]) == pytest.approx(expected, rel=1e-12)


def test_hand_built_tensor_and_stacked_layout():
    # (L=2, B=1, H=2, T=2, S=2)
    att = torch.tensor(
        [
            [[[[1.0, 0.0], [0.5, 0.5]], [[0.25, 0.75], [0.25, 0.75]]]],
            [[[[0.5, 0.5], [0.5, 0.5]], [[1.0, 0.0], [0.0, 1.0]]]],
        ]
    )
    h_quarter = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    expected = torch.tensor([[0.5, h_quarter], [1.0, 0.0]])
    torch.testing.assert_close(attention_entropy(att), expected)
    torch.testing.assert_close(attention_entropy(tuple(att)), expected)
    # only the second query row valid
    torch.testing.assert_close(attention_entropy(att, torch.tensor([[0, 1]])), torch.tensor([[1.0, h_quarter], [1.0, 0.0]]))


def test_entropy_of_a_real_model_matches_manual():
    model = build("llama")
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    got = attention_entropy(out.attentions, mask)
    manual = []
    for a in out.attentions:
        p = a.double()
        e = -(torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p))).sum(-1)  # (B, H, T)
        manual.append(e.permute(1, 0, 2)[:, mask.bool()].mean(-1))
    torch.testing.assert_close(got, torch.stack(manual).float(), rtol=1e-5, atol=1e-6)


def test_missing_attentions_raise_a_clear_error():
    with pytest.raises(ValueError, match="eager"):
        attention_entropy(())
    with pytest.raises(ValueError, match="eager"):
        attention_entropy((None, None))
    model = build("llama")
    model.set_attn_implementation("sdpa")
    batch = {"input_ids": torch.randint(2, VOCAB, (1, 5))}
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        disrupted_heads(model, model, [batch])


def _batches():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 6:] = 0
    return [{"input_ids": ids, "attention_mask": mask}]


def _perturb_rows(model, layer: int, proj: str, head: int, scale: float = 3.0) -> None:
    mm = mitigate.model_map(model)
    att = mm.attention(mm.blocks[layer])[0]
    sl = getattr(att, proj)
    w = model.get_parameter(sl.param_name)
    with torch.no_grad():
        idx = sl.index[head]
        noise = torch.randn(w.index_select(sl.dim, idx).shape, generator=torch.Generator().manual_seed(0))
        w.index_add_(sl.dim, idx, scale * noise)


def test_identical_models_have_no_disrupted_heads():
    model = build("llama")
    res = disrupted_heads(model, copy.deepcopy(model), _batches())
    assert res.mask.shape == (2, 4) and not res.mask.any()
    assert res.fraction == 0.0
    torch.testing.assert_close(res.entropy_change, torch.zeros(2, 4, dtype=torch.float64))
    torch.testing.assert_close(res.weight_z, torch.zeros(2, 4, dtype=torch.float64))


def test_strong_q_perturbation_of_one_head_is_flagged():
    before = build("llama")
    after = copy.deepcopy(before)
    _perturb_rows(after, layer=1, proj="q", head=2)
    before.train()
    res = disrupted_heads(before, after, _batches())
    assert before.training  # mode restored
    expected = torch.zeros(2, 4, dtype=torch.bool)
    expected[1, 2] = True
    assert torch.equal(res.mask, expected)
    assert res.fraction == pytest.approx(1 / 8)
    torch.testing.assert_close(res.fraction_per_layer, torch.tensor([0.0, 0.25], dtype=torch.float64))
    # z-score over the 8 heads: one outlier among zeros is (7/8) / sqrt(7/64) = sqrt(7)
    assert float(res.weight_z[1, 2]) == pytest.approx(math.sqrt(7), rel=1e-9)
    # weight distance is exactly the squared norm of the added rows
    d = head_weight_distance(before, after)
    w_a, w_b = (m.model.layers[1].self_attn.q_proj.weight.detach().double() for m in (after, before))
    assert float(d[1, 2]) == pytest.approx(float((w_a - w_b).square().sum()), rel=1e-12)
    # layer 0 attention is untouched, so its entropy does not change
    torch.testing.assert_close(res.entropy_change[0], torch.zeros(4, dtype=torch.float64))


def test_entropy_threshold_alone_flags_heads():
    before = build("llama")
    after = copy.deepcopy(before)
    _perturb_rows(after, layer=0, proj="q", head=0, scale=0.5)
    res = disrupted_heads(before, after, _batches(), entropy_threshold=-1.0, z_threshold=1e9)
    assert res.mask.all()  # every change exceeds −1 bit
    res = disrupted_heads(before, after, _batches(), entropy_threshold=1e9, z_threshold=1e9)
    assert not res.mask.any()


def test_gqa_k_rows_count_for_every_head_of_the_group():
    before = build("llama")  # 4 query heads, 2 K/V heads: heads 0,1 share K/V head 0
    after = copy.deepcopy(before)
    _perturb_rows(after, layer=0, proj="k", head=1)
    d = head_weight_distance(before, after)
    assert torch.equal(d[1], torch.zeros(4, dtype=torch.float64))
    assert d[0, 0] == 0 and d[0, 1] == 0 and d[0, 2] > 0 and d[0, 2] == d[0, 3]


def test_fused_gpt2_qkv_rows_are_sliced_per_head():
    before = build("gpt2")
    after = copy.deepcopy(before)
    with torch.no_grad():  # c_attn is Conv1D (in, 3·n_embd): Q columns of head 3 are 24:32
        after.transformer.h[1].attn.c_attn.weight[:, 24:32] += 1.0
        after.transformer.h[1].attn.c_attn.bias[32 + 8 : 32 + 16] += 1.0  # K bias of head 1
        after.transformer.h[0].attn.c_attn.weight[:, 64:] += 1.0  # V only: no Q/K change
    d = head_weight_distance(before, after)
    expected = torch.zeros(2, 4, dtype=torch.float64)
    expected[1, 3] = 32 * 8
    expected[1, 1] = 8
    torch.testing.assert_close(d, expected)


def test_null_reference_reaches_past_the_cantelli_cap():
    # every head moves a little in the control and a lot in the run: against the heads
    # themselves (z across heads) at most 1 / (1 + 2.5²) = 13.8 % can be flagged; against the
    # null every head is
    before = build("llama")
    control, after = copy.deepcopy(before), copy.deepcopy(before)
    for layer in range(2):
        for head in range(4):
            _perturb_rows(control, layer=layer, proj="q", head=head, scale=0.01 * (1 + head))
            _perturb_rows(after, layer=layer, proj="q", head=head, scale=0.5)
    own = disrupted_heads(before, after, _batches(), entropy_threshold=1e9)
    assert own.reference == "heads" and own.fraction <= 1 / (1 + 2.5**2)
    res = disrupted_heads(before, after, _batches(), entropy_threshold=1e9, null_model=control)
    assert res.reference == "null" and res.fraction == 1.0 and res.lower_fraction == 1.0
    d, d0 = head_weight_distance(before, after), head_weight_distance(before, control)
    torch.testing.assert_close(res.weight_z, (d - d0.mean()) / d0.std(unbiased=False))
    # the control itself is not disrupted against itself beyond its own spread
    same = disrupted_heads(before, control, _batches(), entropy_threshold=1e9, null_model=control)
    assert same.fraction <= 1 / (1 + 2.5**2)
    # lower_fraction counts the lower half of the layers only
    one = copy.deepcopy(before)
    _perturb_rows(one, layer=1, proj="q", head=0, scale=0.5)
    r1 = disrupted_heads(before, one, _batches(), entropy_threshold=1e9, null_model=control)
    assert r1.mask[1, 0] and r1.lower_fraction == 0.0 and r1.fraction == pytest.approx(1 / 8)
    with pytest.raises(ValueError, match="2 and 3 blocks"):
        disrupted_heads(before, after, _batches(), null_model=build("llama", num_hidden_layers=3))
