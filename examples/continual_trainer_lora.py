"""Continual LoRA fine-tuning with the Hugging Face ``Trainer`` and one mitigation.

A tiny Llama (built from a config; no download) with a word-level tokenizer built here from a
handful of symbols learns a list of digit maps modulo 10, one after another, as text::

    inc: "inc 3 = 4"     dec: "dec 3 = 2"     dbl: "dbl 3 = 6"     neg: "neg 3 = 7"

The tasks conflict on purpose: the same digit maps to a different answer in each task.

Each task is a fresh ``MitigationTrainer`` (fresh learning-rate schedule) sharing the same
``mitigations`` list, so the mitigation's state carries from task to task::

    mitigations = [mitigate.EWC(model, strength=...)]                  # --mitigation ewc
    mitigations = [OptimizerMitigation(mitigate.GradientProjection, mode="agem")]   # agem / ogd
    trainer = MitigationTrainer(model=model, args=args, train_dataset=ds, mitigations=mitigations)
    trainer.train()
    trainer.end_task(ds, max_batches=8)        # Fisher / replay memory of the finished task

With LoRA (PEFT) the mitigations see only the trainable adapter weights (``lora_A``/``lora_B``):
the Fisher, anchors and projection memory cover the adapters and nothing else. The script prints
answer accuracy on every task after every task, for the chosen mitigation and for no mitigation.

Run (CPU)::

    python examples/continual_trainer_lora.py --quick                  # CI size, < 1 minute
    python examples/continual_trainer_lora.py --mitigation agem --steps 300
    python examples/continual_trainer_lora.py --mitigation ogd --tasks inc,dbl,neg
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from dataclasses import dataclass

import datasets
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    PrinterCallback,
    PreTrainedTokenizerFast,
    TrainingArguments,
)

import mitigate
from mitigate.integrations import MitigationTrainer, OptimizerMitigation

OPS = {
    "inc": lambda a: (a + 1) % 10,
    "dec": lambda a: (a - 1) % 10,
    "dbl": lambda a: (2 * a) % 10,
    "neg": lambda a: (-a) % 10,
}


@dataclass
class Config:
    tasks: tuple[str, ...] = ("inc", "dec", "dbl")
    mitigation: str = "ewc"  # ewc | agem | ogd | none
    steps: int = 150  # optimizer steps per task
    batch_size: int = 32
    lr: float = 1e-2
    hidden: int = 64
    lora_rank: int = 8
    ewc_strength: float = 2000.0
    examples_per_task: int = 512
    consolidate_batches: int = 8
    seed: int = 0


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over digits, operators and four special tokens (built in memory)."""
    words = ["<pad>", "<s>", "</s>", "<unk>", "=", *[str(d) for d in range(10)], *OPS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def task_dataset(task: str, n: int, tokenizer: PreTrainedTokenizerFast, seed: int) -> Dataset:
    """``n`` examples ``"task a = c"``, tokenized (every example has 6 tokens)."""
    rng = random.Random(f"{task}-{seed}")
    text = [f"{task} {a} = {OPS[task](a)}" for a in (rng.randrange(10) for _ in range(n))]
    return Dataset.from_dict({"text": text}).map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])


@torch.no_grad()
def accuracy(model: torch.nn.Module, task: str, tokenizer: PreTrainedTokenizerFast) -> float:
    """Fraction of the 10 digits whose answer is the argmax after ``=``."""
    text = [f"{task} {a} = {OPS[task](a)}" for a in range(10)]
    enc = tokenizer(text, return_tensors="pt")
    was_training = model.training
    model.eval()
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    model.train(was_training)
    # tokens: <s> task a = c </s>; the answer c (index 4) is predicted at position 3
    pred = logits[:, 3].argmax(-1)
    return float((pred == enc["input_ids"][:, 4]).float().mean())


def build_model(cfg: Config, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.seed)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(base, lora)


def make_mitigations(cfg: Config, model: torch.nn.Module) -> list:
    if cfg.mitigation == "none":
        return []
    if cfg.mitigation == "ewc":
        return [mitigate.EWC(model, strength=cfg.ewc_strength)]
    if cfg.mitigation in ("agem", "ogd"):
        return [OptimizerMitigation(mitigate.GradientProjection, mode=cfg.mitigation)]
    raise ValueError(f"--mitigation {cfg.mitigation!r}: choose ewc, agem, ogd or none")


def run(cfg: Config, mitigation: str, tokenizer: PreTrainedTokenizerFast, out_dir: str) -> list[list[float]]:
    """Learn the tasks in order; returns ``acc[after_task][on_task]``."""
    cfg = Config(**{**cfg.__dict__, "mitigation": mitigation})
    model = build_model(cfg, tokenizer)
    mitigations = make_mitigations(cfg, model)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    history = []
    for i, task in enumerate(cfg.tasks):
        ds = task_dataset(task, cfg.examples_per_task, tokenizer, cfg.seed)
        args = TrainingArguments(
            output_dir=f"{out_dir}/{mitigation}/{task}", report_to=[], use_cpu=True, max_steps=cfg.steps,
            per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
            learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0, logging_steps=max(cfg.steps // 2, 1),
            save_strategy="no", seed=cfg.seed + i, disable_tqdm=True, log_level="error",
        )
        trainer = MitigationTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                                    mitigations=mitigations)
        trainer.remove_callback(PrinterCallback)  # the summary below is enough
        trainer.train()
        trainer.end_task(ds, max_batches=cfg.consolidate_batches)
        logs = [h for h in trainer.state.log_history if "loss" in h]
        extra = {k.removeprefix("mitigate/"): round(v, 4) for k, v in logs[-1].items() if k.startswith("mitigate/")}
        print(f"[{mitigation}] task {task}: train loss {logs[-1]['loss']:.3f} {extra if extra else ''}", flush=True)
        history.append([accuracy(model, t, tokenizer) for t in cfg.tasks])
    return history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: 2 tasks, 25 steps each")
    ap.add_argument("--tasks", default=",".join(Config.tasks), help=f"comma-separated, from {sorted(OPS)}")
    ap.add_argument("--mitigation", default=Config.mitigation, choices=["ewc", "agem", "ogd", "none"])
    ap.add_argument("--steps", type=int, default=Config.steps)
    ap.add_argument("--seed", type=int, default=Config.seed)
    a = ap.parse_args()
    tasks = tuple(t for t in a.tasks.split(",") if t)
    unknown = [t for t in tasks if t not in OPS]
    if unknown:
        ap.error(f"unknown task(s) {unknown}; choose from {sorted(OPS)}")
    cfg = Config(tasks=tasks, mitigation=a.mitigation, steps=a.steps, seed=a.seed)
    if a.quick:
        cfg.tasks, cfg.steps, cfg.examples_per_task, cfg.consolidate_batches = cfg.tasks[:2], 25, 256, 4
    logging.getLogger("transformers").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    tokenizer = build_tokenizer()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        results = {m: run(cfg, m, tokenizer, out_dir) for m in dict.fromkeys(["none", cfg.mitigation])}
    for name, hist in results.items():
        print(f"\n{name}: answer accuracy on task j (columns {list(cfg.tasks)}) after task i (rows)")
        for task, row in zip(cfg.tasks, hist):
            print(f"  after {task:>4}: " + "  ".join(f"{x:5.2f}" for x in row))
        if len(hist) > 1:
            drop = sum(hist[t][t] - hist[-1][t] for t in range(len(hist) - 1)) / (len(hist) - 1)
            print(f"  average forgetting (accuracy drop): {drop:+.3f}")
    print(f"\ndone in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
