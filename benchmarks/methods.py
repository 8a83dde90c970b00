"""Method registry of the benchmark: each method is a few hooks around one training loop.

The harness (``benchmarks/compare.py``) runs, for every method, on a copy of the Task-0 model::

    optimizer = method.setup(model, AdamW(model.parameters(), lr), ctx)   # wrap / freeze
    method.after_task(ctx, 0)                                            # consolidate Task 0
    for t in 1..T:
        method.before_task(ctx, t)
        for step in range(steps_per_task):
            batch = method.batch(ctx, batch)                             # replay mixing
            loss = model(**batch).loss + method.loss_extra(model, batch, ctx)
            loss.backward(); optimizer.step(); optimizer.zero_grad()
        method.after_task(ctx, t)                                        # consolidate task t

All the logic lives in :mod:`mitigate`; a method here only calls it. New methods register in one
place: decorate a factory with ``@register(name, help, **defaults)`` (or put a :class:`Method` in
:data:`METHODS`); ``a+b`` names combine registered methods (hooks run in order).

Default hyperparameters (override with ``--hp name.key=value`` in ``compare.py``):

====================  ======================================================================
method                defaults
====================  ======================================================================
seq                   plain AdamW at the scenario's lr, no weight decay (the baseline)
freeze-bottom         ``layers=0.75`` (fraction, or an int count, of the bottom blocks frozen
                      after Task 0: 3 of biography's 4), ``embeddings=True`` (Zheng et al.
                      2025: freeze the embeddings and the bottom blocks; more layers for
                      similar task formats). biography quick, Task 0 retained: 1 layer 52%,
                      2 layers 52%, 3 layers 61%
freeze-qk             every layer's Q/K projections frozen after Task 0 (arXiv 2601.18699 §2.3)
agem                  ``memory_size=64`` remembered batches, ``ref_every=1``; the library's
                      ``ref_batches=4`` and ``hold="update"`` (the final AdamW update is
                      projected, not only the gradient) (A-GEM, Chaudhry et al. 2019)
pcgrad                the library defaults ``GradientProjection(opt, mode="pcgrad",
                      model=model)``: the task gradient and the gradient of 4 replay-memory
                      batches (64 kept), each projected off the other where they conflict,
                      summed (Yu et al. 2020); ``hold="update"``. Not in the default set (6x
                      seq's step): ``--methods seq,pcgrad``
ogd                   ``directions_per_task=16`` (one per batch: at most
                      ``consolidate_batches``), ``max_basis=256``
                      (OGD, Farajtabar et al. 2020)
curvature             the library defaults (``CurvatureRegularizer(model)``): the KL
                      function-space anchor (``replay_weight=1``) on ``replay_samples=32``
                      stored inputs of each finished task, 4 per step, plus the rank-1
                      Gauss-Newton anchor (``strength=1``); no eigenvalue-preservation term
                      (measured not to help, issue 13), on ``consolidate_batches=2`` batches;
                      ``with_replay=True``: the 4 rows per finished task ride in the training
                      batch (``reg.with_replay``), one forward per step for both terms
ewc                   the library default ``EWC(model)``, called as ``ewc(batch)``: each
                      finished task's λ_t = 3e-3 · mean(g²) / mean(F_t)², calibrated on the
                      next task's first 4 batches (g at θ*_t); ``fisher="empirical"``
                      (per-sample squared grads; Kirkpatrick et al. 2017) on
                      ``consolidate_batches=4`` batches. ``--hp ewc.scale=0.01`` gives the
                      fixed λ = scale / mean(F) (the benchmark's earlier tuned choice)
clip                  ``max_norm=0.5`` (global gradient-norm clipping; arXiv 2601.18699).
                      Under AdamW a clip that is active every step only rescales g by a
                      constant, which Adam's normalisation undoes: 0.1 and 0.5 give the same
                      run on biography
replay                ``fraction=0.25`` of each batch's rows replaced by rows of earlier
                      tasks' batches (same compute as seq; 0.5 retains more, 53% vs 47%,
                      but halves the new-task accuracy on biography quick)
lrcp                  ``mitigate.LowRankCircuitProjection`` defaults (energy 0.99)
planned               ``mitigate.plan(model, old, new, probe_steps=min(20, steps_per_task))``
                      then ``.apply`` (the library's default policy: on quick it probes 30
                      candidates, 3 bottom depths x with/without heads+LRCP x EWC anchor
                      scale 0/0.5/1/2/4; ``--hp planned.<PlanPolicy field>=...`` overrides
                      one, e.g. ``ewc_on=best`` for 10 probes)
freeze-bottom+curv.   both, each with its defaults
====================  ======================================================================

Every consolidation (``remember``/``consolidate``/``plan``) uses at most ``consolidate_batches``
(default 8) training batches of the finished task.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.scenario import Scenario

log = logging.getLogger(__name__)

Batch = dict[str, Tensor]


class MethodUnavailable(RuntimeError):
    """A method's library API is missing (not installed or not written yet): skip the method."""


