"""bfloat16 weights and gradient checkpointing: every mitigation trains a tiny model with both on.

Gradient checkpointing (``model.gradient_checkpointing_enable()``) registers Hugging Face's
input-embedding ``requires_grad_`` hook, which used to break every :mod:`torch.func` routine
(the curvature regularizer's Gauss-Newton Lanczos raised inside ``jvp``); the functional
routines now take the hook off while they run and put it back.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, build

import mitigate


def _batches(seed: int, n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(2, VOCAB, (4, 12), generator=g)
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})
    return out


def _model(arch: str) -> torch.nn.Module:
    m = build(arch).to(torch.bfloat16)
    m.gradient_checkpointing_enable()
    m.train()
    return m


def _train(model, opt, penalty=None, steps: int = 3) -> float:
    loss = torch.tensor(float("nan"))
    for b in _batches(1, steps):
        loss = model(**b).loss
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss.detach())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_freezing_holds_bit_identical_in_bfloat16_under_checkpointing(arch):
    model = _model(arch)
    mitigate.freeze_bottom_layers(model, 1)
    mitigate.freeze_attention_qk(model, heads={1: [0, 2]})  # GPT-2: rows of the fused c_attn
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert torch.isfinite(torch.tensor(_train(model, opt)))
    mm = mitigate.model_map(model)
    held = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(".0." in n or "h.0." in n for n in held) and moved  # block 0 held, the rest trains
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert mm.num_layers == 2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_terms_consolidate_and_train_in_bfloat16_under_checkpointing(arch):
    for make in (lambda m: mitigate.EWC(m), lambda m: mitigate.CurvatureRegularizer(m)):
        model = _model(arch)
        term = make(model)
        term.consolidate(_batches(0))  # the curvature term's GGN Lanczos used to raise here
        # the model leaves consolidation as it came: checkpointing and its input hook kept
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        assert model._require_grads_hooks and model.training
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss = _train(model, opt, penalty=term)
        assert torch.isfinite(torch.tensor(loss))
        assert float(term()) > 0  # the parameters moved off the anchor and the term sees it


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_optimizer_wrappers_remember_and_step_in_bfloat16_under_checkpointing(arch):
    for mode in ("agem", "ogd"):
        model = _model(arch)
        proj = mitigate.GradientProjection(torch.optim.AdamW(model.parameters(), lr=1e-2), mode=mode, model=model)
        proj.remember(model, _batches(0))
        assert torch.isfinite(torch.tensor(_train(model, proj)))
    model = _model(arch)
    lrcp = mitigate.LowRankCircuitProjection(torch.optim.AdamW(model.parameters(), lr=1e-2), model)
    lrcp.remember(model, _batches(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert torch.isfinite(torch.tensor(_train(model, lrcp)))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_functional_routines_restore_the_input_grad_hook_even_on_error():
    from mitigate._utils import input_grad_hooks_removed

    model = _model("llama")
    hooks = list(model._require_grads_hooks)
    with pytest.raises(RuntimeError, match="inside"), input_grad_hooks_removed(model):
        assert not getattr(model, "_require_grads_hooks", None)
        raise RuntimeError("inside")
    assert len(model._require_grads_hooks) == len(hooks)
    emb = model.get_input_embeddings()
    out = emb(torch.tensor([[3, 4]]))
    assert out.requires_grad  # the hook is live again
