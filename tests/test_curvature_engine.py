"""Curvature engine (mitigate.curvature): HVPs, Lanczos / power eigenpairs and Hutchinson traces
against explicit Hessians of tiny models (float64), determinism, side effects, kernel errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mitigate.curvature import (
    EigenResult,
    TraceResult,
    differentiable_hvp,
    hessian_eigenvalues,
    hutchinson_trace,
    hvp,
    make_loss_of_params,
)
from mitigate.errors import AttentionKernelError

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------ tiny models


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def mlp_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


def mlp_batches() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(14, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (14,), generator=g)
    return [{"x": x[:9], "y": y[:9]}, {"x": x[9:], "y": y[9:]}]  # unequal sizes: weighted mean


def tiny_llama(attn: str = "eager", tie: bool = True) -> nn.Module:
    cfg = transformers.AutoConfig.for_model(
        "llama", hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=16, max_position_embeddings=16, tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).double()


# Llama's RMSNorm computes in float32 even for float64 inputs, so two exact differentiation paths
# agree to ~1e-6 relative only
LLAMA_RTOL, LLAMA_ATOL = 1e-4, 1e-6


def lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    # float64 end to end (HF's own loss upcasts logits to float32 only)
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))


def lm_batches() -> list[dict]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 16, (5, 6), generator=g)
    return [{"input_ids": ids[:3]}, {"input_ids": ids[3:]}]


def explicit_hessian(model: nn.Module, batches: list[dict], loss_fn, names: list[str]) -> torch.Tensor:
    """Σ n_b H_b / Σ n_b over the flattened selected parameters (autograd.functional.hessian)."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(flat: torch.Tensor) -> torch.Tensor:
        d, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            d[n] = flat[i : i + k].view(s)
            i += k
        total = sum(b[next(iter(b))].shape[0] for b in batches)
        return sum(
            loss_fn(_Reparam(model, d), b) * b[next(iter(b))].shape[0] for b in batches
        ) / total

    return torch.autograd.functional.hessian(f, flat0, vectorize=True)


class _Reparam(nn.Module):
    """Calls ``model`` with some parameters replaced (for the explicit Hessian)."""

    def __init__(self, model: nn.Module, params: dict) -> None:
        super().__init__()
        self.model, self.params = model, params

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.params, args, kwargs)


def names_of(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------ HVP


def test_hvp_matches_explicit_hessian_mlp_all_vector_forms():
    model, batches = mlp(), mlp_batches()
    names = names_of(model)
    H = explicit_hessian(model, batches, mlp_loss, names)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = H @ v
    flat = hvp(model, batches, v, mlp_loss)
    torch.testing.assert_close(flat, expected, rtol=1e-10, atol=1e-12)
    parts = list(torch.split(v, [p.numel() for p in model.parameters()]))
    as_list = [t.view_as(p) for t, p in zip(parts, model.parameters())]
    out_list = hvp(model, batches, as_list, mlp_loss)
    out_dict = hvp(model, batches, dict(zip(names, as_list)), mlp_loss)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in out_list]), expected)
    torch.testing.assert_close(torch.cat([out_dict[n].reshape(-1) for n in names]), expected)


def test_hvp_tiny_llama_tied_weights_matches_double_backward_and_explicit():
    model, batches = tiny_llama(tie=True), lm_batches()
    names = names_of(model)
    assert "lm_head.weight" not in names  # tied: listed once
    g = torch.Generator().manual_seed(4)
    v = {n: torch.randn(p.shape, dtype=p.dtype, generator=g) for n, p in model.named_parameters()}
    out = hvp(model, batches, v, lm_loss)
    # independent path: double backward on the live (really tied) parameters
    ps = list(model.parameters())
    total = 5
    ref = [torch.zeros_like(p) for p in ps]
    for b in batches:
        loss = lm_loss(model, b)
        grads = torch.autograd.grad(loss, ps, create_graph=True)
        hv = torch.autograd.grad(sum((gg * v[n]).sum() for gg, n in zip(grads, names)), ps)
        for r, h in zip(ref, hv):
            r.add_(h * b["input_ids"].shape[0] / total)
    for n, r in zip(names, ref):
        torch.testing.assert_close(out[n], r, rtol=LLAMA_RTOL, atol=LLAMA_ATOL)
    # and the explicit Hessian restricted to attention parameters
    sub = [n for n in names if "self_attn" in n]
    H = explicit_hessian(model, batches, lm_loss, sub)
    vs = torch.cat([v[n].reshape(-1) for n in sub])
    out_sub = hvp(model, batches, {n: v[n] for n in sub}, lm_loss, params=r".*self_attn\..*")
    torch.testing.assert_close(
        torch.cat([out_sub[n].reshape(-1) for n in sub]), H @ vs, rtol=LLAMA_RTOL, atol=LLAMA_ATOL
    )