@dataclass
class RunContext:
    """What the hooks see: the model, its optimizer, the scenario and the method's own state.

    Attributes:
        model: the model being trained (already on ``device``).
        scenario: the scenario.
        device: training device.
        seed: run seed (methods that sample use ``rng``).
        hp: the method's hyperparameters (defaults updated with user overrides).
        optimizer: the optimizer the loop steps (set after ``setup``).
        task: index of the task being trained (or just finished in ``after_task``).
        state: the method's objects (regularizers, wrappers, memories); ``state["report"]``, a
            JSON-able dict, is saved with the run as ``method_report`` (planned: its plan).
        rng: a ``random.Random`` for the method.
        budget: what the method spends beyond seq, reported per run: ``extra_train_steps``
            (training steps outside the tasks' own, e.g. plan's probes) and ``old_examples``
            (distinct examples of finished tasks it read: consolidation batches, replay memory).
        outputs: the model's output on this step's batch (after the ``batch`` hook), while
            ``loss_extra`` runs (``None`` otherwise): the curvature method reads its KL term off
            the replay rows it appended (``CurvatureRegularizer.with_replay``).
    """

    model: nn.Module
    scenario: Scenario
    device: torch.device
    seed: int
    hp: dict[str, Any]
    optimizer: torch.optim.Optimizer | None = None
    task: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)
    budget: dict[str, int] = field(default_factory=lambda: {"extra_train_steps": 0, "old_examples": 0})
    outputs: Any = None
    _seen: set[tuple[int, int]] = field(default_factory=set, repr=False)

    def count_old(self, t: int, indices: Iterable[int]) -> None:
        """Count the rows of task ``t``'s training batches ``indices`` as old-task examples used
        (each batch once), if task ``t`` is finished (``t <= self.task``) and a later task is
        still to be trained on them (not after the last task)."""
        if t > self.task or t >= len(self.scenario.tasks) - 1:
            return
        for i in indices:
            if (t, i) not in self._seen:
                self._seen.add((t, i))
                self.budget["old_examples"] += int(self.scenario.tasks[t].train[i]["input_ids"].shape[0])

    def task_batches(self, t: int, limit: int | None = None) -> list[Batch]:
        """Training batches of task ``t`` (the first ``limit``, default ``consolidate_batches``),
        moved to the device; those of a finished task count towards ``budget["old_examples"]``."""
        n = self.hp.get("consolidate_batches", 8) if limit is None else limit
        batches = self.scenario.tasks[t].train[:n]
        self.count_old(t, range(len(batches)))
        return [_to(b, self.device) for b in batches]


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


Hook = Callable[..., Any]


def _noop(*_: Any) -> None:
    return None


def _keep_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: RunContext
                    ) -> torch.optim.Optimizer:
    return optimizer


def _keep_batch(ctx: RunContext, batch: Batch) -> Batch:
    return batch


