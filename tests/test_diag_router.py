"""MoE router drift on a tiny Mixtral against logits from ``output_router_logits=True``."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, build

from mitigate.diagnostics import router_drift

torch.set_num_threads(1)


def _batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for b, t in ((2, 7), (3, 5)):
        ids = torch.randint(2, VOCAB, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t - 2 :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_identical_models_do_not_drift():
    model = build("mixtral")
    res = router_drift(model, copy.deepcopy(model), _batches())
    assert res.layers == [0, 1] and res.top_k == 2
    assert torch.equal(res.kl_per_layer, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(res.changed_topk_fraction, torch.zeros(2, dtype=torch.float64))
    assert res.n_tokens == sum(int(b["attention_mask"].sum()) for b in _batches())


def test_perturbed_router_matches_manual_kl_and_topk_change():
    before = build("mixtral")
    after = copy.deepcopy(before)
    with torch.no_grad():
        after.model.layers[1].mlp.gate.weight.add_(torch.randn(4, 32, generator=torch.Generator().manual_seed(3)))
    res = router_drift(before, after, _batches())
    assert float(res.kl_per_layer[0]) == 0.0 and float(res.changed_topk_fraction[0]) == 0.0
    assert float(res.kl_per_layer[1]) > 0 and float(res.changed_topk_fraction[1]) > 0
    # independent: router logits recorded by transformers, pad tokens dropped
    kl, changed, n = 0.0, 0.0, 0
    for batch in _batches():
        with torch.no_grad():
            zb = before(**batch, output_router_logits=True).router_logits[1]
            za = after(**batch, output_router_logits=True).router_logits[1]
        keep = batch["attention_mask"].reshape(-1).bool()
        p, q = torch.softmax(zb[keep].double(), -1), torch.softmax(za[keep].double(), -1)
        kl += float((p * (p.log() - q.log())).sum())
        for i in range(p.shape[0]):
            changed += set(p[i].topk(2).indices.tolist()) != set(q[i].topk(2).indices.tolist())
        n += int(keep.sum())
    assert float(res.kl_per_layer[1]) == pytest.approx(kl / n, rel=1e-9)
    assert float(res.changed_topk_fraction[1]) == pytest.approx(changed / n)


def test_dense_model_is_rejected():
    model = build("llama")
    with pytest.raises(ValueError, match="no MoE router"):
        router_drift(model, model, _batches())