def test_make_loss_of_params_is_pure_function():
    model, batches = mlp(), mlp_batches()
    f = make_loss_of_params(model, batches[0], mlp_loss, names_of(model))
    params = {n: p.detach() * 0 for n, p in model.named_parameters()}
    assert float(f(params)) == pytest.approx(float(torch.log(torch.tensor(3.0))))
    with pytest.raises(ValueError, match="differ"):
        f({"0.weight": params["0.weight"]})


# ------------------------------------------------------------------ eigenpairs


def test_lanczos_top_k_matches_explicit_eigen_decomposition():
    model, batches = mlp(), mlp_batches()
    H = explicit_hessian(model, batches, mlp_loss, names_of(model))
    evals, evecs = torch.linalg.eigh(H)
    res = hessian_eigenvalues(model, batches, mlp_loss, k=3, tol=1e-14)  # tight: vectors too
    assert isinstance(res, EigenResult) and res.converged
    torch.testing.assert_close(res.values, evals.flip(0)[:3], rtol=1e-8, atol=1e-10)
    assert torch.all(res.values[:-1] >= res.values[1:])
    V = res.flat_vectors()
    assert V.shape == (3, H.shape[0])
    torch.testing.assert_close(V.norm(dim=1), torch.ones(3, dtype=torch.float64))
    for i in range(3):  # eigenvector property, up to sign
        torch.testing.assert_close(H @ V[i], res.values[i] * V[i], rtol=1e-6, atol=1e-7)
    assert res.residual_norms.shape == (3,) and float(res.residual_norms.max()) < 1e-6
    assert not res.repeated and res.restarts == 0  # the deflated restart found nothing missed
    # without the restart the Krylov basis alone is bounded by the dimension
    first = hessian_eigenvalues(model, batches, mlp_loss, k=3, tol=1e-14, check_multiplicity=False)
    assert first.iterations <= H.shape[0] and first.iterations < res.iterations
    loose = hessian_eigenvalues(model, batches, mlp_loss, k=3, tol=1e-6)
    assert loose.iterations < res.iterations
    torch.testing.assert_close(loose.values, res.values, rtol=3e-6, atol=0)  # tol bounds the error


def test_lanczos_on_tiny_llama_matches_explicit_and_power_iteration():
    model, batches = tiny_llama(), lm_batches()
    sel = r".*self_attn\..*"
    names = [n for n in names_of(model) if "self_attn" in n]
    H = explicit_hessian(model, batches, lm_loss, names)
    evals = torch.linalg.eigvalsh(H)
    lz = hessian_eigenvalues(model, batches, lm_loss, k=2, params=sel, tol=1e-9, check_multiplicity=False)
    torch.testing.assert_close(lz.values, evals.flip(0)[:2], rtol=LLAMA_RTOL, atol=LLAMA_ATOL)
    # power iteration finds the eigenvalue of largest magnitude (here a negative one)
    dominant = evals[evals.abs().argmax()].item()
    pw = hessian_eigenvalues(model, batches, lm_loss, k=1, params=sel, method="power", tol=1e-6, max_iter=300)
    assert pw.values[0].item() == pytest.approx(dominant, rel=1e-3)
    v = pw.flat_vectors()[0]
    assert (H @ v - pw.values[0] * v).norm().item() < 0.05 * abs(dominant)
    assert pw.iterations > lz.iterations  # Lanczos needs fewer products