@dataclass
class Method:
    """A mitigation method as hooks into the benchmark loop.

    Attributes:
        name: registry name (``--methods``).
        help: one line for tables and ``--list``.
        defaults: default hyperparameters (documented in the module docstring).
        setup: ``setup(model, optimizer, ctx) -> optimizer`` before Task 1 (freeze, wrap).
        before_task: ``before_task(ctx, t)`` before training task ``t >= 1``.
        batch: ``batch(ctx, batch) -> batch`` transform of each training batch (replay).
        loss_extra: ``loss_extra(model, batch, ctx) -> scalar | None`` added to the task loss.
        after_task: ``after_task(ctx, t)`` after task ``t`` (``t = 0``: on the Task-0 model).
        appends_rows: its ``batch`` hook appends rows that its ``loss_extra`` reads back (the
            curvature term's replay rows): in a combination it runs after every other part's
            ``batch`` hook, so no part replaces those rows (replay swaps a batch's last rows).
    """

    name: str
    help: str
    defaults: dict[str, Any] = field(default_factory=dict)
    setup: Hook = _keep_optimizer
    before_task: Hook = _noop
    batch: Hook = _keep_batch
    loss_extra: Hook | None = None
    after_task: Hook = _noop
    appends_rows: bool = False


METHODS: dict[str, Method] = {}

UNIT_COST: dict[str, float] = {
    "agem": 3.9, "pcgrad": 3.9, "planned": 1.8, "curvature": 1.6, "freeze-bottom+curvature": 1.2, "ogd": 1.2,
    "freeze-bottom": 0.7,
}
"""Wall time of one (method, seed) unit relative to ``seq``'s (measured: default biography
preset, run ``default-v4``, mean over seeds 0-2; ``pcgrad``: run ``default-v4-pcgrad-fresh5``,
seeds 3-7; unlisted methods count 1). Only the order in
which the worker processes take the units uses it (longest first, so no long unit starts last)."""


def register(name: str, help: str, **defaults: Any) -> Callable[[Callable[[], dict]], Method]:
    """Register the hooks returned by a factory under ``name``.

    The decorated function returns a dict of hooks (``setup``, ``before_task``, ``batch``,
    ``loss_extra``, ``after_task``; any subset)."""

    def deco(factory: Callable[[], dict]) -> Method:
        method = Method(name=name, help=help, defaults=dict(defaults), **factory())
        METHODS[name] = method
        return method

    return deco


def _mitigate(attr: str) -> Any:
    """``mitigate.<attr>``, or :class:`MethodUnavailable` when it cannot be imported."""
    try:
        import mitigate

        return getattr(mitigate, attr)
    except (ImportError, AttributeError) as err:
        raise MethodUnavailable(f"mitigate.{attr} is not available ({err})") from err


def _lib_kwargs(ctx: RunContext) -> dict[str, Any]:
    """The method's hyperparameters that go to the library constructor (all but the harness's
    own, :data:`HARNESS_KEYS`)."""
    return {k: v for k, v in ctx.hp.items() if k not in HARNESS_KEYS}


HARNESS_KEYS = ("consolidate_batches", "with_replay")
"""Hyperparameters the harness reads itself: how many batches a consolidation gets, and whether
the curvature term's replay rows ride in the training batch (``--hp curvature.with_replay=false``:
its own forward per step, as ``reg()`` alone does)."""


def bottom_layers(n_layers: int, spec: float | int) -> int:
    """Blocks to freeze of a model with ``n_layers`` blocks: an int as is, a float as that
    fraction of the blocks (at least one, and at least one left to train)."""
    if isinstance(spec, float):
        return max(1, min(n_layers - 1, int(round(spec * n_layers))))
    return int(spec)


# ============================================================================ the methods


@register("seq", "plain AdamW fine-tuning, task after task (baseline)")
def _seq() -> dict:
    return {}


@register("freeze-bottom", "freeze embeddings + bottom blocks after Task 0 (Zheng et al. 2025)",
          layers=0.75, embeddings=True)
def _freeze_bottom() -> dict:
    def setup(model, optimizer, ctx):
        n = bottom_layers(model.config.num_hidden_layers, ctx.hp["layers"])
        ctx.state["freeze_bottom"] = _mitigate("freeze_bottom_layers")(
            model, n, embeddings=bool(ctx.hp["embeddings"]))
        return optimizer

    return {"setup": setup}


