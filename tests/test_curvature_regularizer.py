"""CurvatureRegularizer: anchor and preservation terms against their formulas and finite
differences, amortisation, the two-task toy where it keeps task 0's λ_max, state, errors."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mitigate.curvature import hessian_eigenvalues
from mitigate.errors import StateMismatchError
from mitigate.regularizers.curvature import CurvatureConfig, CurvatureRegularizer


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def mlp_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


def mlp_batches(seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    return [{"x": x[:6], "y": y[:6]}, {"x": x[6:], "y": y[6:]}]


def perturb(model: nn.Module, scale: float = 0.05, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def rayleigh(model: nn.Module, batch: dict, v: dict) -> torch.Tensor:
    """vᵀ H v by double backward (reference)."""
    ps = dict(model.named_parameters())
    g = torch.autograd.grad(mlp_loss(model, batch), list(ps.values()), create_graph=True)
    hv = torch.autograd.grad(sum((gg * v[n]).sum() for gg, n in zip(g, ps)), list(ps.values()), create_graph=True)
    return sum((h * v[n]).sum() for h, n in zip(hv, ps))


def make(model: nn.Module, **kw) -> CurvatureRegularizer:
    """The Hessian anchor + preservation terms alone (the KL replay term is tested on its own):
    the papers' setting, on a replay memory of the first batch (6 samples)."""
    base = dict(strength=1.0, k=2, tol=1e-10, dtype=torch.float64, loss_fn=mlp_loss, replay_batch_size=None,
                curvature="hessian", replay_weight=0.0, preservation_weight=1.0, replay_samples=6)
    base.update(kw)
    return CurvatureRegularizer(model, **base)


# ------------------------------------------------------------------ terms vs formulas


def test_consolidate_stores_top_eigenpairs_and_anchor():
    model, batches = mlp(), mlp_batches()
    curv = make(model, k=3)
    eig = curv.consolidate(batches)
    # estimated on the replay memory (replay_samples=6: the first batch), a cost bounded by it
    ref = hessian_eigenvalues(model, batches[0], mlp_loss, k=3, tol=1e-10)
    torch.testing.assert_close(curv.eigenvalues(), ref.values)
    torch.testing.assert_close(eig.values, ref.values)
    for n, p in model.named_parameters():
        assert torch.equal(curv.anchor()[n], p.detach())
    drift = curv.drift()  # at θ*, on the replay batch: a fresh Lanczos finds the same values
    assert drift[0].ratio.shape == (3,)
    torch.testing.assert_close(drift[0].current, ref.values, rtol=1e-8, atol=0)
    torch.testing.assert_close(drift[0].ratio, torch.ones(3, dtype=torch.float64), rtol=1e-8, atol=0)
    torch.testing.assert_close(
        drift[0].rayleigh,
        torch.stack([rayleigh(model, batches[0], v).detach() for v in curv.eigenvectors()]),
    )


