"""Any local causal LM on any task sequence: the path behind ``compare.py --model DIR --tasks ...``.

This is how you choose a mitigation for *your* job: the same methods, statistics and report as
the built-in scenarios, on your model and your data::

    python benchmarks/compare.py --model path/to/hf-model --tasks old.jsonl new1.jsonl new2.jsonl
    python benchmarks/compare.py --model path/to/hf-model --lora --tasks a.jsonl b.jsonl --seeds 3
    python benchmarks/compare.py --model DIR --tasks a.jsonl b.jsonl --describe   # items, no training

Task files (JSON lines, one example a line; one kind per file):

* ``{"prompt": "...", "answer": "..."}``: the loss and the accuracy cover the answer tokens (and
  the closing end-of-sequence token) only; ``input = prompt + answer`` as written (put the space
  or newline you want between them in your text), ``labels = -100`` on the prompt.
  ``accuracy`` is greedy exact match of the answer from one teacher-forced pass, ``loss`` the
  mean answer NLL, and the per-item results feed the paired McNemar tests.
* ``{"text": "..."}``: language modelling on every token; ``accuracy`` is next-token top-1
  accuracy and ``loss`` the NLL on held-out texts (no per-item exact match).

Each file is split, deterministically in the run's seed, into training rows and
``--eval-fraction`` held-out rows (at least one); the held-out rows are scored, never trained on. The first file is Task 0: the harness fine-tunes the model on it
first (``--task0-steps 0``: the model already knows it, score it as is), then compares the
methods on the later files. General capability is checked on held-out text
(``--general FILE.jsonl`` of ``text`` rows; default: English prose from the Python standard
library's docstrings, ``benchmarks/stdlib_text.py``) as ``general_nll`` / ``general_top1``.

Weights are loaded with ``AutoModelForCausalLM.from_pretrained(DIR, attn_implementation="eager")``
(second-order diagnostics need eager attention), in float32, and never downloaded.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.biography import answer_accuracy
from benchmarks.scenario import Scenario, ScenarioUnavailable, Task, batch_examples

log = logging.getLogger(__name__)

QA = tuple[str, str]  # (prompt, answer)
Example = tuple[list[int], list[int]]  # (input ids, labels with -100 outside the loss)
LORA_DEFAULT: dict = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)


@dataclass
class TaskData:
    """Text of one task: training rows and named evaluation sets (``"accuracy"`` is computed on
    ``evals["main"]``; every other entry is reported under its own name).

    Attributes:
        name: the task's name in tables.
        train: training rows: ``(prompt, answer)`` pairs, or texts when ``kind == "text"``.
        evals: evaluation sets of the same kind of rows.
        kind: ``"qa"`` (loss on the answer) or ``"text"`` (loss on every token).
    """

    name: str
    train: list
    evals: dict[str, list]
    kind: str = "qa"


# ============================================================================ reading tasks


def read_jsonl_task(path: str | Path) -> tuple[str, list]:
    """The rows of one task file: ``("qa", [(prompt, answer), ...])`` or ``("text", [text, ...])``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty file, a line that is not a JSON object, a row with neither
            ``prompt``/``answer`` nor ``text`` (names the line), an empty answer or text, or rows
            of both kinds in one file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {str(path)!r} does not exist")
    kinds: set[str] = set()
    rows: list = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err.msg}); one JSON object per line") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: {type(row).__name__}, expected an object like "
                             '{"prompt": ..., "answer": ...} or {"text": ...}')
        if "prompt" in row or "answer" in row:
            p, a = row.get("prompt"), row.get("answer")
            if not isinstance(p, str) or not isinstance(a, str) or not a.strip():
                raise ValueError(f"{path}:{n}: a prompt/answer row needs a string prompt and a "
                                 f"non-empty string answer, got prompt={p!r}, answer={a!r}")
            kinds.add("qa")
            rows.append((p, a))
        elif "text" in row:
            t = row["text"]
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"{path}:{n}: text={t!r} must be a non-empty string")
            kinds.add("text")
            rows.append(t)
        else:
            raise ValueError(f"{path}:{n}: keys {sorted(row)}; a row needs 'prompt' and 'answer', "
                             "or 'text'")
    if not rows:
        raise ValueError(f"task file {str(path)!r} has no rows")
    if len(kinds) > 1:
        raise ValueError(f"task file {str(path)!r} mixes prompt/answer rows and text rows; "
                         "put each kind in its own file")
    return kinds.pop(), rows