@register("freeze-qk", "freeze every layer's Q/K projections after Task 0")
def _freeze_qk() -> dict:
    def setup(model, optimizer, ctx):
        ctx.state["freeze_qk"] = _mitigate("freeze_attention_qk")(model)
        return optimizer

    return {"setup": setup}


def _projection(mode: str) -> dict:
    def setup(model, optimizer, ctx):
        proj = _mitigate("GradientProjection")(optimizer, mode=mode, model=model, seed=ctx.seed,
                                               **_lib_kwargs(ctx))
        ctx.state["projection"] = proj
        return proj

    def after_task(ctx, t):
        ctx.state["projection"].remember(ctx.model, ctx.task_batches(t))

    return {"setup": setup, "after_task": after_task}


@register("agem", "A-GEM: project off the replay-memory gradient when it conflicts",
          memory_size=64, ref_every=1)
def _agem() -> dict:
    return _projection("agem")


@register("pcgrad", "PCGrad: the task gradient and a replay-memory gradient, each projected off "
          "the other where they conflict, summed")
def _pcgrad() -> dict:
    return _projection("pcgrad")


@register("ogd", "OGD: step orthogonally to earlier tasks' gradient directions",
          directions_per_task=16, max_basis=256)
def _ogd() -> dict:
    return _projection("ogd")


def _loss_term(cls_name: str, key: str, with_replay: bool = False, takes_batch: bool = False) -> dict:
    """Hooks of a loss-term method: build ``mitigate.<cls_name>`` at setup, ``consolidate`` on each
    finished task, add its penalty to the loss (kept in ``ctx.state[key]``). ``with_replay``:
    append the term's replay rows to each batch and read the penalty off that one forward
    (``CurvatureRegularizer.with_replay``, as the README's loop does). ``takes_batch``: call the
    term with the training batch (``EWC(model)`` calibrates λ on the first batch of each task)."""
    def setup(model, optimizer, ctx):
        ctx.state[key] = _mitigate(cls_name)(model, **_lib_kwargs(ctx))
        return optimizer

    def after_task(ctx, t):
        ctx.state[key].consolidate(ctx.task_batches(t))

    def fused(ctx: RunContext) -> bool:
        return with_replay and bool(ctx.hp.get("with_replay", True))

    def loss_extra(model, batch, ctx):
        if fused(ctx):
            return ctx.state[key](outputs=ctx.outputs)
        return ctx.state[key](batch) if takes_batch else ctx.state[key]()

    def batch(ctx, batch):
        return ctx.state[key].with_replay(batch) if fused(ctx) else batch

    return {"setup": setup, "after_task": after_task, "loss_extra": loss_extra, "batch": batch,
            "appends_rows": with_replay}


@register("curvature", "curvature regularizer: KL on stored old inputs + top Gauss-Newton anchor",
          consolidate_batches=2, with_replay=True)
def _curvature() -> dict:
    return _loss_term("CurvatureRegularizer", "curvature", with_replay=True)


@register("ewc", "EWC with the empirical Fisher (Kirkpatrick et al. 2017)",
          fisher="empirical", consolidate_batches=4)
def _ewc() -> dict:
    return _loss_term("EWC", "ewc", takes_batch=True)


@register("clip", "global gradient-norm clipping", max_norm=0.5)
def _clip() -> dict:
    def setup(model, optimizer, ctx):
        return _mitigate("GradientClipping")(optimizer, max_norm=ctx.hp["max_norm"])

    return {"setup": setup}


@register("replay", "replace a fraction of each batch's rows with earlier tasks' rows",
          fraction=0.25)
def _replay() -> dict:
    def after_task(ctx, t):
        ctx.state.setdefault("memory", []).extend(ctx.scenario.tasks[t].train)
        ctx.count_old(t, range(len(ctx.scenario.tasks[t].train)))  # the whole task is memory

    def batch(ctx, new):
        memory = ctx.state.get("memory")
        n = new["input_ids"].shape[0]
        k = int(round(ctx.hp["fraction"] * n))
        if not memory or k == 0:
            return new
        old = memory[ctx.rng.randrange(len(memory))]
        rows = torch.tensor(ctx.rng.sample(range(old["input_ids"].shape[0]),
                                           min(k, old["input_ids"].shape[0])))
        return mix_rows(new, {key: v[rows.to(v.device)] for key, v in old.items()})

    return {"after_task": after_task, "batch": batch}