def test_anchor_term_value_and_gradient():
    model, batches = mlp(), mlp_batches()
    curv = make(model, strength=2.5, preservation_weight=0.0, anchor_weight=0.7)
    curv.consolidate(batches)
    theta_star = {n: t.clone() for n, t in curv.anchor().items()}
    perturb(model)
    lam, vecs = curv.eigenvalues(), curv.eigenvectors()
    named = dict(model.named_parameters())
    c = [sum((v[n] * (named[n] - theta_star[n])).sum() for n in named) for v in vecs]
    ref = 2.5 * 0.7 * 0.5 * sum(lam[i] * c[i] ** 2 for i in range(2))
    pen = curv()
    torch.testing.assert_close(pen, ref)
    g = torch.autograd.grad(pen, list(named.values()))
    g_ref = torch.autograd.grad(ref, list(named.values()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def _check_preservation_gradient(curv: CurvatureRegularizer, model: nn.Module, batch: dict, seed: int) -> None:
    """Directional derivative of the preservation term along a random u against a central
    finite difference (float64, h = 1e-5)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(curv.preservation_term(batch), params)
    u = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(seed)) for p in params]
    directional = sum((g * d).sum() for g, d in zip(grads, u))
    h = 1e-5

    def at(scale: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, u):
                p.add_(d, alpha=scale)
        out = float(curv.preservation_term(batch).detach())
        with torch.no_grad():
            for p, d in zip(params, u):
                p.sub_(d, alpha=scale)
        return out

    fd = (at(h) - at(-h)) / (2 * h)
    assert float(directional) == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_preservation_term_value_and_gradient_against_finite_differences():
    model, batches = mlp(), mlp_batches()
    curv = make(model)
    curv.consolidate(batches)
    perturb(model)
    lam, vecs = curv.eigenvalues(), curv.eigenvectors()
    val = curv.preservation_term(batches[1])
    ref = sum(((rayleigh(model, batches[1], v) - lam[i]) / lam[i]) ** 2 for i, v in enumerate(vecs))
    torch.testing.assert_close(val, ref)
    _check_preservation_gradient(curv, model, batches[1], seed=9)


def test_preservation_gradient_through_layernorm_is_exact():
    # the fused LayerNorm has a wrong third derivative in PyTorch; the engine routes around it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[1].weight.add_(torch.randn(6, dtype=torch.float64))
    batches = mlp_batches()
    curv = make(model, k=1)
    curv.consolidate(batches)
    perturb(model)
    _check_preservation_gradient(curv, model, batches[0], seed=3)


def _slice_term(curv: CurvatureRegularizer, model: nn.Module, s: int) -> torch.Tensor:
    """((q(θ; slice s) − q(θ*; slice s)) / λ)² summed over the eigenpairs, by double backward."""
    batch = curv._replay_slices(0)[s]
    lam = curv.eigenvalues(0)
    qref = curv._buffers["t0__qref"][s]
    q = torch.stack([rayleigh(model, batch, v) for v in curv.eigenvectors(0)])
    return (((q - qref) / lam) ** 2).sum().detach()


def test_amortised_preservation_every_steps():
    model, batches = mlp(), mlp_batches()
    curv = make(model, every=3, strength=2.0)
    curv.consolidate(batches)
    perturb(model)
    anchor = curv.anchor_term().detach()
    pres = _slice_term(curv, model, 0)  # one stored batch, replay_batch_size=None: one slice
    assert pres > 0
    vals = [curv().detach() for _ in range(4)]  # steps 0, 1, 2, 3
    torch.testing.assert_close(vals[0], 2.0 * (anchor + 3 * pres))
    torch.testing.assert_close(vals[1], 2.0 * anchor)
    torch.testing.assert_close(vals[2], 2.0 * anchor)
    torch.testing.assert_close(vals[3], 2.0 * (anchor + 3 * pres))
    torch.testing.assert_close(curv(step=7).detach(), 2.0 * anchor)


def test_preservation_is_zero_at_the_consolidated_point_on_every_slice():
    """The target of each replay slice is its own curvature at θ*: no push away from θ*."""
    model, batches = mlp(), mlp_batches()
    curv = make(model, k=2, replay_batch_size=1, every=1, anchor_weight=0.0)
    curv.consolidate(batches)
    slices = curv._replay_slices(0)
    assert len(slices) == 6  # one stored batch of 6 samples, 1 sample per slice
    for s in range(len(slices)):
        torch.testing.assert_close(_slice_term(curv, model, s), torch.zeros((), dtype=torch.float64))
        assert float(curv()) == pytest.approx(0.0, abs=1e-12)
    perturb(model, scale=0.3)  # and it does not vanish once the curvature moves
    assert float(curv()) > 1e-6


@pytest.mark.parametrize("collapse_only", [False, True])
def test_tolerance_band_and_collapse_only_against_formula(collapse_only):
    model, batches = mlp(), mlp_batches()
    curv = make(model, tolerance=0.05, collapse_only=collapse_only)
    curv.consolidate(batches)
    perturb(model, scale=0.2)
    lam, vecs = curv.eigenvalues(), curv.eigenvectors()
    d = torch.stack([(rayleigh(model, batches[1], v) - lam[i]) / lam[i] for i, v in enumerate(vecs)])
    excess = (-d - 0.05) if collapse_only else (d.abs() - 0.05)
    ref = (excess.clamp(min=0.0) ** 2).sum()
    val = curv.preservation_term(batches[1])
    torch.testing.assert_close(val, ref)
    # the perturbation must put at least one d_i outside the band and, for the two-sided band,
    # the result must differ from the plain squared error (else this test could not fail)
    assert float(ref) > 0
    assert not torch.allclose(val, (d ** 2).sum())
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(val, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b)


def test_inside_the_band_the_term_and_its_gradient_vanish():
    model, batches = mlp(), mlp_batches()
    curv = make(model, tolerance=10.0, anchor_weight=0.0, every=1)
    curv.consolidate(batches)
    perturb(model, scale=0.05)
    pen = curv()
    assert float(pen) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in torch.autograd.grad(pen, list(model.parameters())))


def test_preservation_max_norm_clips_the_gradient_and_keeps_the_value():
    model, batches = mlp(), mlp_batches()
    plain = make(model, anchor_weight=0.0, every=1)
    plain.consolidate(batches)
    perturb(model, scale=0.3)
    params = list(model.parameters())
    ref_val = plain()
    ref_g = torch.autograd.grad(ref_val, params)
    ref_norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in ref_g])))
    assert ref_norm > 1e-3
    for max_norm, expect in ((ref_norm / 4, ref_norm / 4), (ref_norm * 4, ref_norm)):
        clipped = make(model, anchor_weight=0.0, every=1, preservation_max_norm=max_norm)
        clipped.load_state_dict(plain.state_dict())
        clipped._step = 0
        val = clipped()
        torch.testing.assert_close(val, ref_val)
        g = torch.autograd.grad(val, params)
        norm = float(torch.linalg.vector_norm(torch.cat([x.reshape(-1) for x in g])))
        assert norm == pytest.approx(expect, rel=1e-9)
        for a, b in zip(g, ref_g):  # same direction
            torch.testing.assert_close(a, b * (expect / ref_norm))


def test_band_and_clip_options_are_validated():
    model = mlp()
    with pytest.raises(ValueError, match="tolerance=-0.1"):
        make(model, tolerance=-0.1)
    with pytest.raises(ValueError, match="preservation_max_norm=0"):
        make(model, preservation_max_norm=0)
    with pytest.raises(ValueError, match="collapse_only='yes'"):
        make(model, collapse_only="yes")


def test_replay_batch_size_rotates_through_samples():
    model, batches = mlp(), mlp_batches()
    curv = make(model, replay_batch_size=4, every=1)
    curv.consolidate(batches)
    s0, first = curv._replay_slice(0)
    s1, second = curv._replay_slice(0)
    s2, third = curv._replay_slice(0)
    assert (s0, s1, s2) == (0, 1, 0)
    assert first["x"].shape[0] == 4 and second["x"].shape[0] == 2
    assert torch.equal(first["x"], batches[0]["x"][:4])
    assert torch.equal(second["x"], batches[0]["x"][4:])
    assert torch.equal(third["x"], first["x"])


# ------------------------------------------------------------------ the toy two-task run


def bce(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(model(batch["x"]).squeeze(-1), batch["y"])


def logistic_tasks() -> tuple[dict, dict]:
    """Task 0: random labels (minimum near w = 0, where σ(1−σ) = ¼ is largest); task 1: labels
    separable along x₀, so training it grows w₀ and σ(1−σ) collapses on task 0's inputs:
    task 0's Hessian E[σ(1−σ) x xᵀ] flattens."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 0.3], dtype=torch.float64)
    x0 = torch.randn(64, 2, generator=g, dtype=torch.float64) * scale
    y0 = torch.randint(0, 2, (64,), generator=g).double()
    x1 = torch.randn(64, 2, generator=g, dtype=torch.float64) * scale
    return {"x": x0, "y": y0}, {"x": x1, "y": (x1[:, 0] > 0).double()}


def run_two_tasks(regularize: bool) -> tuple[float, float]:
    t0, t1 = logistic_tasks()
    torch.manual_seed(0)
    model = nn.Linear(2, 1, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):  # task 0
        opt.zero_grad()
        bce(model, t0).backward()
        opt.step()
    lam0 = hessian_eigenvalues(model, t0, bce, k=1, tol=1e-10).values[0].item()
    curv = CurvatureRegularizer(model, strength=1.0, k=1, every=1, anchor_weight=0.0,
                                preservation_weight=10.0, replay_batch_size=None, tol=1e-10,
                                dtype=torch.float64, curvature="hessian", replay_weight=0.0,
                                replay_samples=64)
    curv.consolidate(t0, loss_fn=bce)
    for _ in range(100):  # task 1
        opt.zero_grad()
        loss = bce(model, t1) + (curv() if regularize else 0.0)
        loss.backward()
        opt.step()
    lam = hessian_eigenvalues(model, t0, bce, k=1, tol=1e-10).values[0].item()
    assert curv.drift()[0].rayleigh.item() <= lam * (1 + 1e-9)  # Rayleigh quotient ≤ λ_max
    return lam0, lam


def test_regularizer_keeps_task0_curvature_plain_training_flattens_it():
    lam0, lam_plain = run_two_tasks(regularize=False)
    lam0_again, lam_reg = run_two_tasks(regularize=True)
    assert lam0 == lam0_again  # deterministic
    assert lam_plain < 0.5 * lam0  # plain training flattens task 0's landscape
    assert abs(lam_reg - lam0) <= 0.2 * lam0  # the regularizer keeps it within 20%


# ------------------------------------------------------------------ state and errors


def test_state_dict_round_trip_and_multiple_tasks():
    model = mlp()
    curv = make(model, replay_batch_size=3)
    curv.consolidate(mlp_batches(1))
    perturb(model, seed=1)
    curv.consolidate(mlp_batches(2))
    assert curv.num_tasks == 2
    perturb(model, seed=2)
    curv()  # advance the step counter and replay cursor
    buf = io.BytesIO()
    torch.save(curv.state_dict(), buf)
    buf.seek(0)
    fresh = make(mlp(), replay_batch_size=3)
    object.__setattr__(fresh, "_model", model)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert not any(k.startswith("_model") for k in curv.state_dict())
    for step in range(3):
        assert torch.equal(fresh().detach(), curv().detach()), step
    total = curv.anchor_term()
    assert torch.allclose(total, sum(curv._anchor_term(t, list(model.parameters())) for t in (0, 1)))


def test_zero_before_consolidate_supports_backward():
    pen = make(mlp())()
    assert pen.item() == 0.0
    pen.backward()


def test_non_positive_eigenvalues_dropped_or_rejected():
    model, batches = mlp(), mlp_batches()
    curv = make(model, k=3)

    def concave(m: nn.Module, b: dict) -> torch.Tensor:  # H = -2 I
        return -sum((p**2).sum() for p in m.parameters())

    with pytest.raises(ValueError, match="no positive Hessian eigenvalue"):
        curv.consolidate(batches, loss_fn=concave)
    assert curv.num_tasks == 0

    def mixed(m: nn.Module, b: dict) -> torch.Tensor:  # eigenvalues 100, 0 (many), -10 (many)
        return -5.0 * (m[2].weight ** 2).sum() + 50.0 * (m[2].bias[0] ** 2)

    with pytest.warns(UserWarning, match="dropping non-positive"):
        curv.consolidate(batches, loss_fn=mixed)
    assert curv.eigenvalues().tolist() == pytest.approx([100.0])
    assert curv.eigenvectors()[0]["2.bias"].abs()[0].item() == pytest.approx(1.0)


def test_errors():
    model, batches = mlp(), mlp_batches()
    curv = make(model)
    with pytest.raises(ValueError, match="no batches"):
        curv.consolidate([])
    with pytest.raises(ValueError, match="non-finite"):
        curv.consolidate(batches, loss_fn=lambda m, b: mlp_loss(m, b) * float("inf"))
    curv.consolidate(batches)
    model[2] = nn.Linear(6, 5).double()
    with pytest.raises(StateMismatchError, match=r"2\.weight"):
        curv()
    for bad, match in [
        (dict(k=0), "k=0"),
        (dict(every=0), "every=0"),
        (dict(strength=-1.0), "strength=-1.0"),
        (dict(replay_samples=-1), "replay_samples=-1"),
        (dict(replay_weight=float("nan")), "replay_weight=nan"),
        (dict(curvature="fisher"), "curvature='fisher'"),
        (dict(replay_batch_size=0), "replay_batch_size=0"),
        (dict(method="qr"), "method='qr'"),
    ]:
        with pytest.raises(ValueError, match=match):
            CurvatureConfig(**bad)


def test_consolidate_and_penalty_leave_grad_and_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.3), nn.Tanh(), nn.Linear(6, 3)).double()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0)
    grads = [p.grad for p in model.parameters()]
    curv = make(model)
    curv.consolidate(mlp_batches())
    curv.drift()
    assert all(m.training for m in model.modules())
    assert all(p.grad is g and bool((g == 2).all()) for p, g in zip(model.parameters(), grads))
    pen = curv()  # computes the preservation term in eval mode, restores train mode
    assert all(m.training for m in model.modules())
    pen.backward()
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))  # accumulated in place


