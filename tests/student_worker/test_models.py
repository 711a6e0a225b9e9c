"""Models: hub ids through a hand-laid hub cache (never the network), padded vocabularies,
gradient checkpointing."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import student_worker.trainer as trainer_mod
from student_worker.config import StudentSpec
from student_worker.losses import DenseTeacher, SparseTeacher, token_divergence
from student_worker.models import build_student, restrict_teacher
from student_worker.trainer import Trainer, build_teacher
from teacher_server.contract import ScoreArgs
from teacher_server.engine import EngineConfig, TeacherEngine
from teacher_server.in_process import LocalTeacher
from teacher_server.model_dirs import (
    DOWNLOAD_PATTERNS,
    ModelNotCached,
    hub_cache_dir,
    load_tokenizer_fingerprint,
    resolve_model,
)

PAD = 8  # rows of padding added past the tokenizer's 512 tokens


def run(spec, teacher=None):
    seen = []
    trainer = Trainer(spec, teacher or build_teacher(spec.teacher), on_metrics=seen.append)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer, seen


# ------------------------------------------------------------------------------ hub ids
def test_a_directory_is_itself_and_a_hub_id_resolves_through_the_cache(hub_cache, tiny_student, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache.path))
    assert resolve_model(str(tiny_student)).path == Path(tiny_student)
    got = resolve_model("tiny-org/student")
    assert (got.hub_id, got.commit) == ("tiny-org/student", hub_cache.student_commit)
    assert got.path == hub_cache.path / "models--tiny-org--student" / "snapshots" / hub_cache.student_commit
    assert load_file(str(got.path / "model.safetensors")).keys() == load_file(
        str(tiny_student / "model.safetensors")).keys()
    for revision in (hub_cache.student_commit, "v1"):  # a commit, a tag
        assert resolve_model("tiny-org/student", revision).commit == hub_cache.student_commit
    with pytest.raises(ModelNotCached, match="revision v2"):
        resolve_model("tiny-org/student", "v2")
    with pytest.raises(ValueError, match="applies to hub ids only"):
        resolve_model(str(tiny_student), "main")
    # An existing directory wins over the hub id it looks like.
    (tmp_path / "tiny-org" / "student").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("tiny-org/student").hub_id is None
    # Where the cache is: HF_HUB_CACHE, else HF_HOME/hub, else the home directory's.
    assert hub_cache_dir({"HF_HUB_CACHE": "/a", "HF_HOME": "/b"}) == Path("/a")
    assert hub_cache_dir({"HF_HOME": "/b"}) == Path("/b/hub")
    assert hub_cache_dir({}) == Path.home() / ".cache" / "huggingface" / "hub"


def test_a_missing_hub_id_downloads_only_when_allowed_and_only_safe_files(tmp_path, tiny_student, hub_cache,
                                                                          monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def fake_snapshot_download(repo_id, *, revision, cache_dir, local_files_only=False, allow_patterns=None):
        calls.append({"local_files_only": local_files_only, "allow_patterns": allow_patterns})
        snapshot = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("3" * 40)
        if local_files_only and not snapshot.is_dir():
            raise LocalEntryNotFoundError("not cached")
        if not snapshot.is_dir():
            hub_cache.lay_out(Path(cache_dir), repo_id, tiny_student, "3" * 40)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("DISTILLERY_ALLOW_DOWNLOADS", raising=False)
    with pytest.raises(ModelNotCached, match="downloads are off.*DISTILLERY_ALLOW_DOWNLOADS=1"):
        resolve_model("org/new", cache_dir=tmp_path)
    assert [c["local_files_only"] for c in calls] == [True]  # looked in the cache only
    monkeypatch.setenv("DISTILLERY_ALLOW_DOWNLOADS", "1")
    assert resolve_model("org/new", cache_dir=tmp_path).commit == "3" * 40
    fetched = calls[-1]
    assert fetched["local_files_only"] is False and fetched["allow_patterns"] == list(DOWNLOAD_PATTERNS)
    wanted = ("config.json", "model-00001-of-00002.safetensors", "tokenizer.json", "tokenizer.model",
              "merges.txt", "chat_template.jinja")
    unwanted = ("pytorch_model.bin", "model.pt", "flax_model.msgpack", "model.onnx", "tf_model.h5", "setup.py")
    assert all(any(fnmatch.fnmatch(f, p) for p in DOWNLOAD_PATTERNS) for f in wanted)
    assert not any(fnmatch.fnmatch(f, p) for f in unwanted for p in DOWNLOAD_PATTERNS)
    calls.clear()
    resolve_model("org/new", cache_dir=tmp_path)  # now cached: no second download
    assert [c["local_files_only"] for c in calls] == [True]


def test_a_job_trains_from_hub_ids_and_resumes_only_from_the_commit_it_trained(
        make_spec, hub_cache, tiny_llama, tiny_student, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    shutil.copytree(hub_cache.path, cache, symlinks=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    spec = make_spec(student={"model": "tiny-org/student"}, teacher={"local_model": "tiny-org/teacher"},
                     distill={"steps": 2})
    trainer, seen = run(spec)
    assert [m["step"] for m in seen] == [1, 2]
    old = hub_cache.student_commit
    assert trainer.student_ref.commit == old
    assert trainer.teacher.info().model_name == "tiny-org/teacher"
    assert trainer.ckpt.load_state(trainer.ckpt.latest_valid())["student_commit"] == old

    # main moves to another commit: the run cannot resume on other base weights without saying so.
    hub_cache.lay_out(cache, "tiny-org/student", tiny_student, "4" * 40)
    with pytest.raises(ValueError, match=f"commit {old}.*now resolves to {'4' * 40}.*student.revision"):
        Trainer(spec, build_teacher(spec.teacher)).setup()
    pinned = make_spec(student={"model": "tiny-org/student", "revision": old},
                       teacher={"local_model": "tiny-org/teacher", "revision": hub_cache.teacher_commit},
                       distill={"steps": 2})
    trainer = Trainer(pinned, build_teacher(pinned.teacher))
    trainer.setup()
    assert trainer.train()["already_finished"]


# ------------------------------------------------------------------------------ vocabulary padding
def padded_copy(src: Path, dst: Path, rows: int) -> Path:
    """`src` with `rows` more embedding and output rows, as checkpoints pad them; the head's new
    rows are large, so any logit of theirs that got through would dominate."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src))
    vocab = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab + rows, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[vocab:] = 0.0
        head = model.get_output_embeddings().weight
        head[vocab:] = head[:vocab].abs().max() * 4
    model.save_pretrained(str(dst), safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def padded(tmp_path_factory, tiny_llama, tiny_student):
    root = tmp_path_factory.mktemp("padded")
    return {"teacher": padded_copy(tiny_llama, root / "teacher", PAD),
            "student": padded_copy(tiny_student, root / "student", PAD)}


def test_a_padded_teacher_scores_over_its_tokenizer_as_the_unpadded_one(padded, tiny_llama):
    engine, plain = (TeacherEngine.load(EngineConfig(model_dir=str(d))) for d in (padded["teacher"], tiny_llama))
    assert engine.info().vocab_size == 512 and engine.info().tokenizer_fingerprint == plain.info().tokenizer_fingerprint
    seq = torch.arange(3, 40)
    args = ScoreArgs([seq], [1], top_k=8, full_logprobs=True)
    got, want = engine.score(args)[0], plain.score(args)[0]
    for name in ("topk_ids", "topk_logprobs", "token_logprobs", "tail_logprobs", "full_logprobs"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_a_padded_student_trains_as_the_unpadded_one(make_spec, padded, tiny_student, tmp_path):
    """One tokenizer, a student padded by 8 rows, a teacher that is not: every warmup and KD loss
    equals the unpadded pair's, as do the trained weights (the padding rows get no gradient)."""
    common = dict(warmup={"enabled": True, "steps": 2}, distill={"steps": 3, "on_policy_fraction": 1.0})
    _, plain = run(make_spec(checkpoint={"dir": str(tmp_path / "plain")}, **common))
    trainer, padded_run = run(make_spec(student={"model": str(padded["student"])},
                                        checkpoint={"dir": str(tmp_path / "padded")}, **common))
    assert trainer.student.vocab_size == 512
    losses = lambda seen: [(m["stage"], m["step"], m["loss"]) for m in seen if "loss" in m]  # noqa: E731
    assert len(losses(plain)) == 5 and losses(padded_run) == losses(plain)
    a = load_file(str(tmp_path / "plain" / "checkpoints" / "done-00000000" / "model.safetensors"))
    b = load_file(str(tmp_path / "padded" / "checkpoints" / "done-00000000" / "model.safetensors"))
    assert b["lm_head.weight"].shape[0] == 512 + PAD  # the checkpoint keeps the model's shape
    for k in a:
        assert torch.equal(a[k], b[k][:a[k].shape[0]]), k
    before = load_file(str(padded["student"] / "model.safetensors"))["lm_head.weight"]
    assert torch.equal(b["lm_head.weight"][512:], before[512:])


def test_teacher_ids_past_the_students_vocabulary_never_reach_the_loss(make_spec, padded, monkeypatch):
    """A teacher engine that keeps its padding rows (as some engines do) answers with ids >= 512,
    and would put most of its mass there: the student drops them and trains on its own tokens."""
    from transformers import AutoModelForCausalLM

    path = padded["teacher"]
    raw = AutoModelForCausalLM.from_pretrained(str(path))
    teacher = LocalTeacher(TeacherEngine(raw, EngineConfig(model_dir=str(path)), load_tokenizer_fingerprint(path)))
    assert teacher.info().vocab_size == 512 + PAD
    seen_ids = []
    real = trainer_mod.token_divergence

    def spy(logits, teacher_batch, *a, **kw):
        seen_ids.append(int(teacher_batch.topk_ids.max()))
        assert logits.shape[-1] == 512
        return real(logits, teacher_batch, *a, **kw)

    monkeypatch.setattr(trainer_mod, "token_divergence", spy)
    _, seen = run(make_spec(distill={"steps": 2}), teacher=teacher)
    assert seen_ids and max(seen_ids) < 512
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in seen)


def test_restricting_a_teacher_is_slicing_its_rows():
    """Sparse with k = the padded width, restricted, equals the dense rows cut and renormalized;
    with a small k no id past the vocabulary is left."""
    torch.manual_seed(0)
    b, t, v = 2, 5, 40
    full = torch.randn(b, t, v + PAD).mul(3).log_softmax(-1)
    full[..., v:] += 2.0  # padding rows with real mass
    full = full.log_softmax(-1)
    tokens = torch.randint(0, v, (b, t))
    student = torch.randn(b, t, v, requires_grad=True)
    dense = restrict_teacher(DenseTeacher(full), v)
    assert torch.allclose(dense.logprobs.exp().sum(-1), torch.ones(b, t))
    sparse = restrict_teacher(SparseTeacher.from_dense(full, tokens, v + PAD), v)
    assert int(sparse.topk_ids.max()) < v
    for loss in ("fkl", "rkl", "jsd", "tvd"):
        want = token_divergence(student, dense, None, loss=loss)
        got = token_divergence(student, sparse, None, loss=loss)
        assert torch.allclose(got, want, atol=1e-5), loss
    small = restrict_teacher(SparseTeacher.from_dense(full, tokens, 4), v)
    assert int(small.topk_ids.max()) < v
    assert torch.isfinite(token_divergence(student, small, None, loss="fkl")).all()


# ------------------------------------------------------------------------------ gradient checkpointing
@pytest.mark.parametrize("lora", [None, {"r": 4, "target_modules": ["q_proj", "v_proj"]}])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients_and_keeps_less(tiny_llama, lora):
    ids = torch.randint(3, 500, (4, 48), generator=torch.Generator().manual_seed(0))

    def step(checkpointing: bool):
        spec = StudentSpec(model=str(tiny_llama), gradient_checkpointing=checkpointing, lora=lora)
        student = build_student(spec, tiny_llama, tokenizer_size=512, seed=0, device="cpu")
        student.model.train()
        saved = [0]

        def pack(x):  # what autograd keeps for the backward: the activations
            saved[0] += x.numel() * x.element_size()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            logits = student.model(input_ids=ids).logits
        loss = logits.float().log_softmax(-1)[..., :-1, :].gather(-1, ids[:, 1:, None]).mean().neg()
        loss.backward()
        return loss.detach(), [p.grad for p in student.trainable()], saved[0]

    (loss_a, grads_a, kept_a), (loss_b, grads_b, kept_b) = step(False), step(True)
    assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=0)
    assert len(grads_a) == len(grads_b) > 0
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-7)
    assert kept_b < kept_a / 3, (kept_a, kept_b)
