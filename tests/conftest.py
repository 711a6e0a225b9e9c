"""Shared fixtures: tiny random-weight models built locally (no downloads), seeded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from teacher_server.tiny import build_model

    return build_model(tmp_path_factory.mktemp("tiny-llama"), family="llama", hidden=64, layers=2)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    from teacher_server.tiny import build_model

    return build_model(tmp_path_factory.mktemp("tiny-qwen2"), family="qwen2", hidden=64, layers=2,
                       heads=4, kv_heads=2, seed=1)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request, tiny_llama, tiny_qwen2) -> Path:
    return tiny_llama if request.param == "llama" else tiny_qwen2


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> Path:
    from teacher_server.tiny import build_model

    return build_model(tmp_path_factory.mktemp("tiny-student"), family="llama", hidden=32, layers=1,
                       heads=2, seed=7)