# ------------------------------------------------------------------ the KL replay term, storage, drift


def mlp_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["x"])


def make_kl(model: nn.Module, **kw) -> CurvatureRegularizer:
    base = dict(k=2, tol=1e-10, dtype=torch.float64, loss_fn=mlp_loss, logits_fn=mlp_logits,
                replay_samples=8, replay_batch_size=4)
    base.update(kw)
    return CurvatureRegularizer(model, **base)


def test_kl_term_is_the_formula_on_rotating_slices_and_zero_at_theta_star():
    model, batches = mlp(), mlp_batches()
    curv = make_kl(model, anchor_weight=0.0)
    curv.consolidate(batches)
    # replay memory: the first 8 samples (batch 0, and 2 samples of batch 1); each stored batch
    # cut into slices of 4: rows [0:4], [4:6], [6:8]
    x = torch.cat([batches[0]["x"], batches[1]["x"][:2]])
    bounds = [(0, 4), (4, 6), (6, 8)]
    with torch.no_grad():
        teacher = F.log_softmax(model(x), -1)
    assert float(curv()) == pytest.approx(0.0, abs=1e-12)  # at θ*
    perturb(model, scale=0.3)
    for step in range(4):  # slices 1, 2, 0, 1 (the call above took slice 0)
        rows = slice(*bounds[(step + 1) % 3])
        logp = F.log_softmax(model(x[rows]), -1)
        ref = curv.config.replay_weight * (teacher[rows].exp() * (teacher[rows] - logp)).sum(-1).mean()
        pen = curv()
        torch.testing.assert_close(pen, ref)
        params = list(model.parameters())
        for a, b in zip(torch.autograd.grad(pen, params), torch.autograd.grad(ref, params)):
            torch.testing.assert_close(a, b)


