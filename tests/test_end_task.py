"""One verb to end a task: ``end_task`` on every loss term and optimizer wrapper, one report type
(:class:`mitigate.TaskEndReport`) with a readable ``__str__``, the old verbs unchanged, and
progress bars that follow one switch (``MitigationTrainer`` follows ``disable_tqdm``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import VOCAB, build

import mitigate
from mitigate._utils import _PROGRESS, progress_bar, progress_enabled


def _batches(seed: int = 0, n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(2, VOCAB, (4, 10), generator=g)
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})
    return out


def _same_state(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


# ------------------------------------------------------------------ loss terms


@pytest.mark.parametrize("kind", ["ewc", "curvature"])
def test_loss_term_end_task_equals_consolidate_and_reports(kind):
    make = {"ewc": mitigate.EWC, "curvature": mitigate.CurvatureRegularizer}[kind]
    m1 = build("llama")
    m2 = copy.deepcopy(m1)
    a, b = make(m1), make(m2)
    old = a.consolidate(_batches())
    rep = b.end_task(_batches())
    _same_state(a.state_dict(), b.state_dict())
    assert isinstance(rep, mitigate.TaskEndReport) and rep.task == 0 and rep.batches == 2 and rep.samples == 8
    if kind == "ewc":
        assert isinstance(old, dict) and rep.result.keys() == old.keys()
        n = sum(f.numel() for f in old.values())
        mean = sum(float(f.double().sum()) for f in old.values()) / n
        assert rep["fisher_mean"] == pytest.approx(mean, rel=1e-12) and b.lambda_ is None  # calibrated: pending
        assert rep["parameters"] == n and "set on the next task's first 4 batches" in str(rep)
        fixed = mitigate.EWC(copy.deepcopy(m1), scale=100.0).end_task(_batches())
        assert fixed["strength"] == pytest.approx(100.0 / fixed["fisher_mean"], rel=1e-9)
        assert f"strength      {fixed['strength']:.3g}" in str(fixed)
    else:
        assert torch.equal(rep.result.values, old.values)  # the EigenResult, as consolidate returns it
        assert rep["eigenvalues"] == pytest.approx(b.eigenvalues(0).tolist())
        assert rep["replay_inputs"] == 8 and rep["k"] == 1
        assert f"{rep['eigenvalues'][0]:.3g}" in str(rep)
    text = str(rep)
    assert text.splitlines()[0].startswith(f"{rep.method}: task 0 ended on 2 batches (8 samples) in ")
    json.dumps(rep.as_dict())  # JSON-ready
    assert "result" not in rep.as_dict()
    assert b.end_task(_batches(1)).task == 1  # counted per mitigation
    with pytest.raises(KeyError, match="has \\["):
        rep["no_such_figure"]
    with pytest.raises(ValueError, match="different model.*end_task\\(batches\\)"):
        b.end_task(_batches(), model=build("llama"))


# ------------------------------------------------------------------ optimizer wrappers


@pytest.mark.parametrize("mode", ["agem", "ogd"])
def test_projection_end_task_equals_remember_and_takes_the_constructor_model(mode):
    m1 = build("llama")
    m2 = copy.deepcopy(m1)
    p1 = mitigate.GradientProjection(torch.optim.AdamW(m1.parameters(), lr=1e-3), mode, model=m1)  # positional mode
    p2 = mitigate.GradientProjection(torch.optim.AdamW(m2.parameters(), lr=1e-3), mode=mode, model=m2)
    old = p1.remember(m1, _batches())
    rep = p2.end_task(_batches())  # the model given at construction
    _same_state(p1.state_dict(), p2.state_dict())
    assert rep.method == f"GradientProjection ({mode})" and rep.task == old.task == 0
    assert rep["basis_size"] == old.basis_size and rep["memory_batches"] == old.memory_batches and rep["added"] == old.added
    assert rep.result == old
    bare = mitigate.GradientProjection(torch.optim.AdamW(m1.parameters(), lr=1e-3), mode)
    with pytest.raises(ValueError, match="needs the model.*end_task\\(batches, model=model\\)"):
        bare.end_task(_batches())


def test_lrcp_end_task_equals_remember():
    m1 = build("gpt2")
    m2 = copy.deepcopy(m1)
    l1 = mitigate.LowRankCircuitProjection(torch.optim.AdamW(m1.parameters(), lr=1e-3), m1)
    l2 = mitigate.LowRankCircuitProjection(torch.optim.AdamW(m2.parameters(), lr=1e-3), m2)
    ranks = l1.remember(m1, _batches())
    rep = l2.end_task(_batches())
    _same_state(l1.state_dict(), l2.state_dict())
    assert rep.result == ranks and rep["ranks"] == ranks and rep["modules"] == len(ranks)
    assert rep["total_rank"] == sum(ranks.values()) and rep["max_rank"] == max(ranks.values())
    assert f"({len(ranks)} entries)" in str(rep)  # a long dict is summarised, not dumped
    assert l2.end_task(_batches(1)).task == 1


def test_consolidate_all_collects_one_report_per_mitigation():
    from mitigate.integrations import consolidate_all

    model = build("llama")
    ewc = mitigate.EWC(model)
    proj = mitigate.GradientProjection(torch.optim.AdamW(model.parameters(), lr=1e-3), "agem", model=model)
    rep = consolidate_all([ewc], model, _batches(), optimizer=proj)
    assert [r.method for r in rep.reports] == ["EWC", "GradientProjection (agem)"]
    text = str(rep)
    assert text.startswith("task ended: 2 mitigation(s) ['ewc', 'gradient_projection'] on 2 batches (8 examples)")
    assert "  EWC: task 0 ended" in text and "  GradientProjection (agem): task 0 ended" in text
    json.dumps(rep.as_dict())


# ------------------------------------------------------------------ progress switch


def test_progress_switch_hides_every_bar_and_restores():
    assert _PROGRESS.get() is True
    assert not progress_bar(total=1).disable
    assert progress_bar(total=1, enabled=False).disable
    with progress_enabled(False):
        assert progress_bar(total=1).disable
        with progress_enabled(True):
            assert not progress_bar(total=1).disable
        assert progress_bar(total=1).disable
    assert _PROGRESS.get() is True


def test_mitigation_trainer_end_task_follows_disable_tqdm(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    import mitigate.integrations.trainer as T

    seen = []
    real = T.consolidate_all

    def recording(*a, **k):
        seen.append(_PROGRESS.get())
        return real(*a, **k)

    monkeypatch.setattr(T, "consolidate_all", recording)
    for disable in (True, False):
        model = build("llama")
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=disable, per_device_eval_batch_size=4)
        trainer = T.MitigationTrainer(model=model, args=args, mitigations=[mitigate.EWC(model)])
        rep = trainer.end_task(_batches())
        assert [r.method for r in rep.reports] == ["EWC"]
    assert seen == [False, True]


def test_per_sample_memory_note_names_the_chunk_size_that_fits(monkeypatch, caplog):
    import logging

    import mitigate._utils as U

    caplog.set_level(logging.INFO, logger="mitigate")
    U.note_per_sample_memory("EWC Fisher", 2**20, 8, "cpu")  # 8 MiB: below the 1 GiB threshold, silent
    assert not caplog.records
    monkeypatch.setattr(U, "free_memory_bytes", lambda device: 4 * 2**30)  # 4 GiB free
    U.note_per_sample_memory("EWC Fisher", 2**30, 8, "cpu")  # 8 × 1 GiB: half of 4 GiB fits 2
    (rec,) = caplog.records
    assert rec.levelno == logging.WARNING and "hold 8.00 GiB at once" in rec.getMessage()
    assert "chunk_size=2 fits in half of it" in rec.getMessage() and "pass chunk_size=2" in rec.getMessage()
    caplog.clear()
    U.note_per_sample_memory("EWC Fisher", 2**29, 3, "cpu")  # 1.5 GiB, 3 ≤ 4 fit: a note, not a warning
    (rec,) = caplog.records
    assert rec.levelno == logging.INFO and "chunk_size=4 fits" in rec.getMessage()