def split_rows(rows: Sequence, eval_fraction: float, seed: int) -> tuple[list, list]:
    """``(train, held_out)``: a seeded shuffle, then ``max(1, round(eval_fraction · n))``
    held-out rows (the rest, at least one, train).

    Raises:
        ValueError: fewer than 2 rows, or ``eval_fraction`` outside (0, 1).
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction!r} must be in (0, 1), e.g. 0.2")
    if len(rows) < 2:
        raise ValueError(f"{len(rows)} row(s): a task needs at least 2 (one to train, one to score)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    k = min(len(rows) - 1, max(1, round(eval_fraction * len(rows))))
    held = sorted(order[:k])
    train = [rows[i] for i in sorted(order[k:])]
    return train, [rows[i] for i in held]


def file_digest(path: str | Path) -> str:
    """Short SHA-256 of a file's bytes (the task-0 cache key follows the data)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# ============================================================================ tokenization


class PlainCodec:
    """Token ids of ``prompt + answer + eos`` rows (labels on the answer and ``eos``) and of text
    rows (labels on every token), for any Hugging Face tokenizer.

    Args:
        tokenizer: a tokenizer with an ``eos_token_id``.
        max_length: longest example in tokens; a longer prompt/answer row raises ``ValueError``,
            a longer text is cut to it.

    Raises:
        ValueError: the tokenizer has no end-of-sequence token.
    """

    def __init__(self, tokenizer, max_length: int = 256) -> None:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id: set tokenizer.eos_token (and save "
                             "it with the model) so answers have an end")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.end_id = int(eos)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = self.end_id if pad is None else int(pad)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids that precede the answer (subclasses add a template)."""
        return self.encode(prompt)

    def answer_ids(self, answer: str) -> list[int]:
        """The ids of the answer."""
        return self.encode(answer)

    def example(self, prompt: str, answer: str) -> Example:
        """``(input_ids, labels)`` of one prompt/answer row: ``prompt_ids + answer_ids + [end]``,
        labels on the answer and the end token, -100 before.

        Raises:
            ValueError: an answer with no tokens, or a row longer than ``max_length``.
        """
        p, a = self.prompt_ids(prompt), self.answer_ids(answer)
        if not a:
            raise ValueError(f"answer {answer!r} of {prompt!r} has no tokens")
        ids = p + a + [self.end_id]
        if len(ids) > self.max_length:
            raise ValueError(f"example of {len(ids)} tokens exceeds max_length={self.max_length}: "
                             f"{prompt[:60]!r} -> {answer[:60]!r}; shorten the row")
        return ids, [-100] * len(p) + a + [self.end_id]

    def text_example(self, text: str) -> Example:
        """``(ids, ids)`` of a text row, cut to ``max_length`` tokens."""
        ids = self.encode(text)[: self.max_length]
        return ids, list(ids)

    def batches(self, pairs: Sequence[QA], batch_size: int, rng: random.Random | None = None
                ) -> list[dict[str, torch.Tensor]]:
        """Right-padded batches of prompt/answer rows (shuffled with ``rng`` when given)."""
        return batch_examples([self.example(p, a) for p, a in pairs], batch_size, self.pad_id, rng)

    def text_batches(self, texts: Sequence[str], batch_size: int, rng: random.Random | None = None
                     ) -> list[dict[str, torch.Tensor]]:
        """Right-padded language-modelling batches of text rows."""
        return batch_examples([self.text_example(t) for t in texts], batch_size, self.pad_id, rng)


# ============================================================================ the scenario


@dataclass
class LMSettings:
    """Training and evaluation settings of an LM scenario (saved in ``Scenario.config``).

    Attributes:
        steps_per_task / task0_steps: optimizer steps per later task and for Task 0
            (``task0_steps=0``: the model already knows Task 0, it is scored as loaded).
        batch_size / eval_batch_size: training and evaluation batch sizes.
        lr / lora_lr: AdamW learning rates of full fine-tuning and of LoRA.
        lora: LoRA config kwargs for ``peft.LoraConfig`` when fine-tuning with LoRA, else ``None``.
        curve_every / curve_steps: Task-0 evaluation cadence over the first steps of Task 1.
        probe_examples / recovery_examples: sizes of the diagnostic and recovery sets.
        cka_token_norm: RMS-normalise tokens in the CKA diagnostic (pretrained LMs' massive
            activations otherwise pin it at 1).
    """

    steps_per_task: int = 100
    task0_steps: int = 100
    batch_size: int = 8
    eval_batch_size: int = 32
    lr: float = 1e-4
    lora_lr: float = 1e-3
    lora: dict | None = None
    curve_every: int = 10
    curve_steps: int = 100
    probe_examples: int = 16
    recovery_examples: int = 10
    cka_token_norm: bool = True

    def __post_init__(self) -> None:
        for name in ("steps_per_task", "batch_size", "eval_batch_size", "probe_examples",
                     "recovery_examples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive int")
        if isinstance(self.task0_steps, bool) or not isinstance(self.task0_steps, int) or self.task0_steps < 0:
            raise ValueError(f"task0_steps={self.task0_steps!r} must be an int >= 0 (0: the model knows Task 0)")
        for name in ("lr", "lora_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v!r} must be a finite number > 0")


class TextRetention:
    """Next-token NLL and top-1 accuracy of a model on fixed text (lower NLL: more retained).

    ``nll = mean_t −log p(x_t | x_<t)`` over every predicted token of every passage (token
    weighted), ``top1 = mean_t [argmax p(· | x_<t) = x_t]``. Both come from one pass; the last
    result is kept for a model whose parameters are unchanged (checked by a checksum of every
    parameter), so asking for ``nll`` then ``top1`` costs one pass.

    Args:
        batches: right-padded batches with ``input_ids``, ``attention_mask`` and ``labels``
            (-100 on padding).
    """

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches
        self.tokens = int(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
        self._last: tuple[tuple, dict[str, float]] | None = None

    @staticmethod
    def _fingerprint(model: nn.Module) -> tuple:
        with torch.no_grad():
            total = sum(float(p.double().sum()) for p in model.parameters())
        return id(model), total

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict[str, float]:
        """``{"nll": ..., "top1": ...}`` of ``model`` (train/eval mode restored)."""
        key = self._fingerprint(model)
        if self._last is not None and self._last[0] == key:
            return dict(self._last[1])
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        nll = hits = count = 0.0
        try:
            for batch in self.batches:
                ids = batch["input_ids"].to(device)
                logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)
                               ).logits[:, :-1].float()  # (B, L-1, V)
                target = batch["labels"][:, 1:].to(device)  # (B, L-1)
                keep = target != -100
                logp = torch.log_softmax(logits, -1)
                tok = -logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
                nll += float(tok[keep].sum())
                hits += float((logits.argmax(-1) == target)[keep].sum())
                count += float(keep.sum())
        finally:
            model.train(was_training)
        result = {"nll": nll / max(count, 1.0), "top1": hits / max(count, 1.0)}
        self._last = (key, result)
        return dict(result)


def _task(data: TaskData, codec: Any, s: LMSettings, rng: random.Random) -> Task:
    """One :class:`Task` from its rows: training batches, scored sets, probe and recovery sets
    (recovery rows are training rows outside every scored set)."""
    text = data.kind == "text"
    make = codec.text_batches if text else codec.batches
    train = make(data.train, s.batch_size, random.Random(rng.random()))
    evals = {k: make(v, s.eval_batch_size) for k, v in data.evals.items()}
    pick = random.Random(rng.random())
    main = data.evals["main"]
    probe = make(pick.sample(main, min(s.probe_examples, len(main))), s.probe_examples)
    scored = {r for v in data.evals.values() for r in v}
    pool = sorted(set(data.train) - scored)
    if len(pool) < s.recovery_examples:  # too few unscored rows: any training rows
        pool = sorted(set(data.train))
    recovery = make(pick.sample(pool, min(s.recovery_examples, len(pool))), s.recovery_examples)
    if text:
        retention = {k: TextRetention(v) for k, v in evals.items()}

        def evaluate(model: nn.Module, _r=retention) -> dict[str, Any]:
            m = _r["main"].measure(model)
            out: dict[str, Any] = {"accuracy": m["top1"], "loss": m["nll"]}
            for key, r in _r.items():
                if key != "main":
                    out[key] = r.measure(model)["top1"]
            return out
    else:
        def evaluate(model: nn.Module, _evals=evals) -> dict[str, Any]:
            out = answer_accuracy(model, _evals["main"], codec.end_id)
            for key, batches in _evals.items():
                if key != "main":
                    out[key] = answer_accuracy(model, batches, codec.end_id)["accuracy"]
            return out

    return Task(name=data.name, train=train, evaluate=evaluate, probe=probe, recovery=recovery)


def assemble_scenario(base: nn.Module, codec: Any, tasks: Sequence[TaskData], settings: LMSettings,
                      *, name: str, seed: int, extra_evals: dict[str, Callable[[nn.Module], float]],
                      config: dict, notes: str, full_lr: float | None = None) -> Scenario:
    """The :class:`Scenario` of a loaded causal LM on a task sequence (``smollm2`` and
    ``--model`` runs are both built here).

    Args:
        base: the starting model (copied by ``model_factory``; never trained here).
        codec: turns rows into batches (:class:`PlainCodec`, or ``smollm2.ChatCodec``).
        tasks: Task 0 .. T.
        settings: steps, batch sizes, learning rates, LoRA.
        name / seed / extra_evals / config / notes: as in :class:`Scenario`.
        full_lr: lr of updates of every weight (recovery probe) when ``settings.lora`` is set.
    """
    if len(tasks) < 2:
        raise ValueError(f"{len(tasks)} task(s): a sequence needs at least 2 (Task 0 and a later one)")
    rng = random.Random(seed)
    built = [_task(d, codec, settings, rng) for d in tasks]

    def model_factory() -> nn.Module:
        return copy.deepcopy(base).float().train()

    return Scenario(
        name=name,
        model_factory=model_factory,
        tasks=built,
        steps_per_task=settings.steps_per_task,
        lr=settings.lora_lr if settings.lora else settings.lr,
        extra_evals=extra_evals,
        first_task_pretrained=settings.task0_steps == 0,
        lora=copy.deepcopy(settings.lora),
        notes=notes,
        task0_steps=settings.task0_steps or None,
        task0_curve_every=settings.curve_every,
        task0_curve_steps=settings.curve_steps,
        config=config,
        # one thread: on a shared 2-core machine two threads' hand-offs made LM steps slower
        cpu_threads=1,
        full_lr=full_lr if full_lr is not None else settings.lr,
        cka_token_norm=settings.cka_token_norm,
    )


def general_text(path: str | Path | None) -> tuple[list[str], str]:
    """Held-out text for the general-capability check: ``text`` rows of ``path``, else the
    standard library's English docstring prose; with an id of the set."""
    if path is not None:
        kind, rows = read_jsonl_task(path)
        if kind != "text":
            raise ValueError(f"--general {str(path)!r} must hold text rows ({{\"text\": ...}})")
        return rows, f"{Path(path).name}:{file_digest(path)}"
    from benchmarks.stdlib_text import passage_set_id, stdlib_passages

    passages = stdlib_passages(128)
    return passages, f"stdlib:{passage_set_id(passages)}"


