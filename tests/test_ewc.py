"""EWC: Fisher estimators against hand-computed per-sample gradients, penalty value and gradient
against the formula, online decay, task accumulation, state round trip, errors."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mitigate.errors import StateMismatchError
from mitigate.regularizers.ewc import EWC, EWCConfig, relative_strength

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0) -> nn.Module:
    cfg = transformers.AutoConfig.for_model(
        "llama", hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=16, max_position_embeddings=16,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").double()


def lm_batches() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (5, 6), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # ignored positions: per-sample token mean over the rest
    labels[3, 4:] = -100
    mask = torch.ones_like(ids)
    return [
        {"input_ids": ids[:3], "labels": labels[:3], "attention_mask": mask[:3]},
        {"input_ids": ids[3:], "labels": labels[3:], "attention_mask": mask[3:]},
    ]


def hand_empirical_fisher(model: nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p) for n, p in named.items()}
    count = 0
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            loss = model(**{k: v[i : i + 1] for k, v in b.items()}).loss
            grads = torch.autograd.grad(loss, list(named.values()))
            for n, g in zip(named, grads):
                acc[n] += g**2
            count += 1
    return {n: a / count for n, a in acc.items()}


def perturb(model: nn.Module, scale: float = 0.01, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ------------------------------------------------------------------ Fisher estimators


@pytest.mark.parametrize("force_loop", [False, True])
def test_empirical_fisher_matches_per_sample_loop(force_loop):
    model, batches = tiny_llama(), lm_batches()
    ewc = EWC(model, strength=1.0, fisher="empirical", dtype=torch.float64)
    ewc._vmap_failed = force_loop  # exercise the loop fallback too
    fisher = ewc.consolidate(batches)
    ref = hand_empirical_fisher(model, batches)
    assert set(fisher) == set(ref)
    for n in ref:
        torch.testing.assert_close(fisher[n], ref[n], rtol=1e-6, atol=1e-12)


def test_batch_fisher_is_size_weighted_mean_of_squared_minibatch_gradients():
    model, batches = tiny_llama(), lm_batches()
    fisher = EWC(model, fisher="batch", dtype=torch.float64).consolidate(batches)
    named = dict(model.named_parameters())
    ref = {n: torch.zeros_like(p) for n, p in named.items()}
    for b in batches:
        grads = torch.autograd.grad(model(**b).loss, list(named.values()))
        for n, g in zip(named, grads):
            ref[n] += g**2 * b["input_ids"].shape[0] / 5
    for n in ref:
        torch.testing.assert_close(fisher[n], ref[n], rtol=1e-8, atol=1e-14)
    emp = EWC(model, fisher="empirical", dtype=torch.float64).estimate_fisher(batches)
    assert not torch.allclose(emp["model.embed_tokens.weight"], fisher["model.embed_tokens.weight"])


def test_true_fisher_matches_expectation_on_a_classifier():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    x = torch.randn(1, 3, dtype=torch.float64)
    batch = {"x": x.repeat(6000, 1)}
    ewc = EWC(model, fisher="true", dtype=torch.float64, seed=1, logits_fn=lambda m, b: m(b["x"]))
    fisher = ewc.estimate_fisher(batch)
    # exact: Σ_y p(y) (∇ -log p(y))²
    probs = torch.softmax(model(x), -1).detach()[0]
    exact = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for y in range(4):
        loss = F.cross_entropy(model(x), torch.tensor([y]))
        for (n, p), g in zip(model.named_parameters(), torch.autograd.grad(loss, list(model.parameters()))):
            exact[n] += probs[y] * g**2
    for n in exact:
        torch.testing.assert_close(fisher[n], exact[n], rtol=0.1, atol=2e-3)
    again = EWC(model, fisher="true", dtype=torch.float64, seed=1, logits_fn=lambda m, b: m(b["x"])).estimate_fisher(batch)
    assert all(torch.equal(fisher[n], again[n]) for n in fisher)  # seeded


def test_true_fisher_causal_lm_runs_and_is_seeded():
    model, batches = tiny_llama(), lm_batches()
    f1 = EWC(model, fisher="true", seed=3).estimate_fisher(batches)
    f2 = EWC(model, fisher="true", seed=3).estimate_fisher(batches)
    f3 = EWC(model, fisher="true", seed=4).estimate_fisher(batches)
    assert all(torch.equal(f1[n], f2[n]) for n in f1)
    assert not all(torch.equal(f1[n], f3[n]) for n in f1)
    assert all(bool((f >= 0).all()) and bool(torch.isfinite(f).all()) for f in f1.values())
    with pytest.raises(ValueError, match="logits_fn"):
        EWC(model, fisher="true").estimate_fisher(batches, loss_fn=lambda m, b: m(**b).loss)


# ------------------------------------------------------------------ penalty


def test_penalty_value_and_gradient_match_formula():
    model, batches = tiny_llama(), lm_batches()
    ewc = EWC(model, strength=3.0, dtype=torch.float64)
    ewc.consolidate(batches)
    fisher, anchor = ewc.fisher(), ewc.anchor()
    perturb(model)
    named = dict(model.named_parameters())
    pen = ewc()
    ref = 1.5 * sum((fisher[n] * (named[n] - anchor[n]) ** 2).sum() for n in fisher)
    torch.testing.assert_close(pen, ref)
    grads = torch.autograd.grad(pen, list(named.values()))
    for (n, p), g in zip(named.items(), grads):
        torch.testing.assert_close(g, 3.0 * fisher[n] * (p.detach() - anchor[n]))


def test_tasks_accumulate_and_online_decay():
    model, batches = tiny_llama(), lm_batches()
    acc = EWC(model, strength=1.0, dtype=torch.float64, keep_tasks=True)
    online = EWC(model, strength=1.0, dtype=torch.float64, online_decay=0.5)
    f0 = acc.consolidate(batches[:1])
    online.consolidate(batches[:1])
    perturb(model, seed=1)
    theta1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    f1 = acc.consolidate(batches[1:])
    online.consolidate(batches[1:])
    assert acc.num_tasks == 2 and online.num_tasks == 2
    assert len([k for k in online.state_dict() if "__fisher__" in k]) == len(f0)  # one pair
    for n in f0:
        torch.testing.assert_close(online.fisher()[n], 0.5 * f0[n] + f1[n])
        assert torch.equal(online.anchor()[n], theta1[n])
        assert torch.equal(acc.fisher(0)[n], f0[n]) and torch.equal(acc.fisher(1)[n], f1[n])
    perturb(model, seed=2)
    named = dict(model.named_parameters())
    ref = sum(
        0.5 * (acc.fisher(t)[n] * (named[n] - acc.anchor(t)[n]) ** 2).sum() for t in (0, 1) for n in f0
    )
    torch.testing.assert_close(acc(), ref)


def test_zero_before_consolidate_supports_backward():
    model = tiny_llama()
    pen = EWC(model, strength=1.0)()
    assert pen.item() == 0.0 and pen.device == next(model.parameters()).device
    pen.backward()
    (pen + model(**lm_batches()[0]).loss).backward()


def test_state_dict_round_trip_and_model_not_a_submodule():
    model, batches = tiny_llama(), lm_batches()
    ewc = EWC(model, strength=2.0, dtype=torch.float64)
    ewc.consolidate(batches[:1])
    ewc.consolidate(batches[1:])
    sd = ewc.state_dict()
    assert not any(k.startswith("model.") or k.startswith("_model") for k in sd)
    assert all("." not in k for k in sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = EWC(model, strength=2.0, dtype=torch.float64)
    fresh.load_state_dict(loaded)
    perturb(model)
    assert fresh.num_tasks == 2
    assert torch.equal(fresh(), ewc())
    assert list(dict(ewc.named_modules())) == [""]  # no submodules at all


def test_consolidate_leaves_grad_and_mode():
    model, batches = tiny_llama(), lm_batches()
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    grads = [p.grad for p in model.parameters()]
    for kind in ("empirical", "true", "batch"):
        EWC(model, fisher=kind).consolidate(batches)
    assert all(m.training for m in model.modules())
    assert all(p.grad is g and bool((g == 1).all()) for p, g in zip(model.parameters(), grads))


def test_consolidate_with_a_given_fisher_stores_it_and_skips_the_estimate(monkeypatch):
    model, batches = tiny_llama(), lm_batches()
    first = EWC(model, strength=3.0)
    estimate = first.consolidate(batches)
    second = EWC(model, strength=3.0)
    monkeypatch.setattr(EWC, "estimate_fisher", lambda *a, **k: pytest.fail("estimated again"))
    assert second.consolidate(None, fisher=estimate) == estimate
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    assert torch.equal(first(), second())
    for n in estimate:
        assert torch.equal(second.fisher()[n], estimate[n]) and torch.equal(second.anchor()[n], first.anchor()[n])
    name = next(iter(estimate))
    with pytest.raises(ValueError, match=f"missing \\['{name}'\\]"):
        EWC(model).consolidate(None, fisher={n: f for n, f in estimate.items() if n != name})
    with pytest.raises(ValueError, match="reshaped"):
        EWC(model).consolidate(None, fisher={**estimate, name: estimate[name].reshape(-1)})


def test_peft_stores_trainable_parameters_only():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ewc = EWC(model, strength=1.0)
    fisher = ewc.consolidate(lm_batches())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(fisher) == trainable and all("lora_" in n for n in fisher)
    ewc().backward()


# ------------------------------------------------------------------ errors


def test_errors():
    model, batches = tiny_llama(), lm_batches()
    ewc = EWC(model, strength=1.0)
    with pytest.raises(ValueError, match="no batches"):
        ewc.consolidate([])
    with pytest.raises(ValueError, match="non-finite"):
        ewc.consolidate(batches, loss_fn=lambda m, b: m(**b).loss * float("nan"))
    ewc.consolidate(batches)
    model.resize_token_embeddings(20)
    with pytest.raises(StateMismatchError, match="embed_tokens"):
        ewc()
    for bad, match in [
        (dict(strength=-1.0), "strength=-1.0"),
        (dict(fisher="diag"), "fisher='diag'"),
        (dict(online_decay=1.5), "online_decay=1.5"),
        (dict(dtype=torch.int32), "dtype="),
        (dict(chunk_size=0), "chunk_size=0"),
    ]:
        with pytest.raises(ValueError, match=match.replace("(", r"\(")):
            EWCConfig(**bad)


# ------------------------------------------------------------------ issue 13 / 15 items


def test_relative_strength_is_scale_over_mean_fisher_and_absolute_stays_reachable():
    model, batches = tiny_llama(), lm_batches()
    rel = EWC(model, scale=100.0, dtype=torch.float64)
    fisher = rel.consolidate(batches)
    assert rel.strength_mode == "relative" and rel.lambda_ == pytest.approx(relative_strength(100.0, fisher.values()))
    mean = sum(float(f.sum()) for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    assert rel.lambda_ * mean == pytest.approx(100.0, rel=1e-12)
    ab = EWC(model, strength=7.0, dtype=torch.float64)
    ab.consolidate(batches, fisher=fisher)
    assert ab.strength_mode == "absolute" and ab.lambda_ == 7.0
    perturb(model)
    assert float(rel()) == pytest.approx(float(ab()) * rel.lambda_ / 7.0, rel=1e-12)
    with pytest.raises(ValueError, match="Fisher is zero on every selected parameter"):
        EWC(model).consolidate(batches, fisher={n: torch.zeros_like(f) for n, f in fisher.items()})
    with pytest.raises(ValueError, match="both given"):
        EWC(model, strength=1.0, scale=100.0)
    with pytest.raises(ValueError, match="calibrated mode"):
        rel.calibrate(batches[0])
    assert EWC(model).strength_mode == "calibrated"  # the default


def _new_task_batch() -> dict:
    b = lm_batches()[1]
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 16, b["labels"].shape, generator=g)
    return {**b, "labels": torch.where(b["labels"] == -100, b["labels"], labels)}


def _grad_sq_mean(model: nn.Module, batches: list[dict]) -> float:
    """mean over elements of n_b-weighted squared minibatch gradients, by hand."""
    params = [p for p in model.parameters() if p.requires_grad]
    total, rows = 0.0, 0
    for b in batches:
        grads = torch.autograd.grad(model(**b).loss, params)
        n_b = b["input_ids"].shape[0]
        total += n_b * sum(float(g.pow(2).sum()) for g in grads) / sum(g.numel() for g in grads)
        rows += n_b
    return total / rows


def _fisher_mean(fisher: dict) -> float:
    return sum(float(f.sum()) for f in fisher.values()) / sum(f.numel() for f in fisher.values())


def test_calibrated_strength_is_set_per_task_from_the_next_tasks_gradient_at_its_anchor():
    """λ_t = balance · mean(g²) / mean(F_t)², g the next task's minibatch gradients at θ*_t over
    the first ``calibration_batches`` batches given to ewc(batch); checked in float64 against
    autograd by hand. The gradient is taken at the anchor, not at the live parameters."""
    import copy

    model, batches = tiny_llama(), lm_batches()
    model.eval()
    ewc = EWC(model, balance=3e-3, calibration_batches=2, dtype=torch.float64)
    fisher = ewc.consolidate(batches)
    at_anchor = copy.deepcopy(model)
    assert ewc.strength_mode == "calibrated" and ewc.lambda_ is None and ewc.pending_calibration
    new = [_new_task_batch(), batches[0]]
    want = 3e-3 * _grad_sq_mean(at_anchor, new) / _fisher_mean(fisher) ** 2
    assert float(ewc(new[0])) == 0.0 and ewc.pending_calibration  # one of two batches measured
    perturb(model)  # the second batch is still measured at θ*_0
    ewc(new[1])
    assert not ewc.pending_calibration and ewc.task_lambdas == [pytest.approx(want, rel=1e-10)]
    lam0 = ewc.lambda_
    ab = EWC(model, strength=lam0, dtype=torch.float64)
    ab.consolidate(batches, fisher=fisher)
    ab._buffers.update({k: v.clone() for k, v in ewc._buffers.items()})  # same θ*
    assert float(ewc(new[0])) == pytest.approx(float(ab()), rel=1e-12) and ewc.task_lambdas == [lam0]
    # a second task: its own λ_1 from its own Fisher, merged storage folds λ_t F_t exactly
    per_task = EWC(model, balance=3e-3, calibration_batches=2, dtype=torch.float64, keep_tasks=True)
    per_task.consolidate(None, fisher=fisher)
    per_task._buffers.update({k: v.clone() for k, v in ewc._buffers.items()})
    per_task.calibrate(new[:1])
    per_task._pair_lambdas[0] = per_task._task_lambdas[0] = lam0
    f1 = ewc.consolidate(batches)
    per_task.consolidate(None, fisher=f1)
    assert ewc.pending_calibration and ewc.lambda_ is None and ewc.task_lambdas == [lam0]
    lam1 = ewc.calibrate([new[1]])
    assert lam1 == pytest.approx(3e-3 * _grad_sq_mean(model, [new[1]]) / _fisher_mean(f1) ** 2, rel=1e-10)
    assert per_task.calibrate([new[1]]) == pytest.approx(lam1, rel=1e-12)
    assert len(ewc.state_dict()) < len(per_task.state_dict())  # one merged pair against two
    perturb(model, seed=3)
    params = list(model.parameters())
    va, vb = ewc(), per_task()
    for a, b in zip(torch.autograd.grad(va, params), torch.autograd.grad(vb, params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14)
    assert float(va) == pytest.approx(float(vb), rel=1e-9)
    with pytest.raises(ValueError, match="no task waits"):
        ewc.calibrate(new)


def test_uncalibrated_ewc_warns_once_and_uses_scale_over_mean_fisher_then_round_trips(tmp_path):
    import warnings

    model, batches = tiny_llama(), lm_batches()
    ewc = EWC(model, balance=3e-3, dtype=torch.float64)
    fisher = ewc.consolidate(batches)
    rel = EWC(model, scale=100.0, dtype=torch.float64)
    rel.consolidate(batches, fisher=fisher)
    perturb(model)
    with pytest.warns(UserWarning, match="pass the batch"):
        first = float(ewc())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(ewc()) == first  # warned once
    assert first == pytest.approx(float(rel()), rel=1e-12) and ewc.pending_calibration
    ewc(_new_task_batch())  # 1 of 4 calibration batches: running λ, still pending
    assert ewc.pending_calibration and ewc.lambda_ is not None
    # the pending state, the running measurement and mean(F_t) survive a state_dict round trip
    buf = io.BytesIO()
    torch.save(ewc.state_dict(), buf)
    buf.seek(0)
    fresh = EWC(model, balance=3e-3, dtype=torch.float64)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.pending_calibration and fresh.lambda_ == ewc.lambda_ and float(fresh()) == float(ewc())
    lam = fresh.calibrate(_new_task_batch())
    assert lam == pytest.approx(ewc.calibrate(_new_task_batch()), rel=1e-12)
    buf = io.BytesIO()
    torch.save(fresh.state_dict(), buf)
    buf.seek(0)
    again = EWC(model, scale=10.0, dtype=torch.float64)  # relative: adopts the saved calibrated mode, warns
    with pytest.warns(UserWarning, match="calibrated strength 0.003"):
        again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.strength_mode == "calibrated"
    assert not again.pending_calibration and again.task_lambdas == [lam] and float(again()) == float(fresh())
    with pytest.raises(ValueError, match="no task waits"):
        EWC(model, balance=3e-3).calibrate(batches[0])
    again.consolidate(batches)
    zero = {**batches[0], "labels": torch.full_like(batches[0]["labels"], -100)}
    with pytest.raises(ValueError):
        again.calibrate(zero)
    assert again.pending_calibration and again.task_lambdas == [lam]  # unchanged by the refused calibration
    with pytest.raises(ValueError, match="online_decay"):
        EWC(model, online_decay=0.5)
    assert EWC(model, scale=100.0, online_decay=0.5).strength_mode == "relative"
    with pytest.raises(ValueError, match="calibration_batches=0"):
        EWC(model, balance=3e-3, calibration_batches=0)


def test_merged_pairs_equal_the_per_task_sum_over_three_tasks_and_state_stays_constant():
    model, batches = tiny_llama(), lm_batches()
    merged = EWC(model, strength=2.0, dtype=torch.float64)
    per_task = EWC(model, strength=2.0, dtype=torch.float64, keep_tasks=True)
    sizes = []
    for t in range(3):
        f = per_task.consolidate(batches)
        merged.consolidate(batches, fisher=f)
        sizes.append(sum(v.numel() for v in merged.state_dict().values() if isinstance(v, torch.Tensor)))
        perturb(model, 0.05, seed=t)
    assert sizes[0] == sizes[1] == sizes[2]
    assert len(per_task.state_dict()) > len(merged.state_dict())
    params = [p for p in model.parameters()]
    va, vb = merged(), per_task()
    ga, gb = torch.autograd.grad(va, params), torch.autograd.grad(vb, params)
    # float64 sums of O(1e2) terms: relative error ~1e-14; 1e-10 leaves a wide margin
    assert float(va) == pytest.approx(float(vb), rel=1e-10)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_true_fisher_leaves_fully_masked_samples_out_and_refuses_all_masked(monkeypatch):
    import mitigate.regularizers.ewc as ewc_mod

    # deterministic "draws": the batch's own labels, so the two estimates see the same targets
    monkeypatch.setattr(ewc_mod, "_sample_labels", lambda logits, batch, gen: batch["labels"].clone())
    model, batches = tiny_llama(), lm_batches()
    b = batches[0]
    masked = {k: v.clone() for k, v in b.items()}
    masked["labels"][1] = -100  # sample 1 has nothing to draw: zero gradient, not a sample
    keep = {k: v[[0, 2]] for k, v in b.items()}
    f_masked = EWC(model, fisher="true", dtype=torch.float64, strength=1.0).estimate_fisher([masked])
    f_keep = EWC(model, fisher="true", dtype=torch.float64, strength=1.0).estimate_fisher([keep])
    for n in f_keep:  # before the fix: f_masked = (2/3) f_keep
        torch.testing.assert_close(f_masked[n], f_keep[n], rtol=1e-10, atol=1e-18)
    all_masked = {**b, "labels": torch.full_like(b["labels"], -100)}
    with pytest.raises(ValueError, match="no sample has a label"):
        EWC(model, fisher="true", strength=1.0).consolidate([all_masked])


def test_state_carries_strength_and_mode_and_refuses_a_curvature_state(tmp_path):
    import warnings

    import mitigate

    model, batches = tiny_llama(), lm_batches()
    ewc = EWC(model, strength=250.0, dtype=torch.float64)
    ewc.consolidate(batches)
    perturb(model)
    buf = io.BytesIO()
    torch.save(ewc.state_dict(), buf)
    buf.seek(0)
    fresh = EWC(model, dtype=torch.float64)  # defaults: calibrated
    with pytest.warns(UserWarning, match="absolute strength 250"):
        fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.strength_mode == "absolute" and fresh.lambda_ == 250.0
    assert float(fresh()) == float(ewc())
    same = EWC(model, strength=250.0, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(ewc.state_dict())
    reg = mitigate.CurvatureRegularizer(model)
    before = {k: v.clone() for k, v in same.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(StateMismatchError, match="not an EWC state: got a dict with keys"):
        same.load_state_dict(reg.state_dict())
    after = {k: v for k, v in same.state_dict().items() if isinstance(v, torch.Tensor)}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_safetensors_round_trip_is_bit_identical(tmp_path):
    import mitigate

    model, batches = tiny_llama(), lm_batches()
    ewc = EWC(model, dtype=torch.float64)
    ewc.consolidate(batches)
    perturb(model)
    ewc.consolidate(batches)
    path = tmp_path / "ewc.safetensors"
    mitigate.save_state(ewc, path)
    fresh = EWC(model, dtype=torch.float64)
    mitigate.load_state(fresh, path)
    a, b = ewc.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
        else:
            assert a[k] == b[k]
    perturb(model, seed=9)
    assert float(fresh()) == float(ewc())


def test_per_sample_fisher_is_chunked_by_default(monkeypatch):
    """Memory bound: no vmap call sees more than chunk_size (default 8) samples, whatever the batch."""
    import mitigate.regularizers.ewc as ewc_mod

    seen = []
    real = ewc_mod.vmap

    def spy(fn, in_dims, **kw):
        inner = real(fn, in_dims, **kw)

        def call(params, batch):
            seen.append(batch["input_ids"].shape[0])
            return inner(params, batch)
        return call

    monkeypatch.setattr(ewc_mod, "vmap", spy)
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 16, (19, 5), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    ewc = EWC(model, dtype=torch.float64)
    assert ewc.config.chunk_size == 8
    f = ewc.estimate_fisher([batch])
    assert seen == [8, 8, 3]
    ref = hand_empirical_fisher(model, [batch])
    for n in ref:
        torch.testing.assert_close(f[n], ref[n], rtol=1e-6, atol=1e-12)


def test_safetensors_round_trip_of_a_curvature_regularizer(tmp_path):
    import mitigate

    model, batches = tiny_llama(), lm_batches()
    reg = mitigate.CurvatureRegularizer(model, k=2)
    reg.consolidate(batches)
    path = tmp_path / "curv.safetensors"
    mitigate.save_state(reg, path)
    fresh = mitigate.CurvatureRegularizer(model, k=2)
    mitigate.load_state(fresh, path)
    a, b = reg.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
        else:
            assert a[k] == b[k]


def test_calibration_skips_label_free_batches_and_ignores_gradient_checkpointing():
    """A batch with no label is skipped (not counted); calibrate() with only such batches raises.
    With gradient checkpointing and eval_mode=False the gradient is still taken at θ*_t (the
    calibration runs in eval mode, where checkpointing is off), equal to a model without it."""
    import copy

    model, batches = tiny_llama(), lm_batches()
    plain = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    a = EWC(model, calibration_batches=2, eval_mode=False, dtype=torch.float64)
    b = EWC(plain, calibration_batches=2, dtype=torch.float64)
    fisher = b.consolidate(batches)
    a.consolidate(batches, fisher=fisher)
    perturb(model, 0.3)
    perturb(plain, 0.3)
    zero = {**batches[0], "labels": torch.full_like(batches[0]["labels"], -100)}
    with pytest.raises(ValueError, match="no usable batch"):
        a.calibrate([zero])
    assert a.pending_calibration and a._cal == [0.0, 0.0, 0]
    new = _new_task_batch()
    for ewc in (a, b):
        ewc(zero)  # skipped: still waiting for 2 usable batches
        ewc(new)
        assert ewc.pending_calibration
        ewc(batches[0])
        assert not ewc.pending_calibration
    assert model.training and a.task_lambdas[0] == pytest.approx(b.task_lambdas[0], rel=1e-10)


def test_a_calibrated_keep_tasks_state_brings_its_storage_into_an_online_ewc_and_damaged_states_are_refused():
    import warnings

    model, batches = tiny_llama(), lm_batches()
    src = EWC(model, keep_tasks=True, dtype=torch.float64)
    for t in range(3):
        src.consolidate(batches)
        src.calibrate(_new_task_batch())
        perturb(model, seed=t)
    state = src.state_dict()
    dst = EWC(model, scale=100.0, online_decay=0.5, dtype=torch.float64)
    with pytest.warns(UserWarning, match="using the saved storage"):
        dst.load_state_dict(state)
    assert dst.config.keep_tasks and dst.config.online_decay is None and dst.strength_mode == "calibrated"
    assert float(dst()) == pytest.approx(float(src()), rel=1e-12)
    damaged = dict(state)
    damaged["_extra_state"] = {**state["_extra_state"], "keep_tasks": False}
    fresh = EWC(model, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(StateMismatchError, match="holds at most 2"):
            fresh.load_state_dict(damaged)
    assert fresh.num_tasks == 0 and not fresh.state_dict().keys() - {"_extra_state"}
