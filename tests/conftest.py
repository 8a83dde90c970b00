"""Shared test setup: tiny models run on one intra-op thread (faster, and timings stay sane on a
shared 2-core machine); the previous thread count is restored after each test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