def test_kl_term_needs_logits_and_says_how_nothing_stored():
    model, batches = mlp(), mlp_batches()
    curv = CurvatureRegularizer(model, loss_fn=mlp_loss, curvature="hessian")  # no logits_fn, dict of x/y
    with pytest.raises(ValueError, match="logits_fn=.*replay_weight=0"):
        curv.consolidate(batches)
    assert curv.num_tasks == 0 and not list(curv.buffers())


def test_theta_star_and_eigenvectors_are_stored_once():
    # issue 15 item 10: the flat cache duplicated θ* and the eigenvectors
    model, batches = mlp(), mlp_batches()
    curv = make_kl(model, k=3)
    curv.consolidate(batches)
    n = sum(p.numel() for p in model.parameters())
    anchor_bytes = sum(b.numel() for name, b in curv.named_buffers() if "anchor" in name)
    vector_bytes = sum(b.numel() for name, b in curv.named_buffers() if "vectors" in name)
    assert (anchor_bytes, vector_bytes) == (n, 3 * n)
    perturb(model)
    curv()  # the penalty adds no cache
    storages = {b.untyped_storage().data_ptr() for b in curv.buffers()}
    assert len(storages) == len(list(curv.buffers()))
    assert not [k for k, v in vars(curv).items() if isinstance(v, dict) and any(isinstance(x, tuple) for x in v.values())]
    flat = curv._buffers["t0__anchor"]
    views = curv.anchor()
    assert all(v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for v in views.values())
    for name, p in model.named_parameters():
        assert views[name].shape == p.shape


