"""Model directories, for the teacher and the student alike: where a reference points, whether
the directory is loadable, and the fingerprint of its tokenizer.

    model = resolve_model("Qwen/Qwen2.5-0.5B-Instruct", revision="main")  # the snapshot directory
    model = resolve_model("/models/my-student")                           # a directory is itself
    check_model_dir(model.path)
    fingerprint, n_tokens = load_tokenizer_facts(model.path)              # ("", None) without a tokenizer

Rules (docs/training.md, "Models"):
- A reference naming an existing directory is that directory, whatever its shape.
- Otherwise one shaped like a hub id (`org/name`) is looked up in the hub cache, laid out as the
  hub client lays it: `models--org--name/refs/<branch or tag>` holds a commit hash,
  `models--org--name/snapshots/<commit>/` the files. The cache is HF_HUB_CACHE, else HF_HOME/hub,
  else ~/.cache/huggingface/hub, read when a reference is resolved (not at import).
- `revision` (a branch, tag or commit; default main) applies to hub ids only.
- A reference missing from the cache is downloaded only when downloads are allowed
  (DISTILLERY_ALLOW_DOWNLOADS=1; the job service leaves it off, `distillery train` turns it on),
  and then only configs, tokenizer files and safetensors weights.

Tokenizers are compared by `tokenizer_fingerprint` (vocabulary and special tokens): the teacher
reports its own in TeacherInfo, and the student refuses a teacher whose fingerprint differs.

Nothing here imports torch or transformers at load, so the job service can check references at
submit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

ALLOW_DOWNLOADS_ENV = "DISTILLERY_ALLOW_DOWNLOADS"
TRUE_WORDS = ("1", "true", "yes", "on")
# The hub's own rules: letters, digits, - _ . in each part, starting and ending with a letter or
# digit (or _), no "--" or ".." (they would break the cache's models--org--name folder names), at
# most 96 characters a part.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"^(?!.*(--|\.\.)){_PART}/{_PART}$")
# A branch, tag or commit. Joined into the cache's refs/ folder, so no ".." and no leading "/".
REVISION = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_./-]{0,127}$")
# What a download fetches: configs, tokenizer files (json, sentencepiece, merges / vocab text,
# tiktoken, chat templates) and safetensors weights; never pickled weights or other formats.
DOWNLOAD_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class ModelNotCached(FileNotFoundError):
    """A hub id whose revision is not in the hub cache, and downloads are off."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model reference points: `path` is a directory; `hub_id` / `commit` for hub ids."""

    ref: str
    path: Path
    hub_id: str | None = None
    commit: str | None = None

    def describe(self) -> str:
        return f"{self.hub_id} @ {self.commit} ({self.path})" if self.hub_id else str(self.path)


def hub_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The hub cache the hub client itself would use under `env` (default os.environ)."""
    e = os.environ if env is None else env
    if e.get("HF_HUB_CACHE"):
        return Path(e["HF_HUB_CACHE"]).expanduser()
    home = Path(e["HF_HOME"]).expanduser() if e.get("HF_HOME") else Path.home() / ".cache" / "huggingface"
    return home / "hub"


def downloads_allowed(env: Mapping[str, str] | None = None) -> bool:
    e = os.environ if env is None else env
    return e.get(ALLOW_DOWNLOADS_ENV, "0").strip().lower() in TRUE_WORDS


def is_hub_id(ref: str) -> bool:
    """Shaped like `org/name` (it may still be a relative directory; see `resolve_model`)."""
    return bool(HUB_ID.match(ref))


def check_revision(revision: str | None) -> None:
    if revision is not None and not REVISION.match(revision):
        raise ValueError(f"revision {revision[:140]!r} is not a branch, tag or commit name")


def resolve_model(ref: str, revision: str | None = None, *, allow_downloads: bool | None = None,
                  cache_dir: str | Path | None = None) -> ResolvedModel:
    """The directory `ref` names (see the module docstring); nothing is checked inside it.

    Raises ModelNotCached for a hub id not in the cache when downloads are off (the default is
    `downloads_allowed()`), and ValueError for a `revision` given with a directory."""
    check_revision(revision)
    if Path(ref).expanduser().is_dir() or not is_hub_id(ref):
        if revision is not None:
            raise ValueError(f"{ref} is a local directory; revision {revision!r} applies to hub ids only")
        return ResolvedModel(ref, Path(ref).expanduser())
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    allow = downloads_allowed() if allow_downloads is None else allow_downloads
    rev = revision or "main"
    missing = f"{ref} is not a directory, nor a hub id in the hub cache {cache} (revision {rev})"
    try:
        path = snapshot_download(ref, revision=rev, cache_dir=str(cache), local_files_only=True)
    except LocalEntryNotFoundError:
        if not allow:
            raise ModelNotCached(f"{missing}, and downloads are off: fill the cache where downloads are "
                                 f"allowed, or set {ALLOW_DOWNLOADS_ENV}=1") from None
        try:
            path = snapshot_download(ref, revision=rev, cache_dir=str(cache),
                                     allow_patterns=list(DOWNLOAD_PATTERNS))
        except OSError as exc:  # offline, an unknown repo or revision, refused (the hub's errors are OSErrors)
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ModelNotCached(f"{missing}, and downloading it failed: {type(exc).__name__}: {first}") from None
    path = Path(path)
    return ResolvedModel(ref, path, hub_id=ref, commit=path.name)


def check_model_dir(model_dir: str | Path) -> Path:
    """The directory must exist and hold safetensors weights; pickled weights are never loaded."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{path} has no *.safetensors weights; Distillery loads safetensors only "
                         "(convert pickled .bin checkpoints first)")
    return path


def has_tokenizer(model_dir: str | Path) -> bool:
    return any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary (token -> id, added tokens included) and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def load_tokenizer_facts(model_dir: str | Path) -> tuple[str, int | None]:
    """(fingerprint, number of tokens) of the tokenizer saved in `model_dir`; ("", None) without one."""
    from transformers import AutoTokenizer

    if not has_tokenizer(model_dir):
        return "", None
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return tokenizer_fingerprint(tokenizer), len(tokenizer)


def load_tokenizer_fingerprint(model_dir: str | Path) -> str:
    """Fingerprint of the tokenizer saved in `model_dir`, or "" when it has none."""
    return load_tokenizer_facts(model_dir)[0]
