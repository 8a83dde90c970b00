"""Shared pieces of the integration tests and the torchrun workers: a tiny model, synthetic task
data, and the data-parallel launch helpers. Importable as ``ddp_workers._common`` from tests and
as ``_common`` from a worker script run by torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 64
SEQ = 12


def tiny_llama(seed: int = 0, *, hidden: int = 32, layers: int = 2, vocab: int = VOCAB) -> torch.nn.Module:
    """A 2-layer Llama with hidden 32 (eager attention: second-order AD works on CPU)."""
    cfg = AutoConfig.for_model(
        "llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.float()


def task_tokens(task: int, n: int, *, seq: int = SEQ, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """Synthetic task ``task``: sequences that count up by ``task + 1`` modulo ``vocab`` from a
    random start — each task is a different deterministic rule. Shape ``(n, seq)``."""
    g = torch.Generator().manual_seed(1000 * task + seed)
    start = torch.randint(vocab, (n, 1), generator=g)
    return (start + (task + 1) * torch.arange(seq)) % vocab


def lm_batch(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask", "labels"}`` for causal-LM training (no padding)."""
    return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens.clone()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``script`` under ``torch.distributed.run`` on CPU with ``nproc`` processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def exit_now(code: int | None) -> None:
    """End a torchrun worker with ``code`` right away, after flushing its output, skipping the
    interpreter's teardown: after ``destroy_process_group()`` a gloo background thread can still
    be joinable when the C++ statics are destroyed, which aborts a worker that already succeeded
    (``terminate called without an active exception``, SIGABRT; seen once in
    ``tests/test_projection_ddp.py`` with two CI runs sharing the cores)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))
