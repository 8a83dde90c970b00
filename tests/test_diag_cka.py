"""Linear CKA against an independent Gram-matrix HSIC reference, its invariances, the unbiased
estimator against the naive U-statistic, and streaming layer-wise CKA against batch CKA."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import VOCAB, build

from mitigate.diagnostics import layerwise_cka, linear_cka

torch.set_num_threads(1)


def ref_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Biased CKA as HSIC ratio with the centring matrix H = I − 11ᵀ/n (Gretton et al. 2005)."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h) / (n - 1) ** 2

    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def naive_unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> float:
    """HSIC as the U-statistic over ordered 4-tuples of distinct indices (Song et al. 2012):
    mean of k_ij l_ij + k_ij l_qr − 2 k_ij l_iq."""
    n = k.shape[0]
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += float(k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q])
        count += 1
    return total / count


def _xy(n: int, d1: int, d2: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g)
    y = x[:, :1] * torch.randn(1, d2, generator=g) + 0.7 * torch.randn(n, d2, generator=g)
    return x, y


@pytest.mark.parametrize("n,d1,d2", [(40, 5, 7), (6, 30, 20), (12, 12, 3)])
def test_biased_matches_gram_reference(n, d1, d2):
    x, y = _xy(n, d1, d2)
    got = linear_cka(x, y)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert float(got) == pytest.approx(ref_cka(x, y), rel=1e-10)


def test_float32_input_is_computed_in_float64():
    x, y = _xy(30, 4, 4, seed=3)
    x = x + 1e4  # large offset: centring in float32 would lose digits
    exact = ref_cka(x.double() - 1e4, y.double())  # exact shift of the same float32 values
    assert float(linear_cka(x, y)) == pytest.approx(exact, rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(5, 30), d=st.integers(2, 12), scale=st.floats(0.01, 100.0))
def test_invariances(seed, n, d, scale):
    x, y = (t.double() for t in _xy(n, d, d + 1, seed))  # float64 so transforms add no rounding
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64))
    base = float(linear_cka(x, y))
    assert float(linear_cka(x @ q, y)) == pytest.approx(base, abs=1e-9)  # orthogonal transform
    assert float(linear_cka(scale * x, y)) == pytest.approx(base, abs=1e-9)  # isotropic scaling
    assert float(linear_cka(x + 3.0, y)) == pytest.approx(base, abs=1e-9)  # centring
    assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(linear_cka(y, x)) == pytest.approx(base, abs=1e-12)  # symmetric
    assert 0.0 <= base <= 1.0 + 1e-12
    # not invariant to a non-isotropic scaling of one feature
    if d >= 2:
        s = torch.ones(d)
        s[0] = 50.0
        assert float(linear_cka(x * s, y)) != pytest.approx(base, abs=1e-6)


@pytest.mark.parametrize("n", [5, 7])
def test_unbiased_matches_naive_u_statistic(n):
    x, y = _xy(n, 3, 4, seed=n)
    xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    k, l = xc @ xc.T, yc @ yc.T
    expected = naive_unbiased_hsic(k, l) / (naive_unbiased_hsic(k, k) * naive_unbiased_hsic(l, l)) ** 0.5
    assert float(linear_cka(x, y, unbiased=True)) == pytest.approx(expected, rel=1e-9)
    assert float(linear_cka(x, x, unbiased=True)) == pytest.approx(1.0, abs=1e-12)


def test_unbiased_removes_high_dimension_bias():
    # independent features with d >> n: biased CKA is far from 0, unbiased is near 0
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 500, generator=g), torch.randn(50, 500, generator=g)
    assert float(linear_cka(x, y)) > 0.5
    assert abs(float(linear_cka(x, y, unbiased=True))) < 0.05


def test_input_validation():
    with pytest.raises(ValueError, match="unbiased"):
        linear_cka(torch.randn(3, 2), torch.randn(3, 2), unbiased=True)
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(torch.randn(4, 2), torch.randn(5, 2))
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(torch.randn(2, 4, 2), torch.randn(2, 4, 2))


# ----------------------------------------------------------------------------- streaming


def _batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, t in ((3, 9), (2, 6)):
        ids = torch.randint(2, VOCAB, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t - 3 :] = 0  # right padding
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids})
    return out


def _tokens(model, batches, layer):
    rows = []
    with torch.no_grad():
        for b in batches:
            hs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states
            rows.append(hs[layer][b["attention_mask"].bool()])
    return torch.cat(rows)


def test_streaming_equals_batch_cka_on_concatenated_tokens():
    a, b = build("llama", seed=0), build("llama", seed=1)
    batches = _batches()
    res = layerwise_cka(a, b, batches)
    assert res.per_layer.shape == (3,) and res.layers == [0, 1, 2]
    assert res.n_tokens == int(sum(x["attention_mask"].sum() for x in batches))
    for i in res.layers:
        expected = linear_cka(_tokens(a, batches, i), _tokens(b, batches, i))
        assert float(res.per_layer[i]) == pytest.approx(float(expected), rel=1e-9)
    # same model twice: 1 everywhere; subset of layers
    same = layerwise_cka(a, a, batches, layers=[-1, 1])
    assert same.layers == [2, 1]
    torch.testing.assert_close(same.per_layer, torch.ones(2, dtype=torch.float64))


def test_token_norm_is_cka_of_rms_normalised_tokens_and_defuses_one_massive_token():
    a, b = build("llama", seed=0), build("llama", seed=1)
    batches = _batches()

    def rms(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return x / x.pow(2).mean(-1, keepdim=True).sqrt()

    res = layerwise_cka(a, b, batches, token_norm=True)
    for i in res.layers:
        expected = linear_cka(rms(_tokens(a, batches, i)), rms(_tokens(b, batches, i)))
        assert float(res.per_layer[i]) == pytest.approx(float(expected), rel=1e-9)
    # one "massive activation" token (1e4 × the others, same direction in both models) makes
    # plain linear CKA read ~1 between unrelated representations; per-token RMS undoes it
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 16, generator=g, dtype=torch.float64), torch.randn(40, 16, generator=g, dtype=torch.float64)
    spike = torch.zeros(16, dtype=torch.float64)
    spike[0] = 1e4
    x[0] += spike
    y[0] += spike
    assert float(linear_cka(x, y)) > 0.99
    assert float(linear_cka(rms(x), rms(y))) < 0.6


def test_streaming_ignores_padding_and_batching():
    a, b = build("gpt2", seed=0), build("gpt2", seed=1)
    batches = _batches(1)
    base = layerwise_cka(a, b, batches).per_layer
    # change the token ids under padding: masked positions must not count
    noisy = [dict(x) for x in batches]
    ids = noisy[0]["input_ids"].clone()
    ids[0, -3:] = 5
    noisy[0]["input_ids"] = ids
    torch.testing.assert_close(layerwise_cka(a, b, noisy).per_layer, base, rtol=1e-12, atol=1e-12)
    # one example per batch gives the same statistics
    split = [
        {k: v[i : i + 1] for k, v in x.items()} for x in batches for i in range(x["input_ids"].shape[0])
    ]
    # The CKA sums are float64, but the features are float32 forwards, and a batch of one runs
    # other GEMM kernels (other summation orders) than a batch of four: each feature may differ by
    # a few units of float32 roundoff u = 2**-24 ≈ 6e-8, and CKA (a ratio of sums of products of
    # four features) moves by at most a small multiple of that, on any machine and thread count.
    # Counting a padded token would move it by ~1e-2.
    u32 = 2.0**-24
    torch.testing.assert_close(layerwise_cka(a, b, split).per_layer, base, rtol=16 * u32, atol=1e-12)


def test_streaming_restores_mode_and_grads():
    a, b = build("llama", seed=0), build("llama", seed=1)
    a.train()
    p = next(a.parameters())
    p.grad = torch.full_like(p, 3.0)
    layerwise_cka(a, b, _batches())
    assert a.training and all(m.training for m in a.modules())
    assert torch.equal(p.grad, torch.full_like(p, 3.0))


def _massive(model: torch.nn.Module, token: int = 1, scale: float = 1e3) -> torch.nn.Module:
    """``model`` with a massive-activation token: its embedding row scaled by ``scale`` (the
    residual stream carries it through every block, as in pretrained LLMs' first token)."""
    with torch.no_grad():
        model.get_input_embeddings().weight[token] *= scale
    return model


def test_outlier_share_is_the_squared_norm_of_tokens_beyond_ten_medians():
    from mitigate.diagnostics.cka import outlier_share

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    x[3] *= 40.0  # one outlier: ≥ 10× the median norm
    norms = x.norm(dim=1)
    big = norms >= 10 * norms.median()
    assert big.tolist().count(True) == 1
    o, t = outlier_share(x)
    assert o == pytest.approx(float(norms[big].square().sum()), rel=1e-12)
    assert t == pytest.approx(float(norms.square().sum()), rel=1e-12)
    assert outlier_share(torch.randn(50, 8, generator=g))[0] == 0.0  # Gaussian rows: no outlier


def test_saturation_rule_flags_plain_cka_on_massive_activations_and_token_norm_clears_it():
    import warnings

    batches = _batches()
    for b in batches:  # the massive token first in every row, as a BOS token
        b["input_ids"][:, 0] = 1
    a, b = build("llama", seed=0), build("llama", seed=1)
    with warnings.catch_warnings():  # ordinary models: no outlier tokens, no warning
        warnings.simplefilter("error")
        res = layerwise_cka(a, b, batches)
    assert res.saturated_layers == [] and float(res.outlier_share.max()) < 0.5
    b.load_state_dict(a.state_dict())
    with torch.no_grad():  # b: the same model with every block's weights perturbed
        for n, p in b.named_parameters():
            if "layers." in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    _massive(a), _massive(b)
    # the last hidden state is after the final RMSNorm (every token rescaled): not saturated
    with pytest.warns(UserWarning, match=r"plain CKA saturates on 2 of 3 hidden states \[0, 1\].*token_norm=True"):
        plain = layerwise_cka(a, b, batches)
    assert plain.saturated_layers == [0, 1] and float(plain.outlier_share[:2].min()) >= 0.5 > float(plain.outlier_share[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normed = layerwise_cka(a, b, batches, token_norm=True)
    assert normed.saturated_layers == []
    # what the rule protects against: plain CKA reads ≈ 1 on the perturbed blocks, the
    # token-normalised CKA sees the change
    assert float(plain.per_layer[1]) > 0.99
    assert float(normed.per_layer[1]) < float(plain.per_layer[1]) - 0.05