def test_lanczos_and_power_agree_mlp():
    model, batches = mlp(), mlp_batches()
    lz = hessian_eigenvalues(model, batches, mlp_loss, k=2, tol=1e-10)
    pw = hessian_eigenvalues(model, batches, mlp_loss, k=2, method="power", tol=1e-9, max_iter=1000)
    torch.testing.assert_close(pw.values, lz.values, rtol=1e-4, atol=1e-8)


def test_deterministic_under_seed_and_generator():
    model, batches = mlp(), mlp_batches()
    a = hessian_eigenvalues(model, batches, mlp_loss, k=2, seed=7)
    b = hessian_eigenvalues(model, batches, mlp_loss, k=2, seed=7)
    c = hessian_eigenvalues(model, batches, mlp_loss, k=2, generator=torch.Generator().manual_seed(7))
    for r in (b, c):
        assert torch.equal(a.values, r.values) and a.iterations == r.iterations
        for va, vr in zip(a.vectors, r.vectors):
            assert all(torch.equal(va[n], vr[n]) for n in va)
    t1 = hutchinson_trace(model, batches, mlp_loss, samples=5, seed=3)
    t2 = hutchinson_trace(model, batches, mlp_loss, samples=5, seed=3)
    t3 = hutchinson_trace(model, batches, mlp_loss, samples=5, seed=4)
    assert t1 == t2 and t1.value != t3.value


def test_hutchinson_trace_close_to_exact():
    model, batches = mlp(), mlp_batches()
    exact = torch.trace(explicit_hessian(model, batches, mlp_loss, names_of(model))).item()
    res = hutchinson_trace(model, batches, mlp_loss, samples=300, seed=0)
    assert isinstance(res, TraceResult) and res.samples == 300
    assert 0 < res.std_error < 0.1 * abs(exact)
    assert abs(res.value - exact) < 4 * res.std_error


# ------------------------------------------------------------------ side effects


