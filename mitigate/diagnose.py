"""Diagnose forgetting between two saved checkpoints.

Usage::

    python -m mitigate.diagnose --before ckpt/task0 --after ckpt/task1 \\
        --data old_task.jsonl [--new-data new_task.jsonl] --out diagnosis/

``--before``/``--after`` are folders written by ``save_pretrained`` (causal LMs). ``--data`` is a
JSONL file of old-task examples, one object per line: ``{"text": "..."}`` (tokenized with the
tokenizer saved in ``--before``, else ``--tokenizer``), ``{"input_ids": [...]}``, or
``{"prompt": "...", "answer": "..."}`` (strings, or lists of token ids): the loss — and so the
gradient alignment and λ_max — is taken on the answer tokens only (prompt labels ``-100``), as
in prompt-masked fine-tuning. Writes
``report.json``, PNG plots and ``summary.md`` into ``--out`` (see
:func:`mitigate.diagnostics.report`).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("mitigate.diagnose")


@dataclass
class DiagnoseConfig:
    """Command-line settings (see ``python -m mitigate.diagnose --help``)."""

    before: str
    after: str
    data: str
    out: str
    new_data: str | None = None
    tokenizer: str | None = None
    batch_size: int = 8
    max_length: int = 128
    max_examples: int = 64
    device: str = "cpu"
    curvature: bool = True
    curvature_iters: int = 20
    plots: bool = True
    plain_cka: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_length", "max_examples", "curvature_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("before", "after"):
            if not Path(getattr(self, name)).is_dir():
                raise ValueError(f"--{name} {getattr(self, name)!r} is not a folder saved with save_pretrained")
        for name in ("data", "new_data"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"--{name.replace('_', '-')} {value!r} does not exist (a JSONL file)")


def _load_tokenizer(cfg: DiagnoseConfig) -> Any | None:
    from transformers import AutoTokenizer

    for source in (cfg.tokenizer, cfg.before):
        if source is None:
            continue
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            logger.info("no tokenizer in %s (%s)", source, err)
    return None


def _ids(value: Any, tokenizer: Any | None, where: str, *, special: bool) -> list[int]:
    """Token ids of a JSONL field: a list of ints as is, a string through ``tokenizer``."""
    if isinstance(value, list):
        return [int(i) for i in value]
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string or a list of token ids, got {type(value).__name__}")
    if tokenizer is None:
        raise ValueError(
            f"{where} is text but no tokenizer was found; save one in --before or pass --tokenizer, or give token ids"
        )
    return list(tokenizer(value, add_special_tokens=special)["input_ids"])


def load_jsonl_batches(
    path: str, tokenizer: Any | None, *, batch_size: int, max_length: int, max_examples: int, pad_id: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Read JSONL lines into right-padded batches with ``labels`` (``-100`` at padding).

    Each line is one of ``{"text": str}`` or ``{"input_ids": [int, ...]}`` (loss on every token),
    or ``{"prompt": ..., "answer": ...}`` (strings, or lists of token ids): ``input_ids`` is the
    prompt (with the tokenizer's special tokens) followed by the answer (without), and
    ``labels`` is ``-100`` on the prompt, so ``model(**batch).loss`` is the answer-only loss of
    prompt-masked fine-tuning. A row longer than ``max_length`` keeps its end (the prompt is cut
    from the left, so the answer survives).

    Returns:
        Batches ``{"input_ids", "attention_mask", "labels"}``, each ``(B, T)`` long tensors.

    Raises:
        ValueError: a line without ``text``/``input_ids``/``prompt``+``answer``, text without a
            tokenizer, an empty answer, or no examples.
    """
    rows: list[tuple[list[int], list[int]]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            where = f"{path}:{lineno}"
            if "prompt" in obj or "answer" in obj:
                if not ("prompt" in obj and "answer" in obj):
                    raise ValueError(f"{where}: a prompt/answer row needs both 'prompt' and 'answer', got keys {sorted(obj)}")
                prompt = _ids(obj["prompt"], tokenizer, f"{where} 'prompt'", special=True)
                answer = _ids(obj["answer"], tokenizer, f"{where} 'answer'", special=False)
                if not answer:
                    raise ValueError(f"{where}: 'answer' is empty (the loss is taken on the answer tokens only)")
                ids = (prompt + answer)[-max_length:]
                labels = ([-100] * len(prompt) + answer)[-max_length:]
            elif "input_ids" in obj:
                ids = [int(i) for i in obj["input_ids"]][:max_length]
                labels = list(ids)
            elif "text" in obj:
                ids = _ids(obj["text"], tokenizer, f"{where} 'text'", special=True)[:max_length]
                labels = list(ids)
            else:
                raise ValueError(f"{where}: each line needs 'text', 'input_ids' or 'prompt' + 'answer', got keys {sorted(obj)}")
            if ids:
                rows.append((ids, labels))
            if len(rows) >= max_examples:
                break
    if not rows:
        raise ValueError(f"{path} holds no examples")
    batches = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        length = max(len(r) for r, _ in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), length), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for j, (r, lab) in enumerate(chunk):
            ids[j, : len(r)] = torch.tensor(r)
            labels[j, : len(r)] = torch.tensor(lab)
            mask[j, : len(r)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def parse_args(argv: Sequence[str] | None = None) -> DiagnoseConfig:
    """Parse the command line into a :class:`DiagnoseConfig`."""
    p = argparse.ArgumentParser(
        prog="python -m mitigate.diagnose", description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--before", required=True, help="checkpoint before the new task (save_pretrained folder)")
    p.add_argument("--after", required=True, help="checkpoint after the new task")
    p.add_argument("--data", required=True, help="JSONL of old-task examples ({'text'}, {'input_ids'} or {'prompt', 'answer'}: answer-only loss)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--new-data", default=None, help="JSONL of new-task examples (enables gradient alignment)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder when --before has none")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-examples", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-curvature", action="store_true", help="skip the λ_max section (the slowest)")
    p.add_argument("--curvature-iters", type=int, default=20, help="Lanczos iterations for λ_max")
    p.add_argument("--plain-cka", action="store_true", help="plain linear CKA (default: token-normalised, robust to massive activations)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")
    a = p.parse_args(argv)
    return DiagnoseConfig(
        before=a.before,
        after=a.after,
        data=a.data,
        out=a.out,
        new_data=a.new_data,
        tokenizer=a.tokenizer,
        batch_size=a.batch_size,
        max_length=a.max_length,
        max_examples=a.max_examples,
        device=a.device,
        curvature=not a.no_curvature,
        curvature_iters=a.curvature_iters,
        plots=not a.no_plots,
        plain_cka=a.plain_cka,
    )


def run(cfg: DiagnoseConfig) -> dict[str, Any]:
    """Load both checkpoints (eager attention), read the data and write the report."""
    from transformers import AutoModelForCausalLM

    from mitigate.diagnostics.report import report

    tok = _load_tokenizer(cfg)
    pad_id = 0
    if tok is not None and getattr(tok, "pad_token_id", None) is not None:
        pad_id = int(tok.pad_token_id)
    kw = dict(batch_size=cfg.batch_size, max_length=cfg.max_length, max_examples=cfg.max_examples, pad_id=pad_id)
    old = load_jsonl_batches(cfg.data, tok, **kw)
    new = load_jsonl_batches(cfg.new_data, tok, **kw) if cfg.new_data else None
    models = []
    for path in (cfg.before, cfg.after):
        m = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").to(cfg.device)
        m.eval()
        models.append(m)
    logger.info("diagnosing %s -> %s on %d old-task batches", cfg.before, cfg.after, len(old))
    return report(
        models[0],
        models[1],
        old_batches=old,
        new_batches=new,
        out_dir=cfg.out,
        curvature=cfg.curvature,
        curvature_kwargs={"max_iter": cfg.curvature_iters},
        plots=cfg.plots,
        cka_token_norm=not cfg.plain_cka,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m mitigate.diagnose``; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # matplotlib's category axis logs one INFO line per string tick ("Using categorical units ..."):
    # quiet it here, in the CLI that turns INFO on, not in the library
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    cfg = parse_args(argv)
    rep = run(cfg)
    logger.info("wrote %s", ", ".join(rep["files"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
