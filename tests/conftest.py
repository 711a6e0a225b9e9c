"""Shared fixtures: tiny random-weight models built locally (no downloads), seeded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never reach a model hub: a hub id resolves through a cache the test lays out by hand.
os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from services.demo.tiny import build_model

    return build_model(tmp_path_factory.mktemp("tiny-llama"), family="llama", hidden=64, layers=2)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    from services.demo.tiny import build_model

    return build_model(tmp_path_factory.mktemp("tiny-qwen2"), family="qwen2", hidden=64, layers=2,
                       heads=4, kv_heads=2, seed=1)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request, tiny_llama, tiny_qwen2) -> Path:
    return tiny_llama if request.param == "llama" else tiny_qwen2


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> Path:
    from services.demo.tiny import build_model

    return build_model(tmp_path_factory.mktemp("tiny-student"), family="llama", hidden=32, layers=1,
                       heads=2, seed=7)


def lay_out_hub_repo(cache: Path, hub_id: str, src: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put the files of model directory `src` into hub cache `cache` as the hub client lays them
    out: blobs by content hash, snapshots/<commit>/ of relative links to them, refs/<name> holding
    the commit. Returns the snapshot directory."""
    import hashlib
    import shutil

    repo = cache / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for f in sorted(p for p in Path(src).iterdir() if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # the hub client writes no newline
    return snapshot


@dataclass(frozen=True)
class HubCache:
    """A hand-laid hub cache (`path`) and what it holds; `lay_out` adds a repository to any cache."""

    path: Path
    student_commit: str = "1" * 40
    teacher_commit: str = "2" * 40
    lay_out = staticmethod(lay_out_hub_repo)


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory, tiny_llama, tiny_student) -> HubCache:
    """A hub cache holding tiny-org/student (tiny_student, tags main and v1) and tiny-org/teacher
    (tiny_llama, main). Tests point HF_HUB_CACHE at it; nothing is ever downloaded."""
    hub = HubCache(tmp_path_factory.mktemp("hf") / "hub")
    lay_out_hub_repo(hub.path, "tiny-org/student", tiny_student, hub.student_commit, refs=("main", "v1"))
    lay_out_hub_repo(hub.path, "tiny-org/teacher", tiny_llama, hub.teacher_commit)
    return hub
