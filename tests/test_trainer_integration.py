"""``MitigationTrainer``: hooks in the right order, projection after clipping, penalties scaled for
gradient accumulation, PEFT adapters only, and checkpoint resume bit-identical to a straight run.

Tiny Llama (hidden 32, 2 layers), a handful of steps per Trainer run.
"""

from __future__ import annotations

import functools

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import mitigate
from ddp_workers._common import task_tokens, tiny_llama
from mitigate._utils import flat_norm
from mitigate.integrations import (
    Freeze,
    MitigationCallback,
    MitigationSet,
    MitigationTrainer,
    OptimizerMitigation,
    consolidate_all,
    find_wrappers,
    with_mitigations,
)
from mitigate.integrations.trainer import STATE_FILE


def dataset(task: int, n: int = 32) -> Dataset:
    t = task_tokens(task, n)
    return Dataset.from_dict({"input_ids": t.tolist(), "attention_mask": torch.ones_like(t).tolist(), "labels": t.tolist()})


def targs(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=4, per_device_train_batch_size=4,
        per_device_eval_batch_size=8, learning_rate=1e-2, logging_steps=2, save_strategy="no", seed=0,
        disable_tqdm=True, dataloader_drop_last=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class EventRecorder(TrainerCallback):
    """Records the name of every Trainer event (and mitigate's ``on_task_end``) into ``events``."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.events.append("on_log")
        self.logs.append(dict(logs or {}))

    def on_task_end(self, args, state, control, report=None, **kw):
        self.events.append("on_task_end")


for _name in [n for n in dir(TrainerCallback) if n.startswith("on_") and n != "on_log"]:
    setattr(EventRecorder, _name,
            (lambda name: lambda self, *a, **k: self.events.append(name))(_name))


def spy(events: list[str], label: str, fn):
    @functools.wraps(fn)
    def wrapped(*a, **k):
        events.append(label)
        return fn(*a, **k)
    return wrapped


# ----------------------------------------------------------------------------- hooks and ordering


def test_every_hook_fires_in_order(tmp_path):
    model = tiny_llama()
    ewc = mitigate.EWC(model, strength=10.0)
    proj = OptimizerMitigation(mitigate.GradientProjection, mode="agem")
    events: list[str] = []
    recorder = EventRecorder(events)
    trainer = MitigationTrainer(model=model, args=targs(tmp_path), train_dataset=dataset(0),
                                mitigations=[ewc, proj], callbacks=[recorder])
    trainer.end_task(dataset(0), max_batches=2)  # before train(): builds the wrapper, remembers
    wrapper = proj.wrapper
    assert wrapper is not None and wrapper.stats()["memory_batches"] == 2
    wrapper.transform_gradients = spy(events, "mitigate:project", wrapper.transform_gradients)
    ewc.forward = spy(events, "mitigate:penalty", ewc.forward)
    trainer.train()
    trainer.end_task(dataset(0), max_batches=2)

    assert events[:2] == ["on_init_end", "on_task_end"] and events[-1] == "on_task_end"
    assert events.count("on_pre_optimizer_step") == 4 and events.count("mitigate:project") == 4
    # per optimizer step: forward+penalty, clip, pre-step hook, projection inside step, post-step hook
    step = ["on_step_begin", "mitigate:penalty", "on_pre_optimizer_step", "mitigate:project",
            "on_optimizer_step", "on_step_end"]
    first = events.index("on_step_begin")
    assert events[first : first + len(step)] == step
    i_pre = [i for i, e in enumerate(events) if e == "on_pre_optimizer_step"]
    i_opt = [i for i, e in enumerate(events) if e == "on_optimizer_step"]
    i_proj = [i for i, e in enumerate(events) if e == "mitigate:project"]
    assert all(a < b < c for a, b, c in zip(i_pre, i_proj, i_opt))
    for e in ("on_init_end", "on_train_begin", "on_epoch_begin", "on_train_end"):
        assert e in events
    # the mitigation callback ran before the recorder: logged keys are already there
    step_logs = [log for log in recorder.logs if "loss" in log]
    assert len(step_logs) == 2
    for log in step_logs:
        assert "mitigate/ewc_penalty" in log
        assert "mitigate/gradient_projection/projected_fraction" in log
        assert log["mitigate/ewc_penalty"] >= 0.0
    assert trainer.state.log_history[0]["mitigate/gradient_projection/steps"] == 2
    assert trainer.tasks_completed == 2


def test_projection_sees_clipped_gradients(tmp_path):
    model = tiny_llama()
    max_norm = 0.01
    proj = OptimizerMitigation(mitigate.GradientProjection, mode="agem")
    trainer = MitigationTrainer(model=model, args=targs(tmp_path, max_grad_norm=max_norm),
                                train_dataset=dataset(1), mitigations=[proj])
    trainer.end_task(dataset(0), max_batches=2)
    seen: list[float] = []
    original = proj.wrapper.transform_gradients

    def check():
        seen.append(float(flat_norm([p.grad for p in model.parameters() if p.grad is not None])))
        original()

    proj.wrapper.transform_gradients = check
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(seen) == 4
    assert min(logged) > 10 * max_norm  # the Trainer really clipped (grad_norm is pre-clip)
    assert max(seen) <= max_norm * (1 + 1e-4)  # ... before the wrapper saw the gradients
    assert trainer.state.log_history[-2]["mitigate/gradient_projection/steps"] == 4


def test_wrapper_given_through_optimizers_argument(tmp_path):
    model = tiny_llama()
    opt = mitigate.GradientProjection(torch.optim.SGD(model.parameters(), lr=0.05), mode="ogd", model=model)
    Plain = with_mitigations(Trainer)
    assert Plain.__name__ == "MitigationTrainer" and with_mitigations(Plain) is Plain
    trainer = Plain(model=model, args=targs(tmp_path), train_dataset=dataset(1), optimizers=(opt, None))
    report = trainer.end_task(dataset(0), max_batches=2)
    assert report.consolidated == ["gradient_projection"] and report.num_examples == 16
    assert opt.basis_size == 2
    before = opt.basis.clone()
    trainer.train()
    assert find_wrappers(trainer.optimizer) == [opt]
    assert torch.equal(opt.basis, before)
    assert opt.stats()["projected_fraction"] == 1.0


# ----------------------------------------------------------------------------- loss terms


def _one_step(tmp_path, *, ga: int, penalty: bool) -> dict[str, torch.Tensor]:
    model = tiny_llama()
    mitigations = []
    if penalty:
        ewc = mitigate.EWC(model, strength=1e4)
        consolidate_all([ewc], model, [{k: torch.tensor(v) for k, v in dataset(0, 8)[:8].items()}])
        with torch.no_grad():  # move away from the anchor so the penalty has a gradient
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        mitigations = [ewc]
    args = targs(tmp_path, max_steps=1, per_device_train_batch_size=8 // ga, gradient_accumulation_steps=ga,
                 learning_rate=0.1, lr_scheduler_type="constant", optim="sgd", max_grad_norm=0.0)
    MitigationTrainer(model=model, args=args, train_dataset=dataset(1, 8), mitigations=mitigations).train()
    return params_of(model)


def test_penalty_counted_once_per_step_under_gradient_accumulation(tmp_path):
    with_pen_1, with_pen_2 = _one_step(tmp_path, ga=1, penalty=True), _one_step(tmp_path, ga=2, penalty=True)
    without = _one_step(tmp_path, ga=1, penalty=False)
    gap = max((with_pen_1[n] - without[n]).abs().max().item() for n in without)
    assert gap > 1e-3  # the penalty moved the parameters
    for n in with_pen_1:
        torch.testing.assert_close(with_pen_2[n], with_pen_1[n], atol=1e-6, rtol=0)


def test_evaluation_loss_is_the_task_loss(tmp_path):
    model = tiny_llama()
    ewc = mitigate.EWC(model, strength=1e6)
    trainer = MitigationTrainer(model=model, args=targs(tmp_path), train_dataset=dataset(0),
                                eval_dataset=dataset(0, 16), mitigations=[ewc])
    trainer.end_task(dataset(0), max_batches=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    plain = Trainer(model=model, args=targs(tmp_path), eval_dataset=dataset(0, 16))
    assert trainer.evaluate()["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], abs=1e-6)
    assert float(ewc().detach()) > 1.0


def test_freeze_applies_before_the_optimizer(tmp_path):
    model = tiny_llama()
    trainer = MitigationTrainer(model=model, args=targs(tmp_path, max_steps=1), train_dataset=dataset(0),
                                mitigations=[Freeze(mitigate.freeze_bottom_layers, (1,))])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(".layers.0." in n for n in frozen) and not any(".layers.1." in n for n in frozen)
    before = params_of(model)
    trainer.train()
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        assert (id(p) in in_optimizer) == (n not in frozen)
        assert torch.equal(p, before[n]) == (n in frozen)


def test_bad_mitigations_raise():
    model = tiny_llama()
    with pytest.raises(ValueError, match="optimizers=\\(wrapper, None\\)"):
        MitigationSet.from_list([mitigate.GradientClipping(torch.optim.SGD(model.parameters(), lr=1), 1.0)])
    with pytest.raises(ValueError, match="unsupported mitigation"):
        MitigationSet.from_list(["ewc"])
    with pytest.raises(ValueError, match="pass the class"):
        OptimizerMitigation(torch.optim.SGD(model.parameters(), lr=1))
    with pytest.raises(ValueError, match="args=\\(2,\\)"):
        Freeze(mitigate.freeze_bottom_layers, 2)
    with pytest.raises(ValueError, match="max_batches"):
        consolidate_all([], model, [{}], max_batches=0)


def test_callback_logs_curvature_penalty_and_drift():
    model = tiny_llama()
    curv = mitigate.CurvatureRegularizer(model, strength=1.0, k=2, max_iter=20, preservation_weight=0.0)
    batch = {k: torch.tensor(v) for k, v in dataset(0, 8)[:8].items()}
    consolidate_all([curv], model, [batch])
    cb = MitigationCallback([curv])
    assert "mitigate/curvature_regularizer_penalty" not in cb.collect()  # never called: not evaluated
    cb.record_penalty("curvature_regularizer", curv())
    stats = cb.collect()
    assert stats["mitigate/curvature_regularizer_penalty"] == pytest.approx(0.0, abs=1e-6)  # at the anchor
    ratios = [stats[f"mitigate/curvature_regularizer_drift/0/ratio/{i}"] for i in range(2)]
    assert ratios == pytest.approx([1.0, 1.0], abs=1e-3)  # curvature preserved at the anchor
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    cb.record_penalty("curvature_regularizer", curv())
    moved = cb.collect()
    assert moved["mitigate/curvature_regularizer_penalty"] > 0.0
    assert moved["mitigate/curvature_regularizer_drift/0/ratio/0"] != pytest.approx(1.0, abs=1e-2)


def test_callback_with_plain_trainer_evaluates_penalty(tmp_path):
    model = tiny_llama()
    ewc = mitigate.EWC(model, strength=10.0)
    consolidate_all([ewc], model, [{k: torch.tensor(v) for k, v in dataset(0, 8)[:8].items()}])
    cb = MitigationCallback([ewc], log_drift=False)
    trainer = Trainer(model=model, args=targs(tmp_path, max_steps=2), train_dataset=dataset(1), callbacks=[cb])
    trainer.train()
    assert trainer.state.log_history[0]["mitigate/ewc_penalty"] == pytest.approx(float(ewc().detach()), rel=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_trainer_calibrates_a_default_ewc_on_the_first_batches_of_each_task(tmp_path, smoothing):
    """``EWC(model)`` (calibrated) gets each finished task's λ_t from the next task's first
    ``calibration_batches`` training batches: the trainer passes them, as ``ewc(batch)`` (with
    label smoothing, where Trainer pops the labels off its inputs, a copy with the labels)."""
    model = tiny_llama()
    ewc = mitigate.EWC(model, calibration_batches=2)
    seen: list[int] = []
    real = ewc._calibration_update
    ewc._calibration_update = lambda blist, fn: (seen.append(len(blist)), real(blist, fn))[1]  # type: ignore[method-assign]
    trainer = MitigationTrainer(model=model, args=targs(tmp_path, max_steps=3, label_smoothing_factor=smoothing),
                                train_dataset=dataset(1), mitigations=[ewc])
    trainer.end_task(dataset(0), max_batches=2)
    assert ewc.pending_calibration and ewc.lambda_ is None
    trainer.train()
    assert seen == [1, 1] and not ewc.pending_calibration and len(ewc.task_lambdas) == 1
    assert "mitigate/ewc_penalty" in trainer.state.log_history[0]
    trainer.end_task(dataset(1), max_batches=2)
    assert ewc.pending_calibration
    trainer.train()
    assert seen == [1, 1, 1, 1] and not ewc.pending_calibration and len(ewc.task_lambdas) == 2


# ----------------------------------------------------------------------------- PEFT


def _lora_model():
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(tiny_llama(), cfg)


def test_lora_mitigations_store_adapters_only(tmp_path):
    model = _lora_model()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    ewc = mitigate.EWC(model, strength=10.0)
    proj = OptimizerMitigation(mitigate.GradientProjection, mode="ogd")
    trainer = MitigationTrainer(model=model, args=targs(tmp_path), train_dataset=dataset(1),
                                mitigations=[ewc, proj])
    trainer.end_task(dataset(0), max_batches=2)
    n_lora = sum(p.numel() for p in lora.values())
    stored = {k: v for k, v in ewc.state_dict().items() if isinstance(v, torch.Tensor)}
    assert stored and sum(v.numel() for v in stored.values()) <= 2 * n_lora + 8  # Fisher + anchor
    assert all("lora_" in k for k in stored if stored[k].numel() > 1), sorted(stored)
    state = proj.wrapper.wrapper_state_dict()
    assert all("lora_" in n for n in state["signature"]["names"])
    assert state["basis"].shape[1] == n_lora
    before = params_of(model)
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_freeze_qk_on_lora_freezes_qk_adapters():
    model = _lora_model()
    mitigate.freeze_attention_qk(model)
    for n, p in model.named_parameters():
        if "lora_" in n and ("q_proj" in n or "k_proj" in n):
            assert not p.requires_grad, n
        if "lora_" in n and "v_proj" in n:
            assert p.requires_grad, n


# ----------------------------------------------------------------------------- checkpoints


def _continual_run(tmp_path, *, resume: str | None, max_steps: int = 6, save_steps: int = 3):
    model = tiny_llama()
    ewc = mitigate.EWC(model, strength=100.0)
    proj = OptimizerMitigation(mitigate.GradientProjection, mode="agem", ref_every=2)
    args = targs(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=save_steps,
                 optim="adamw_torch", learning_rate=5e-3)
    if resume is None:  # task A boundary (in the resumed run this state comes from the checkpoint)
        MitigationTrainer(model=model, args=args, mitigations=[ewc, proj]).end_task(dataset(0), max_batches=2)
    trainer = MitigationTrainer(model=model, args=args, train_dataset=dataset(1), mitigations=[ewc, proj])
    trainer.train(resume_from_checkpoint=resume)
    return params_of(model), proj.wrapper.stats(), ewc


def test_resume_mid_task_is_bit_identical(tmp_path):
    straight, stats, ewc = _continual_run(tmp_path / "a", resume=None)
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert (ckpt / STATE_FILE).is_file() and (ckpt / "optimizer.pt").is_file()
    resumed, stats_r, ewc_r = _continual_run(tmp_path / "b", resume=str(ckpt))
    for n in straight:
        assert torch.equal(straight[n], resumed[n]), n
    assert stats_r == stats
    assert_same(ewc.state_dict(), ewc_r.state_dict())


def assert_same(a, b, path="state"):
    """Recursive exact equality of (nested) state dicts."""
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _head_freeze_run(tmp_path, model, *, resume: str | None):
    heads = Freeze(mitigate.freeze_attention_qk, kwargs={"heads": {0: [1], 1: [0, 2]}})
    args = targs(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, optim="adamw_torch",
                 learning_rate=5e-3, weight_decay=0.1)
    trainer = MitigationTrainer(model=model, args=args, train_dataset=dataset(1), mitigations=[heads])
    trainer.train(resume_from_checkpoint=resume)
    return params_of(model)


def test_resume_with_frozen_heads_holds_the_checkpoint_rows(tmp_path):
    from safetensors.torch import load_file
    # run A fine-tunes a model trained on task 0 (seed 1 here) with heads frozen; the resumed run
    # starts, like a fresh script, from the base model (seed 0) and loads the checkpoint
    straight = _head_freeze_run(tmp_path / "a", tiny_llama(seed=1), resume=None)
    ckpt = tmp_path / "a" / "checkpoint-2"
    saved = load_file(str(ckpt / "model.safetensors"))
    base = params_of(tiny_llama(seed=0))
    resumed = _head_freeze_run(tmp_path / "b", tiny_llama(seed=0), resume=str(ckpt))
    q0 = "model.layers.0.self_attn.q_proj.weight"
    held = slice(8, 16)  # query head 1 of layer 0 (head_dim 8)
    assert not torch.equal(saved[q0][held], base[q0][held])  # the test can fail
    assert torch.equal(resumed[q0][held], saved[q0][held])
    assert torch.equal(straight[q0][held], saved[q0][held])
    for n in straight:  # the whole resumed run is the straight run
        assert torch.equal(straight[n], resumed[n]), n


def test_agem_memory_carries_into_a_next_task_trainer_that_freezes(tmp_path):
    """Task 0 with A-GEM, task 1 with the same A-GEM spec plus Freeze: the memory (batches) carries
    over and projects the gradient of the parameters that still train."""
    model = tiny_llama()
    proj = OptimizerMitigation(mitigate.GradientProjection, mode="agem")
    task0 = MitigationTrainer(model=model, args=targs(tmp_path / "t0"), train_dataset=dataset(0), mitigations=[proj])
    with pytest.warns(UserWarning, match="before any remember"):  # task 0: nothing to project yet
        task0.train()
    task0.end_task(dataset(0), max_batches=2)
    first = proj.wrapper
    assert first.stats()["memory_batches"] == 2
    freeze = Freeze(mitigate.freeze_bottom_layers, (1,))
    task1 = MitigationTrainer(model=model, args=targs(tmp_path / "t1"), train_dataset=dataset(1),
                              mitigations=[proj, freeze])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and any(".layers.0." in n for n in frozen)
    before = params_of(model)
    task1.train()
    second = proj.wrapper
    assert second is not first
    stats = second.stats()
    assert stats["memory_batches"] == 2 and stats["tasks"] == 1 and stats["steps"] == 8
    assert stats["mean_cosine"] != 0.0  # reference gradients were computed from the memory
    assert_same(second.memory, first.memory)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert second.parameter_names == trainable  # the reference gradient is over these now
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n
    task1.end_task(dataset(1), max_batches=2)  # remembering under the freeze works too
    assert second.stats()["memory_batches"] == 4


def test_agem_cached_reference_follows_a_freeze_by_name():
    """The cached reference gradient (ref_every > 1) keeps the segments of the parameters that
    still train, by name, instead of being refused or recomputed."""
    model = tiny_llama()
    batch = {k: torch.tensor(v) for k, v in dataset(0, 4)[:4].items()}
    opt = mitigate.GradientProjection(torch.optim.SGD(model.parameters(), lr=0.0), mode="agem", ref_every=3)
    opt.remember(model, [batch])
    model(**batch).loss.backward()
    opt.step()
    names = opt.parameter_names
    sizes = [p.numel() for _, p in model.named_parameters()]
    cached = dict(zip(names, opt._ref.split(sizes)))
    mitigate.freeze_bottom_layers(model, 1)  # embeddings and block 0 stop training
    opt.zero_grad()
    model(**batch).loss.backward()
    opt.step()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert opt.parameter_names == trainable and len(trainable) < len(names)
    assert opt._ref_age == 2  # the cache was used, not recomputed
    assert torch.equal(opt._ref, torch.cat([cached[n] for n in trainable]))


def test_curvature_replay_rows_ride_in_the_training_batch(tmp_path):
    """With ``fuse_replay`` (default) the curvature term's replay rows join the training forward:
    one model forward per step instead of two, and the same training as the unfused run (tiny
    Llama has no dropout; float rounding apart)."""
    runs = {}
    for fuse in (True, False):
        model = tiny_llama()
        curv = mitigate.CurvatureRegularizer(model, max_iter=20)
        calls = []
        trainer = MitigationTrainer(model=model, args=targs(tmp_path), train_dataset=dataset(1),
                                    mitigations=[curv], fuse_replay=fuse, log_drift=False)
        trainer.end_task(dataset(0), max_batches=2)
        hook = model.register_forward_hook(lambda *_: calls.append(1))
        trainer.train()
        hook.remove()
        runs[fuse] = (len(calls), params_of(model), [h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert runs[True][0] == 4 and runs[False][0] == 8  # 4 steps: one forward each, or two
    for name, p in runs[True][1].items():
        torch.testing.assert_close(p, runs[False][1][name], rtol=1e-4, atol=1e-5)
    assert runs[True][2] == pytest.approx(runs[False][2], rel=1e-4)


def _curvature_trainer(tmp_path):
    """A tiny Llama with a CurvatureRegularizer consolidated on task 0 in a MitigationTrainer
    (fusing on, the default), and a training batch of task 1."""
    model = tiny_llama()
    curv = mitigate.CurvatureRegularizer(model, max_iter=20)
    trainer = MitigationTrainer(model=model, args=targs(tmp_path, max_steps=2), train_dataset=dataset(1),
                                mitigations=[curv])
    trainer.end_task(dataset(0), max_batches=2)
    return model, curv, trainer, {k: torch.tensor(v) for k, v in dataset(1, 4)[:4].items()}


def test_a_batch_that_cannot_carry_replay_rows_falls_back(tmp_path, caplog):
    model, curv, trainer, batch = _curvature_trainer(tmp_path)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    model.train()
    with caplog.at_level("INFO", logger="mitigate.integrations.trainer"):
        loss = trainer.compute_loss(model, batch)
    assert "replay rows not fused into the training batch" in caplog.text
    assert curv._pending is None  # nothing appended: the term ran its own forward
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-5, atol=1e-6)  # at θ*: penalty 0


def test_an_output_without_logits_falls_back_and_stops_fusing(tmp_path):
    from types import SimpleNamespace

    _, curv, trainer, batch = _curvature_trainer(tmp_path)
    curv.with_replay(batch)
    penalty = trainer._fused_penalty(curv, SimpleNamespace(logits=None))  # e.g. a fused-loss kernel
    assert torch.is_tensor(penalty) and penalty.requires_grad  # from term(), its own forward
    assert curv._pending is None and not trainer.fuse_replay and trainer._replay_term(batch) is None
