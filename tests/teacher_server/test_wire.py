"""Wire format: packed little-endian tensors and the request/response conversions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teacher_server import wire
from teacher_server.contract import (
    Generation,
    InvalidRequest,
    SamplingParams,
    ScoreArgs,
    ScoredSequence,
    TeacherInfo,
    TeacherMismatch,
)
from teacher_server.pb import teacher_pb2 as pb

DTYPES = [(torch.int32, pb.DTYPE_INT32, "<i4"), (torch.int64, pb.DTYPE_INT64, "<i8"),
          (torch.float32, pb.DTYPE_FLOAT32, "<f4"), (torch.float16, pb.DTYPE_FLOAT16, "<f2")]
SHAPES = [(5,), (2, 3), (2, 3, 4), (0,), (3, 0), (0, 7), ()]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    t = torch.randint(-1000, 1000, shape, generator=g).to(dtype)
    if t.numel() >= 2:  # the extremes survive too
        t.view(-1)[0], t.view(-1)[1] = info.min, info.max
    return t


def _reencode(msg):
    """Through real bytes, as it travels."""
    return type(msg).FromString(msg.SerializeToString())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,pb_dtype,np_dtype", DTYPES)
def test_tensor_round_trip(dtype, pb_dtype, np_dtype, shape):
    t = _sample(dtype, shape)
    msg = _reencode(wire.to_pb(t))
    assert msg.dtype == pb_dtype
    assert list(msg.shape) == list(shape)
    assert len(msg.data) == t.numel() * np.dtype(np_dtype).itemsize
    back = wire.from_pb(msg)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)
    back.add_(1)  # decoded tensors own writable memory


@pytest.mark.parametrize("dtype,pb_dtype,np_dtype", DTYPES)
def test_bytes_are_little_endian_row_major(dtype, pb_dtype, np_dtype):
    t = _sample(dtype, (3, 4))
    expected = np.ascontiguousarray(t.numpy()).astype(np.dtype(np_dtype)).tobytes()
    assert wire.to_pb(t).data == expected
    # Row-major even when the tensor in memory is not.
    assert wire.to_pb(t.T).data == np.ascontiguousarray(t.numpy().T).astype(np.dtype(np_dtype)).tobytes()
    assert torch.equal(wire.from_pb(wire.to_pb(t.T)), t.T)


def test_known_bytes():
    assert wire.to_pb(torch.tensor([1, 256], dtype=torch.int32)).data == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert wire.to_pb(torch.tensor([1.0])).data == b"\x00\x00\x80\x3f"
    big_endian = np.array([1.5, -2.0], dtype=">f4")
    msg = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], data=big_endian.astype("<f4").tobytes())
    assert wire.from_pb(msg).tolist() == [1.5, -2.0]


def test_to_pb_converts_dtype_and_refuses_unsupported():
    msg = wire.to_pb(torch.tensor([1, 2, 3]), torch.int32)
    assert msg.dtype == pb.DTYPE_INT32 and len(msg.data) == 12
    with pytest.raises(TypeError):
        wire.to_pb(torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(TypeError):
        wire.to_pb(torch.zeros(2, dtype=torch.bool))


@pytest.mark.parametrize("msg,needle", [
    (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], data=b"\x00" * 8), "needs 12 bytes, got 8"),
    (pb.Tensor(dtype=pb.DTYPE_INT32, shape=[2, 2], data=b"\x00" * 20), "needs 16 bytes"),
    (pb.Tensor(dtype=pb.DTYPE_INT64, shape=[0], data=b"\x00"), "needs 0 bytes"),
    (pb.Tensor(dtype=pb.DTYPE_INT32, shape=[2, -1], data=b""), "negative"),
    (pb.Tensor(dtype=pb.DTYPE_INT32, shape=[-2, -3], data=b"\x00" * 24), "negative"),
    (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\x00" * 4), "dtype"),
    (pb.Tensor(dtype=pb.DTYPE_BFLOAT16, shape=[1], data=b"\x00" * 2), "dtype"),
    (pb.Tensor(dtype=99, shape=[1], data=b"\x00" * 4), "dtype"),
    # A shape claiming an enormous array is refused from the byte count, without allocating.
    (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**40, 2**40], data=b""), "bytes"),
])
def test_malformed_tensors_are_invalid_requests(msg, needle):
    with pytest.raises(InvalidRequest, match=needle):
        wire.from_pb(_reencode(msg), "thing")
    with pytest.raises(InvalidRequest, match="^thing"):
        wire.from_pb(msg, "thing")


def test_token_ids_must_be_integer_vectors():
    assert wire.ids_from_pb(wire.to_pb(torch.tensor([4, 5], dtype=torch.int32)), "p").dtype == torch.int64
    assert wire.ids_from_pb(wire.to_pb(torch.tensor([4, 5])), "p").tolist() == [4, 5]
    with pytest.raises(InvalidRequest, match="prompt 3.*int32 or int64"):
        wire.ids_from_pb(wire.to_pb(torch.tensor([1.0, 2.0])), "prompt 3")
    with pytest.raises(InvalidRequest, match="one-dimensional"):
        wire.ids_from_pb(wire.to_pb(torch.zeros(2, 2, dtype=torch.int32)), "prompt 0")


# ------------------------------------------------------------------------------------ messages
def test_info_round_trip():
    info = TeacherInfo(model_name="tiny", vocab_size=512, tokenizer_fingerprint="f" * 64,
                       max_sequence_length=300, dtype="bfloat16", top_k_limit=64,
                       max_full_row_positions=99, device="cuda:1")
    assert wire.info_from_pb(_reencode(wire.info_to_pb(info))) == info


@pytest.mark.parametrize("temperature,full", [(1.0, False), (0.25, True)])
def test_score_request_round_trip(temperature, full):
    args = ScoreArgs([torch.tensor([1, 2, 3]), torch.tensor([7])], [2, 1], top_k=5,
                     temperature=temperature, full_logprobs=full)
    msg = _reencode(wire.score_request_to_pb(args))
    assert msg.sequences[0].token_ids.dtype == pb.DTYPE_INT32  # ids are int32 on the wire
    back = wire.score_request_from_pb(msg)
    assert [s.tolist() for s in back.sequences] == [[1, 2, 3], [7]]
    assert all(s.dtype == torch.int64 for s in back.sequences)
    assert back.score_from == [2, 1] and back.top_k == 5
    assert back.temperature == temperature and back.full_logprobs == full
    assert back.num_positions == 1


def test_score_request_defaults():
    back = wire.score_request_from_pb(pb.ScoreRequest(top_k=2))
    assert back.temperature == 1.0 and back.full_logprobs is False and back.sequences == []
    # An explicit 0 is kept (and refused later by validation), not replaced by the default.
    assert wire.score_request_from_pb(_reencode(pb.ScoreRequest(temperature=0.0))).temperature == 0.0


def test_score_request_with_bad_tensor_names_the_sequence():
    msg = pb.ScoreRequest(sequences=[
        pb.ScoreSequence(token_ids=wire.to_pb(torch.tensor([1], dtype=torch.int32)), score_from=1),
        pb.ScoreSequence(token_ids=pb.Tensor(dtype=pb.DTYPE_INT32, shape=[3], data=b"\x00"), score_from=1)])
    with pytest.raises(InvalidRequest, match="sequence 1"):
        wire.score_request_from_pb(msg)


@pytest.mark.parametrize("with_full", [False, True])
def test_scored_sequence_round_trip(with_full):
    g = torch.Generator().manual_seed(1)
    full = torch.randn(3, 11, generator=g).log_softmax(-1)
    vals, ids = full.topk(4, -1)
    tail = torch.tensor([-3.5, float("-inf"), -1e-12])
    s = ScoredSequence(topk_ids=ids, topk_logprobs=vals, token_logprobs=full[:, 2],
                       tail_logprobs=tail, full_logprobs=full if with_full else None)
    msg = _reencode(wire.scored_to_pb(s))
    assert msg.topk_ids.dtype == pb.DTYPE_INT32 and msg.topk_logprobs.dtype == pb.DTYPE_FLOAT32
    back = wire.scored_from_pb(msg)
    assert back.topk_ids.dtype == torch.int64 and torch.equal(back.topk_ids, ids)
    assert torch.equal(back.topk_logprobs, vals) and torch.equal(back.token_logprobs, full[:, 2])
    assert torch.equal(back.tail_logprobs, tail)
    if with_full:
        assert torch.equal(back.full_logprobs, full)
    else:
        assert back.full_logprobs is None and not msg.HasField("full_logprobs")


def test_empty_scored_sequence_round_trip():
    s = ScoredSequence(topk_ids=torch.empty(0, 3, dtype=torch.long), topk_logprobs=torch.empty(0, 3),
                       token_logprobs=torch.empty(0), tail_logprobs=torch.empty(0))
    back = wire.scored_from_pb(_reencode(wire.scored_to_pb(s)))
    assert back.topk_ids.shape == (0, 3) and back.topk_logprobs.shape == (0, 3)
    assert back.token_logprobs.shape == back.tail_logprobs.shape == (0,)


def test_an_answer_without_tail_logprobs_is_refused():
    """A server from before tail_logprobs: rebuilding the tail as 1 - sum(top-k) would be wrong
    for a confident teacher, so the client refuses the answer and says what to do."""
    old = pb.ScoredSequence(topk_ids=wire.to_pb(torch.zeros(2, 1, dtype=torch.int32)),
                            topk_logprobs=wire.to_pb(torch.zeros(2, 1)),
                            token_logprobs=wire.to_pb(torch.zeros(2)))
    with pytest.raises(TeacherMismatch, match="tail_logprobs.*upgrade the teacher server"):
        wire.scored_from_pb(_reencode(old))


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(max_new_tokens=7, temperature=0.0, top_p=0.875, top_k=5, stop_ids=(2, 9), seed=0,
                   return_logprobs=True, logprobs_top_k=3),
    SamplingParams(max_new_tokens=1, temperature=1.25, seed=2**64 - 1),
])
def test_generate_request_round_trip(params):
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([1])]
    msg = _reencode(wire.generate_request_to_pb(prompts, params))
    back_prompts, back = wire.generate_request_from_pb(msg)
    assert [p.tolist() for p in back_prompts] == [[5, 6, 7], [1]]
    assert back == params  # seed 0 and temperature 0 (greedy) are not lost as "unset"


def test_float_parameters_travel_as_float32():
    _, back = wire.generate_request_from_pb(_reencode(wire.generate_request_to_pb(
        [torch.tensor([1])], SamplingParams(temperature=1.3, top_p=0.9))))
    assert back.temperature == float(np.float32(1.3)) and back.top_p == float(np.float32(0.9))


def test_generate_request_defaults():
    prompts, params = wire.generate_request_from_pb(pb.GenerateRequest(max_new_tokens=3))
    assert prompts == []
    assert params == SamplingParams(max_new_tokens=3, temperature=1.0, top_p=1.0, top_k=0, seed=None)


@pytest.mark.parametrize("gen", [
    Generation(token_ids=torch.tensor([3, 4, 2]), finish_reason="stop"),
    Generation(token_ids=torch.tensor([3, 4]), finish_reason="length",
               token_logprobs=torch.tensor([-0.5, -1.25]),
               topk_ids=torch.tensor([[3, 1], [4, 0]]),
               topk_logprobs=torch.tensor([[-0.5, -2.0], [-1.25, -1.5]])),
    Generation(token_ids=torch.empty(0, dtype=torch.long), finish_reason="length",
               token_logprobs=torch.empty(0), topk_ids=torch.empty(0, 2, dtype=torch.long),
               topk_logprobs=torch.empty(0, 2)),
])
def test_generation_round_trip(gen):
    back = wire.generation_from_pb(_reencode(wire.generation_to_pb(gen)))
    assert back.finish_reason == gen.finish_reason
    assert back.token_ids.dtype == torch.int64 and torch.equal(back.token_ids, gen.token_ids)
    for name in ("token_logprobs", "topk_ids", "topk_logprobs"):
        want, got = getattr(gen, name), getattr(back, name)
        if want is None:
            assert got is None
        else:
            assert got.shape == want.shape and torch.equal(got.to(want.dtype), want)
    if gen.topk_ids is not None:
        assert back.topk_ids.dtype == torch.int64
