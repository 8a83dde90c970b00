"""Principal-component rotation on constructed rotations, and weight trajectories."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tiny_models import VOCAB, build

from mitigate.diagnostics import WeightTrajectory, layer_pc_rotation, pc_rotation
from mitigate.errors import StateMismatchError

torch.set_num_threads(1)


def _data(n=400, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([6.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)[:d]
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scales


@pytest.mark.parametrize("theta_deg", [10.0, 30.0, 60.0])
def test_rotation_within_the_top_two_components(theta_deg):
    x = _data()
    xc = x - x.mean(0)
    evals, evecs = torch.linalg.eigh(xc.T @ xc)
    u1, u2 = evecs[:, -1], evecs[:, -2]
    th = math.radians(theta_deg)
    # Givens rotation G in span(u1, u2): the covariance eigenvectors become Gᵀ uᵢ
    g = (
        torch.eye(6, dtype=torch.float64)
        + (math.cos(th) - 1) * (torch.outer(u1, u1) + torch.outer(u2, u2))
        + math.sin(th) * (torch.outer(u2, u1) - torch.outer(u1, u2))
    )
    res = pc_rotation(x, x @ g, k=3)
    torch.testing.assert_close(res.angles_deg, torch.tensor([theta_deg, theta_deg, 0.0], dtype=torch.float64), atol=1e-5, rtol=0)
    # the top-2 subspace is unchanged: principal angles 0
    torch.testing.assert_close(pc_rotation(x, x @ g, k=2).principal_angles_deg, torch.zeros(2, dtype=torch.float64), atol=1e-5, rtol=0)
    assert float(res.explained_variance_before.sum()) <= 1.0


def test_sign_invariance_and_validation():
    x = _data(seed=1)
    torch.testing.assert_close(pc_rotation(x, -x, k=4).angles_deg, torch.zeros(4, dtype=torch.float64), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="k="):
        pc_rotation(x, x, k=7)
    with pytest.raises(ValueError, match="same d"):
        pc_rotation(x, x[:, :3])


def test_layer_pc_rotation_streams_the_same_covariance():
    a, b = build("llama", seed=0), build("llama", seed=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (4, 9), generator=g)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 6:] = 0
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]
    res = layer_pc_rotation(a, b, batches, layer=1, k=3)
    with torch.no_grad():
        ha = a(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1][mask.bool()]
        hb = b(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1][mask.bool()]
    expected = pc_rotation(ha, hb, k=3)
    torch.testing.assert_close(res.principal_angles_deg, expected.principal_angles_deg, atol=1e-4, rtol=0)
    torch.testing.assert_close(res.angles_deg, expected.angles_deg, atol=1e-4, rtol=0)
    same = layer_pc_rotation(a, a, batches, layer=-1, k=3)
    assert float(same.angles_deg.max()) < 1e-3


def test_weight_trajectory_per_group_and_layer():
    model = build("llama")
    traj = WeightTrajectory(model)
    first = traj.record(0)
    assert first["global"] == 0.0 and all(v == 0.0 for v in first["per_group"].values())
    w = model.model.layers[1].self_attn.q_proj.weight
    ref = w.detach().clone()
    with torch.no_grad():
        w.add_(0.1)
    entry = traj.record(5)
    q_ref = torch.cat([model.model.layers[0].self_attn.q_proj.weight.detach().reshape(-1), ref.reshape(-1)]).double()
    expected = float((w.detach().double() - ref.double()).norm() / q_ref.norm())
    assert entry["per_group"]["q"] == pytest.approx(expected, rel=1e-9)
    assert entry["per_group"]["ffn"] == 0.0 and entry["per_layer"][0] == 0.0 and entry["per_layer"][1] > 0
    assert [e["step"] for e in traj.history] == [0, 5]
    json.dumps(traj.to_dict())
    other = copy.deepcopy(model)
    assert WeightTrajectory(other, reference=model).distances()["global"] == 0.0
    with pytest.raises(StateMismatchError, match="missing"):
        WeightTrajectory(model, reference={"nope": torch.zeros(1)})


def test_weight_trajectory_splits_fused_qkv():
    model = build("gpt2")
    traj = WeightTrajectory(model)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight[:, 64:] += 1.0  # V columns only
    d = traj.distances()
    assert d["per_group"]["v"] > 0 and d["per_group"]["q"] == 0.0 and d["per_group"]["k"] == 0.0