def load_model(model_dir: str | Path) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local Hugging Face directory, eager attention, float32.

    Raises:
        ScenarioUnavailable: the directory does not exist or holds no loadable causal LM.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise ScenarioUnavailable(f"--model {str(path)!r} is not a directory (a save_pretrained folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                     attn_implementation="eager",
                                                     torch_dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ScenarioUnavailable(f"--model {str(path)!r}: {err}") from err
    return model.eval(), tokenizer


@dataclass
class TaskFiles:
    """The files of a ``--model`` run and how each is split.

    Attributes:
        paths: Task 0's file first, then the later tasks'.
        eval_fraction: share of each file held out for scoring.
        general: text rows for the general-capability check (``None``: stdlib prose).
        general_tokens: tokens per general passage.
    """

    paths: list[str]
    eval_fraction: float = 0.2
    general: str | None = None
    general_tokens: int = 128
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.paths) < 2:
            raise ValueError(f"--tasks got {len(self.paths)} file(s): give Task 0's file and at least one later task's")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction!r} must be in (0, 1), e.g. 0.2")
        if not self.names:
            stems = [Path(p).stem for p in self.paths]
            self.names = [s if stems.count(s) == 1 else f"{s}{i}" for i, s in enumerate(stems)]


def task_data(files: TaskFiles, seed: int) -> list[TaskData]:
    """Every task's rows, split into training rows and held-out rows (seeded)."""
    out = []
    for i, (path, name) in enumerate(zip(files.paths, files.names)):
        kind, rows = read_jsonl_task(path)
        train, held = split_rows(rows, files.eval_fraction, seed * 1000 + i)
        out.append(TaskData(name=name, train=train, evals={"main": held}, kind=kind))
    return out


