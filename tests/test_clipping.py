"""GradientClipping: clip_grad_norm_ semantics, counters, state, faults, integrations."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mitigate


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def backward(model: nn.Module, seed: int, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    (scale * ((model(x) - y) ** 2).mean()).backward()


@settings(max_examples=25, deadline=None)
@given(
    st.floats(1e-3, 10.0),
    st.sampled_from([1.0, 2.0, 3.0, float("inf")]),
    st.floats(0.1, 100.0),
)
def test_matches_clip_grad_norm(max_norm, norm_type, scale):
    model, ref = mlp(), mlp()
    clip = mitigate.GradientClipping(torch.optim.SGD(model.parameters(), lr=0.1), max_norm, norm_type)
    plain = torch.optim.SGD(ref.parameters(), lr=0.1)
    backward(model, 0, scale)
    backward(ref, 0, scale)
    total = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type)
    clip.step()
    plain.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)
    s = clip.stats()
    assert s["clipped"] == int(total > max_norm)
    assert s["mean_norm"] == pytest.approx(float(total), rel=1e-5)


def test_hand_computation_and_count():
    # grads (3, 4) -> norm 5; max_norm 1 -> (0.6, 0.8) (up to clip_grad_norm_'s 1e-6)
    w = nn.Parameter(torch.zeros(2))
    clip = mitigate.GradientClipping(torch.optim.SGD([w], lr=1.0), max_norm=1.0)
    for g, clipped in (([3.0, 4.0], 1), ([0.3, 0.4], 1)):
        w.grad = torch.tensor(g)
        clip.step()
    torch.testing.assert_close(w.grad, torch.tensor([0.3, 0.4]))  # below max_norm: untouched
    torch.testing.assert_close(w.detach(), -torch.tensor([0.6, 0.8]) - torch.tensor([0.3, 0.4]), rtol=1e-5, atol=1e-6)
    s = clip.stats()
    assert s["steps"] == 2 and s["clipped"] == 1 and s["clipped_fraction"] == 0.5


def test_state_dict_round_trip_keeps_counts_and_base_state():
    model = mlp()
    clip = mitigate.GradientClipping(torch.optim.AdamW(model.parameters(), lr=1e-2), max_norm=0.1)
    for s in range(3):
        clip.zero_grad()
        backward(model, s)
        clip.step()
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": clip.state_dict()}, buf)
    clip.zero_grad()
    backward(model, 9)
    clip.step()

    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    assert ck["o"]["mitigate"]["state"]["acc"]["clipped"] == 3
    model2 = mlp()
    model2.load_state_dict(ck["m"])
    clip2 = mitigate.GradientClipping(torch.optim.AdamW(model2.parameters(), lr=1e-2), max_norm=0.1)
    clip2.load_state_dict(ck["o"])
    assert clip2.stats()["clipped"] == 3
    backward(model2, 9)
    clip2.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert clip.stats() == clip2.stats()


def test_nonfinite_gradients_pass_untouched():
    model = mlp()
    clip = mitigate.GradientClipping(torch.optim.SGD(model.parameters(), lr=0.0), max_norm=0.01)
    backward(model, 0)
    model[0].weight.grad[0, 0] = float("inf")
    model[2].bias.grad[0] = float("nan")
    before = [p.grad.clone() for p in model.parameters()]
    clip.step()
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, b, equal_nan=True, rtol=0, atol=0)
    assert clip.stats()["nonfinite_skips"] == 1 and clip.stats()["clipped"] == 0


def test_grad_scaler_and_scheduler():
    model, ref = mlp(), mlp()
    clip = mitigate.GradientClipping(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=0.05)
    sched = torch.optim.lr_scheduler.StepLR(clip, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plain = torch.optim.SGD(ref.parameters(), lr=0.1)
    for s in range(2):
        clip.zero_grad()
        plain.zero_grad()
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        scaler.step(clip)  # unscales first: clipping sees true gradients
        scaler.update()
        sched.step()
        ((ref(x) - y) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        plain.step()
        plain.param_groups[0]["lr"] *= 0.5
    assert clip.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert clip.stats()["clipped"] == 2


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"max_norm": 0.0}, "max_norm=0.0"),
    ({"max_norm": float("nan")}, "max_norm=nan"),
    ({"max_norm": 1.0, "norm_type": -2.0}, "norm_type=-2.0"),
])
def test_invalid_options(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        mitigate.GradientClipping(torch.optim.SGD(mlp().parameters(), lr=0.1), **kwargs)


def test_step_hooks_registered_on_the_wrapper_fire():
    model = mlp()
    clip = mitigate.GradientClipping(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0)
    seen = []
    clip.register_step_pre_hook(lambda opt, args, kwargs: seen.append("pre"))
    clip.register_step_post_hook(lambda opt, args, kwargs: seen.append("post"))
    backward(model, 0)
    clip.step()
    assert seen == ["pre", "post"]


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        mitigate.GradientClipping(mlp(), max_norm=1.0)  # type: ignore[arg-type]