def test_a_version_1_state_loads_into_the_flat_layout():
    from mitigate._utils import buffer_key

    model, batches = mlp(), mlp_batches()
    curv = make(model)
    curv.consolidate(batches)
    perturb(model)
    expected = curv().detach()
    sd = curv.state_dict()
    old = {k: v for k, v in sd.items() if not (k.startswith("t0__anchor") or k.startswith("t0__vectors"))}
    names = list(dict(model.named_parameters()))
    for name, t in curv.anchor().items():
        old[buffer_key("t0__anchor__", name)] = t.clone()
    vecs = curv.eigenvectors()
    for name in names:
        old[buffer_key("t0__vectors__", name)] = torch.stack([v[name] for v in vecs]).clone()
    extra = dict(sd["_extra_state"])
    extra["version"] = 1
    extra["tasks"] = [{k: v for k, v in t.items() if k not in ("slice", "teachers")} for t in extra["tasks"]]
    old["_extra_state"] = extra
    del old["t0__reference"]
    fresh = make(model)
    fresh.load_state_dict(old)
    fresh._step = 0
    torch.testing.assert_close(fresh().detach(), expected)
    assert "t0__reference" in dict(fresh.named_buffers())


def test_drift_reports_the_true_current_top_eigenvalue_not_the_stale_rayleigh_quotient():
    model, batches = mlp(), mlp_batches()
    curv = make_kl(model, k=1, curvature="hessian", replay_samples=12)
    curv.consolidate(batches)
    perturb(model, scale=0.5)
    d = curv.drift()[0]
    true = hessian_eigenvalues(model, batches, mlp_loss, k=1, tol=1e-12).values
    torch.testing.assert_close(d.current, true, rtol=1e-6, atol=0)
    torch.testing.assert_close(d.ratio, true / curv.eigenvalues().cpu(), rtol=1e-6, atol=0)
    assert float(d.rayleigh[0]) < float(true[0]) * (1 - 1e-3)  # the stale vector underestimates it