def describe(files: TaskFiles, seed: int = 0) -> dict:
    """The tasks and their scored items from the files alone (no model, no tokenizer)."""
    tasks = [{"name": d.name, "kind": d.kind, "eval_items": len(d.evals["main"]),
              "train_examples": len(d.train)} for d in task_data(files, seed)]
    rows, _ = general_text(files.general)
    return {"tasks": tasks,
            "general": [{"name": "general_nll", "items": len(rows) * files.general_tokens,
                         "unit": "tokens (at most)"}]}


def build_scenario(model_dir: str | Path, files: TaskFiles, settings: LMSettings, seed: int = 0
                   ) -> Scenario:
    """The ``--model DIR --tasks ...`` scenario (see the module doc).

    Raises:
        ScenarioUnavailable: the model cannot be loaded.
        ValueError / FileNotFoundError: a bad task file (named, with the line).
    """
    data = task_data(files, seed)  # read and check the files before loading any weights
    base, tokenizer = load_model(model_dir)
    codec = PlainCodec(tokenizer, max_length=_max_length(base))
    rows, set_id = general_text(files.general)
    general = TextRetention(PlainCodec(tokenizer, max_length=min(files.general_tokens, codec.max_length))
                            .text_batches(rows, settings.eval_batch_size))
    extra = {"general_nll": lambda m: general.measure(m)["nll"],
             "general_top1": lambda m: general.measure(m)["top1"]}
    weights = sorted(p.name for p in Path(model_dir).glob("*.safetensors")) or sorted(
        p.name for p in Path(model_dir).glob("*.bin"))
    model_meta = {"dir": str(Path(model_dir).resolve()), "weights": weights,
                  "digest": hashlib.sha256(b"".join(
                      (Path(model_dir) / w).read_bytes()[:1 << 20] for w in weights)).hexdigest()[:16],
                  "model_type": getattr(base.config, "model_type", None),
                  "parameters": sum(p.numel() for p in base.parameters())}
    config = {"scenario": "lm", "seed": seed, "model": model_meta,
              "tasks": [{"name": n, "file": str(p), "digest": file_digest(p)}
                        for n, p in zip(files.names, files.paths)],
              "eval_fraction": files.eval_fraction, "general": set_id,
              "general_tokens": general.tokens, **settings.__dict__, "version": 1}
    kind = "LoRA" if settings.lora else "full fine-tuning"
    notes = (f"{model_meta['model_type']} from {Path(model_dir).name} "
             f"({model_meta['parameters'] / 1e6:.1f} M parameters): {' -> '.join(files.names)}, "
             f"{settings.steps_per_task} steps/task ({kind}), batch {settings.batch_size}; "
             f"general text: {general.tokens} held-out tokens")
    return assemble_scenario(base, codec, data, settings, name="lm", seed=seed, extra_evals=extra,
                             config=config, notes=notes)


def _max_length(model: nn.Module) -> int:
    n = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return int(min(n or 512, 512))
