"""Recovery probe: the copy learns, the original is bit-for-bit untouched."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, build

from mitigate.diagnostics import recovery_probe

torch.set_num_threads(1)


def _examples():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (5, 8), generator=g)
    return [{"input_ids": ids[i : i + 1], "labels": ids[i : i + 1]} for i in range(5)]


def _neg_loss(examples):
    def evaluate(model):
        model.eval()
        with torch.no_grad():
            return -sum(float(model(**b).loss) for b in examples) / len(examples)

    return evaluate


def test_probe_recovers_and_leaves_the_model_untouched():
    model = build("llama")
    model.train()
    model.model.layers[0].eval()  # a mixed mode must come back as it was
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    p0 = model.model.norm.weight
    p0.grad = torch.full_like(p0, 2.0)
    rng = torch.get_rng_state()
    ex = _examples()
    res = recovery_probe(model, ex, _neg_loss(ex), steps=8, lr=1e-2, seed=1)
    assert res.after > res.before and res.recovered_gain == pytest.approx(res.after - res.before)
    assert res.steps == 8 and len(res.losses) == 8
    for n, p in model.named_parameters():
        assert torch.equal(p, state[n]), n
        assert (p.grad is None) == (p is not p0)
    assert torch.equal(p0.grad, torch.full_like(p0, 2.0))
    assert model.training and not model.model.layers[0].training
    assert torch.equal(torch.get_rng_state(), rng)
    again = recovery_probe(model, ex, _neg_loss(ex), steps=8, lr=1e-2, seed=1)
    assert again.after == res.after and again.losses == res.losses  # seeded


def test_dict_evaluate_reference_and_validation():
    model = build("llama")
    ex = _examples()
    calls = []

    def evaluate(m):
        calls.append(m)
        return {"accuracy": 0.25 if len(calls) == 1 else 0.75, "exact": 0.0, "items": [1, 0, 0, 0]}

    res = recovery_probe(model, ex, evaluate, steps=1, optimizer="sgd", reference=1.25)
    assert all(m is not model for m in calls)
    assert (res.before, res.after) == (0.25, 0.75) and res.recovered_fraction == pytest.approx(0.5)
    assert res.after_metrics == {"accuracy": 0.75, "exact": 0.0}  # per-item lists are not metrics
    with pytest.raises(ValueError, match="optimizer"):
        recovery_probe(model, ex, evaluate, optimizer="lion")
    with pytest.raises(ValueError, match="accuracy"):
        recovery_probe(model, ex, lambda m: {"f1": 1.0}, steps=0)