def _lm_task(seed: int, length: int, rows: int = 8) -> list[dict]:
    """Batches of a causal-LM task whose rows have ``length`` tokens, the last 2 supervised, the
    last row right-padded by 2 (``attention_mask`` 0, ``labels`` -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 96, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    mask[-1, -2:], labels[-1, -2:] = 0, -100
    labels[-1, -4:-2] = ids[-1, -4:-2]
    return [{"input_ids": ids[:4], "attention_mask": mask[:4], "labels": labels[:4]},
            {"input_ids": ids[4:], "attention_mask": mask[4:], "labels": labels[4:]}]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kl_terms_of_several_tasks_come_from_one_forward_and_equal_one_forward_each(arch):
    from tiny_models import build

    model = build(arch).train()
    curv = CurvatureRegularizer(model, replay_samples=8, replay_batch_size=4, anchor_weight=0.0)
    tasks = [_lm_task(1, 7), _lm_task(2, 11), _lm_task(3, 5)]  # three lengths: padded when stacked
    for batches in tasks:
        curv.consolidate(batches)
        perturb(model, scale=0.02, seed=len(batches) + curv.num_tasks)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        for step in range(3):  # slices 0, 1, 0 of every task
            calls.clear()
            pen = curv()
            assert len(calls) == 1  # one forward for the three tasks' KL terms
            ref = sum(curv._kl_term(t, step) for t in range(3))  # one forward per task
            torch.testing.assert_close(pen, ref * curv.config.replay_weight, rtol=1e-5, atol=1e-7)
            params = [p for p in model.parameters() if p.requires_grad]
            for a, b in zip(torch.autograd.grad(pen, params, allow_unused=True),
                            torch.autograd.grad(ref, params, allow_unused=True)):
                if a is None or b is None:
                    assert a is None and b is None
                    continue
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    finally:
        hook.remove()
    assert model.training  # eval mode for the replay forward, restored after


def test_stack_padded_pads_right_and_refuses_what_it_cannot_hide():
    from mitigate.regularizers.curvature import _stack_padded

    a = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "labels": torch.tensor([[-100, 6, 7]])}
    b = {"input_ids": torch.tensor([[8, 9], [3, 4]]), "attention_mask": torch.ones(2, 2, dtype=torch.long),
         "labels": torch.tensor([[-100, 9], [-100, 4]])}
    out = _stack_padded([a, b])
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0], [3, 4, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100], [-100, 4, -100]]
    no_mask = [{k: v for k, v in x.items() if k != "attention_mask"} for x in (a, b)]
    assert _stack_padded(no_mask) is None  # unequal lengths and nothing to hide the padding
    assert _stack_padded([no_mask[1], no_mask[1]])["input_ids"].shape == (4, 2)  # equal lengths stack
    assert _stack_padded([a, {**b, "position_ids": b["input_ids"]}]) is None  # another key
    assert _stack_padded([(a["input_ids"],), (b["input_ids"],)]) is None  # not dicts


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_with_replay_reads_the_kl_off_one_forward_and_keeps_the_task_loss(arch):
    from tiny_models import build

    model = build(arch).eval()  # dropout off: with_replay's rows run in the model's own mode
    curv = CurvatureRegularizer(model, replay_samples=8, replay_batch_size=4)
    for seed, length in ((1, 7), (2, 11)):
        curv.consolidate(_lm_task(seed, length))
        perturb(model, scale=0.02, seed=seed)
    twin = CurvatureRegularizer(model, replay_samples=8, replay_batch_size=4)
    twin.load_state_dict(curv.state_dict())
    task = {k: v for k, v in _lm_task(9, 9)[0].items() if k != "attention_mask"}  # no mask: one is added
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(3):
        big = curv.with_replay(task)
        assert big["input_ids"].shape == (4 + 4 + 4, 11)  # the task's rows, then 4 rows of each task
        assert (big["labels"][4:] == -100).all() and big["attention_mask"][:4, 9:].sum() == 0
        out = model(**big)
        torch.testing.assert_close(out.loss, model(**task).loss, rtol=1e-5, atol=1e-6)  # task loss alone
        pen = curv(outputs=out)
        ref = twin()  # the separate pass (eval mode; these models have no dropout)
        torch.testing.assert_close(pen, ref, rtol=1e-5, atol=1e-7)
        for a, b in zip(torch.autograd.grad(pen, params, allow_unused=True),
                        torch.autograd.grad(ref, params, allow_unused=True)):
            if a is not None or b is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # misuse is named, and clears the step
    with pytest.raises(ValueError, match="call batch = reg.with_replay"):
        curv(outputs=model(**task))
    curv.with_replay(task)
    with pytest.raises(ValueError, match="pass the model's output on it"):
        curv()
    curv.with_replay(task)
    with pytest.raises(ValueError, match=r"expected \(B, T\) = \(12, 11\)"):
        curv(outputs=model(**task))
    with pytest.raises(ValueError, match="input_ids and labels"):
        curv.with_replay({"input_ids": task["input_ids"]})
    assert CurvatureRegularizer(model).with_replay(task) is task  # nothing stored: the batch itself


def test_with_replay_without_a_teacher_is_the_plain_loop():
    from tiny_models import build

    model = build("llama").eval()
    curv = CurvatureRegularizer(model, replay_samples=0)  # no replay memory: no KL teacher
    curv.consolidate(_lm_task(1, 7))
    perturb(model, scale=0.02)
    task = _lm_task(9, 9)[0]
    assert curv.with_replay(task) is task
    pen = curv(outputs=model(**task))  # the anchor alone, no error
    twin = CurvatureRegularizer(model, replay_samples=0)
    twin.load_state_dict(curv.state_dict())
    torch.testing.assert_close(pen, twin())
    assert float(pen) > 0