def mix_rows(new: Batch, old: Batch) -> Batch:
    """``new`` with its last ``len(old)`` rows replaced by ``old``'s rows (right-padded to the
    longer length with ``attention_mask=0`` and ``labels=-100``; ``input_ids`` padded with the
    first pad value found, else 0)."""
    k = old["input_ids"].shape[0]
    length = max(new["input_ids"].shape[1], old["input_ids"].shape[1])
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}

    def pad(x: Tensor, key: str) -> Tensor:
        extra = length - x.shape[1]
        return x if extra == 0 else torch.nn.functional.pad(x, (0, extra), value=fill[key])

    return {key: torch.cat([pad(new[key], key)[: new[key].shape[0] - k],
                            pad(old[key].to(new[key].device), key)]) for key in new}


@register("lrcp", "Low-Rank Circuit Projection (optimizer wrapper; remember after each task)")
def _lrcp() -> dict:
    def setup(model, optimizer, ctx):
        lrcp = _mitigate("LowRankCircuitProjection")(optimizer, model, **_lib_kwargs(ctx))
        ctx.state["lrcp"] = lrcp
        return lrcp

    def after_task(ctx, t):
        ctx.state["lrcp"].remember(ctx.model, ctx.task_batches(t))

    return {"setup": setup, "after_task": after_task}


@register("planned", "mitigate.plan(): diagnose a short probe of Task 1, apply what it chose")
def _planned() -> dict:
    def setup(model, optimizer, ctx):
        old = ctx.task_batches(0)
        new = ctx.task_batches(1)
        opts = _lib_kwargs(ctx)
        opts.setdefault("probe_steps", min(20, ctx.scenario.steps_per_task))
        policy_cls = _mitigate("PlanPolicy")  # --hp planned.<PlanPolicy field>=... sets the policy
        fields = set(getattr(policy_cls, "__dataclass_fields__", ()))
        policy = {k: opts.pop(k) for k in list(opts) if k in fields}
        if policy:
            opts["policy"] = policy_cls(**policy)
        p = _mitigate("plan")(model, old, new, lr=ctx.scenario.lr, seed=ctx.seed, **opts)
        ctx.state["plan"] = p
        d = p.to_dict()
        # one timing step, the diagnosis probe, one verification probe per mitigated candidate
        # (the unmitigated candidate is the diagnosis probe), probe_steps each
        probed = sum(1 for c in d["candidates"] if c["freeze_bottom"] or c["protect"] or c["ewc_scale"])
        ctx.budget["extra_train_steps"] += 1 + (1 + probed) * opts["probe_steps"]
        ctx.state["report"] = {k: d[k] for k in ("freeze_bottom", "freeze_heads", "lrcp_targets", "ewc_scale", "curvature", "candidates", "reasons")}
        log.info("planned method:\n%s", p)
        applied = p.apply(model, optimizer)
        ctx.state["applied"] = applied
        return applied.optimizer

    def loss_extra(model, batch, ctx):
        return ctx.state["applied"].penalty()

    return {"setup": setup, "loss_extra": loss_extra}