def test_grad_and_train_mode_untouched_and_dropout_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).double()
    model.train()
    model[3].eval()  # a mixed state must come back as it was
    grads = [torch.full_like(p, 0.5) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    batches = mlp_batches()
    a = hessian_eigenvalues(model, batches, mlp_loss, k=1, tol=1e-8)
    b = hessian_eigenvalues(model, batches, mlp_loss, k=1, tol=1e-8)
    assert torch.equal(a.values, b.values)  # eval mode: dropout off, deterministic
    hutchinson_trace(model, batches, mlp_loss, samples=2)
    hvp(model, batches, [torch.ones_like(p) for p in model.parameters()], mlp_loss)
    assert [m.training for m in model.modules()] == [True, True, True, True, False]
    for p, g in zip(model.parameters(), grads):
        assert p.grad is g and bool((g == 0.5).all())


def test_differentiable_hvp_carries_graph():
    model, batches = mlp(), mlp_batches()
    ps = list(model.parameters())
    v = [torch.randn_like(p) for p in ps]
    (hv,) = differentiable_hvp(model, batches[0], [v], mlp_loss, ps)
    assert all(t.requires_grad for t in hv)
    ref = hvp(model, batches[0], v, mlp_loss)
    for a, b in zip(hv, ref):
        torch.testing.assert_close(a.detach(), b)


# ------------------------------------------------------------------ kernels and errors


def test_sdpa_model_raises_attention_kernel_error():
    model = tiny_llama(attn="sdpa")
    with pytest.raises(AttentionKernelError, match="eager"):
        hessian_eigenvalues(model, lm_batches(), lm_loss)


def test_sdpa_behind_peft_raises():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_llama(attn="sdpa"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    with pytest.raises(AttentionKernelError, match="attn_implementation"):
        hvp(model, lm_batches(), [torch.ones_like(p) for p in model.parameters() if p.requires_grad], lm_loss)


class _RawSDPA(nn.Module):
    """No HF config: the failure only shows up as a double-backward RuntimeError."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj(x).view(x.shape[0], x.shape[1], 3, 2, 4).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.sum()


def test_double_backward_failure_reraised_as_attention_kernel_error():
    model = _RawSDPA()
    batch = {"x": torch.randn(2, 5, 8)}
    with pytest.raises(AttentionKernelError, match="eager"):
        hessian_eigenvalues(model, batch, lambda m, b: m(b["x"]) ** 2, k=1)


def test_bad_arguments():
    model, batches = mlp(), mlp_batches()
    with pytest.raises(ValueError, match="no batches"):
        hessian_eigenvalues(model, [], mlp_loss)
    with pytest.raises(ValueError, match="k=0"):
        hessian_eigenvalues(model, batches, mlp_loss, k=0)
    with pytest.raises(ValueError, match="method="):
        hessian_eigenvalues(model, batches, mlp_loss, method="arnoldi")
    with pytest.raises(ValueError, match="matches no trainable"):
        hessian_eigenvalues(model, batches, mlp_loss, params="nothing")
    with pytest.raises(ValueError, match="shape"):
        hvp(model, batches, torch.ones(3, dtype=torch.float64), mlp_loss)


# ------------------------------------------------------------------ GGN, Hutch++, repeated eigenvalues, float16


class _Quadratic(nn.Module):
    """``L(θ) = ½ θᵀ A θ``: the Hessian is the explicit matrix ``A``."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = a
        self.theta = nn.Parameter(torch.randn(a.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(4)))


def quadratic_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return 0.5 * model.theta @ (model.a @ model.theta)


def with_spectrum(spectrum: list[float], seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(len(spectrum), len(spectrum), generator=g, dtype=torch.float64))[0]
    return _Quadratic(q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ q.T)


def explicit_ggn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Jᵀ H_out J with H_out = ⊕ (diag p − ppᵀ)/N, from the explicit Jacobian of the logits."""
    names = names_of(model)
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def z(flat: torch.Tensor) -> torch.Tensor:
        d, i = {}, 0
        for n, s in zip(names, shapes):
            d[n] = flat[i : i + s.numel()].view(s)
            i += s.numel()
        return functional_call(model, d, (x,))

    logits = z(flat0)
    n, c = logits.shape
    jac = torch.autograd.functional.jacobian(z, flat0).reshape(n * c, -1)
    p = torch.softmax(logits, -1)
    h_out = torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p]) / n
    return jac.T @ h_out @ jac


def mlp_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["x"])


def test_ggn_operator_matches_explicit_jt_hout_j_and_is_psd():
    from mitigate.curvature import GGNOperator

    model, batches = mlp(), mlp_batches()
    sizes = [b["x"].shape[0] for b in batches]
    G = sum(s * explicit_ggn(model, b["x"]) for s, b in zip(sizes, batches)) / sum(sizes)
    op = GGNOperator(model, batches, mlp_logits)
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(op.matvec(v), G @ v, rtol=1e-10, atol=1e-13)
    evals = torch.linalg.eigvalsh(G)
    assert float(evals.min()) > -1e-12  # PSD, unlike the Hessian of this model:
    assert float(torch.linalg.eigvalsh(explicit_hessian(model, batches, mlp_loss, names_of(model))).min()) < -1e-3
    res = hessian_eigenvalues(model, batches, curvature="ggn", logits_fn=mlp_logits, k=3, tol=1e-10)
    torch.testing.assert_close(res.values, evals.flip(0)[:3], rtol=1e-8, atol=1e-12)


def test_ggn_of_a_causal_lm_uses_the_supervised_positions():
    # the default logits_fn: the positions whose shifted label is not -100, as ForCausalLMLoss
    from mitigate.curvature import GGNOperator, supervised_logits

    model = tiny_llama()
    ids = torch.randint(0, 16, (3, 6), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels}
    z = supervised_logits(model, batch)
    assert z.shape == (3 * 2, 16)  # labels at positions 4, 5 -> logits at 3, 4
    torch.testing.assert_close(z, model(input_ids=ids).logits[:, 3:5].reshape(-1, 16))
    op = GGNOperator(model, batch)
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    ref = GGNOperator(model, batch, lambda m, b: m(input_ids=b["input_ids"]).logits[:, 3:5].reshape(-1, 16))
    torch.testing.assert_close(op.matvec(v), ref.matvec(v), rtol=1e-10, atol=1e-14)


def test_repeated_top_eigenvalue_is_found_and_reported():
    # spectrum [5, 5, 3, 2, ...]: one Krylov space holds one direction per distinct eigenvalue,
    # plain Lanczos returns [5, 3, 2] and calls it converged
    model = with_spectrum([5, 5, 3, 2, 1, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01])
    plain = hessian_eigenvalues(model, {"x": torch.zeros(1)}, quadratic_loss, k=3, tol=1e-9, check_multiplicity=False)
    torch.testing.assert_close(plain.values, torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64))
    assert plain.converged and not plain.repeated
    res = hessian_eigenvalues(model, {"x": torch.zeros(1)}, quadratic_loss, k=3, tol=1e-9)
    torch.testing.assert_close(res.values, torch.tensor([5.0, 5.0, 3.0], dtype=torch.float64), rtol=1e-7, atol=0)
    assert res.repeated and res.restarts == 1
    vecs = res.flat_vectors()
    torch.testing.assert_close(vecs @ vecs.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-6)
    a = model.a
    for lam, v in zip(res.values, vecs):  # true eigenpairs
        assert float((a @ v - lam * v).norm()) < 1e-3
    top = hessian_eigenvalues(model, {"x": torch.zeros(1)}, quadratic_loss, k=1, tol=1e-9)
    assert top.repeated and top.restarts == 0  # λ_1 = 5 is repeated beyond k = 1
    distinct = hessian_eigenvalues(with_spectrum([5, 4, 3, 2, 1, 0.5]), {"x": torch.zeros(1)}, quadratic_loss,
                                   k=2, tol=1e-9)
    assert not distinct.repeated and distinct.restarts == 0


def test_hutchpp_is_far_closer_than_hutchinson_at_the_same_budget():
    from mitigate.curvature import hutchpp_trace

    # decaying spectrum (what an LM's curvature looks like): the top dominates the variance
    spectrum = [100.0 / (i + 1) ** 1.5 for i in range(60)]
    model = with_spectrum(spectrum, seed=2)
    exact = sum(spectrum)
    batch = {"x": torch.zeros(1)}
    hpp = [abs(hutchpp_trace(model, batch, quadratic_loss, samples=30, seed=s).value - exact) / exact for s in range(5)]
    hut = [abs(hutchinson_trace(model, batch, quadratic_loss, samples=30, seed=s).value - exact) / exact for s in range(5)]
    assert sum(hpp) < 0.25 * sum(hut)
    full = hutchpp_trace(model, batch, quadratic_loss, samples=180)  # Q spans everything: exact
    assert full.value == pytest.approx(exact, rel=1e-9)
    with pytest.raises(ValueError, match="samples=2"):
        hutchpp_trace(model, batch, quadratic_loss, samples=2)


# weights ×30 in float16: the loss (≈ 69) is finite, every Hessian-vector product entry overflows
SCALE_FP16 = 30.0


def test_float16_non_finite_products_raise_a_clear_error():
    model = tiny_llama().float()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(SCALE_FP16)
    model = model.half()
    batch = {"input_ids": torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(1))}
    batch["labels"] = batch["input_ids"]
    assert torch.isfinite(model(**batch).loss)  # the loss itself is fine...
    with pytest.raises(ValueError, match=r"non-finite Hessian-vector product.*float16.*float32 or bfloat16"):
        hessian_eigenvalues(model, batch, k=1, max_iter=5)  # ...its curvature overflows


def test_shifted_label_positions_index_the_logits_a_causal_lm_loss_supervises():
    from mitigate.curvature import shifted_label_positions

    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100], [-100, -100, -100, -100]])
    # row-major over logits[:, :-1] (3 columns a row): row 0 at 1, 2; row 1 at 0
    assert shifted_label_positions(labels).tolist() == [1, 2, 3]
    logits = torch.randn(3, 4, 11)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    picked = logits[:, :-1].reshape(-1, 11)[shifted_label_positions(labels)]
    torch.testing.assert_close(torch.nn.functional.cross_entropy(picked, torch.tensor([7, 8, 5])), ce)