def combine(name: str) -> Method:
    """The method ``a+b+...``: every part's hooks in order, each part with its own defaults
    (prefixed ``a.key`` in the combined defaults)."""
    parts = [get(p) for p in name.split("+")]
    defaults = {f"{p.name}.{k}": v for p in parts for k, v in p.defaults.items()}

    def sub(ctx: RunContext, p: Method) -> RunContext:
        # each part sees its own hyperparameters and its own state namespace
        hp = {k.split(".", 1)[1]: v for k, v in ctx.hp.items() if k.startswith(p.name + ".")}
        hp.setdefault("consolidate_batches", ctx.hp.get("consolidate_batches", 8))
        sub_ctx = ctx.state.setdefault(f"_ctx.{p.name}", None)
        if sub_ctx is None:
            # the parts' budgets (old examples, extra steps) count into the combination's, once
            sub_ctx = RunContext(model=ctx.model, scenario=ctx.scenario, device=ctx.device,
                                 seed=ctx.seed, hp=hp, rng=ctx.rng, budget=ctx.budget, _seen=ctx._seen)
            ctx.state[f"_ctx.{p.name}"] = sub_ctx
        sub_ctx.optimizer, sub_ctx.task, sub_ctx.outputs = ctx.optimizer, ctx.task, ctx.outputs
        return sub_ctx

    def setup(model, optimizer, ctx):
        for p in parts:
            optimizer = p.setup(model, optimizer, sub(ctx, p))
        return optimizer

    def before_task(ctx, t):
        for p in parts:
            p.before_task(sub(ctx, p), t)

    batch_order = sorted(parts, key=lambda p: p.appends_rows)  # stable: appended rows stay last

    def batch(ctx, b):
        for p in batch_order:
            b = p.batch(sub(ctx, p), b)
        return b

    extras = [p for p in parts if p.loss_extra is not None]

    def loss_extra(model, b, ctx):
        total = None
        for p in extras:
            term = p.loss_extra(model, b, sub(ctx, p))
            if term is not None:
                total = term if total is None else total + term
        for p in parts:  # the step's output is not kept past the loss
            ctx.state[f"_ctx.{p.name}"].outputs = None
        return total

    def after_task(ctx, t):
        for p in parts:
            p.after_task(sub(ctx, p), t)

    return Method(name=name, help=" + ".join(p.help.split(":")[0] for p in parts),
                  defaults=defaults, setup=setup, before_task=before_task, batch=batch,
                  loss_extra=loss_extra if extras else None, after_task=after_task,
                  appends_rows=any(p.appends_rows for p in parts))


def get(name: str) -> Method:
    """A registered method, or the combination ``a+b``.

    Raises:
        ValueError: an unknown name (lists the registered ones).
    """
    if name in METHODS:
        return METHODS[name]
    if "+" in name:
        return combine(name)
    raise ValueError(f"unknown method {name!r}; registered: {', '.join(METHODS)} "
                     "(combine with '+', e.g. 'freeze-bottom+curvature')")


DEFAULT_METHODS = ("seq", "freeze-bottom", "freeze-qk", "agem", "ogd", "curvature", "ewc",
                   "clip", "replay", "freeze-bottom+curvature", "lrcp", "planned")

# Methods a run uses when ``--methods`` is not given, per (scenario, preset); every other pair
# runs DEFAULT_METHODS. SmolLM2's reduced (CPU) preset leaves out what does not fit its hour on
# 2 CPU cores at 135 M parameters: ogd (a 16 × 135 M basis is 8.6 GB, streamed twice per step),
# curvature (a Gauss-Newton Lanczos on the full model at every task boundary) and
# planned (probes every candidate plan on a copy); name them with --methods to run them anyway.
SCENARIO_DEFAULT_METHODS: dict[tuple[str, str], tuple[str, ...]] = {
    ("smollm2", "quick"): ("seq", "freeze-bottom", "freeze-qk", "agem", "ewc", "clip", "replay", "lrcp"),
    # biography --quick: a smoke run of 2 seeds that still gives paired intervals in ~3 min:
    # seq, the seed's recipe, issue 13's three defaults and replay
    ("biography", "quick"): ("seq", "freeze-bottom", "agem", "curvature", "ewc", "replay"),
    # your own model (--model): the same eight on --quick; every method otherwise
    ("lm", "quick"): ("seq", "freeze-bottom", "freeze-qk", "agem", "ewc", "clip", "replay", "lrcp"),
}


def default_methods(scenario: str, preset: str) -> list[str]:
    """The methods run when ``--methods`` is not given (see :data:`SCENARIO_DEFAULT_METHODS`)."""
    return list(SCENARIO_DEFAULT_METHODS.get((scenario, preset), DEFAULT_METHODS))
