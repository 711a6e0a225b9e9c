"""Conversion between torch tensors / contract types and the protobuf messages.

Arrays travel as raw little-endian bytes with an explicit dtype and shape (`pb.Tensor`).
Token ids go out as int32 and come back as int64 tensors; log-probs are float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .contract import (
    Generation,
    InvalidRequest,
    SamplingParams,
    ScoreArgs,
    ScoredSequence,
    TeacherInfo,
    TeacherMismatch,
)
from .pb import teacher_pb2 as pb

_NP = {pb.DTYPE_INT32: np.dtype("<i4"), pb.DTYPE_INT64: np.dtype("<i8"),
       pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_FLOAT16: np.dtype("<f2")}
_TORCH = {torch.int32: pb.DTYPE_INT32, torch.int64: pb.DTYPE_INT64,
          torch.float32: pb.DTYPE_FLOAT32, torch.float16: pb.DTYPE_FLOAT16}


def to_pb(t: torch.Tensor, dtype: torch.dtype | None = None) -> pb.Tensor:
    t = t.detach().cpu()
    if dtype is not None:
        t = t.to(dtype)
    if t.dtype not in _TORCH:
        raise TypeError(f"cannot send {t.dtype} on the wire")
    arr = t.contiguous().numpy().astype(_NP[_TORCH[t.dtype]], copy=False)
    return pb.Tensor(dtype=_TORCH[t.dtype], shape=list(t.shape), data=arr.tobytes())


def from_pb(msg: pb.Tensor, what: str = "tensor") -> torch.Tensor:
    """Decode a Tensor message; raises InvalidRequest when dtype, shape and bytes disagree."""
    if msg.dtype not in _NP:
        raise InvalidRequest(f"{what}: unsupported dtype {pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else msg.dtype}")
    shape = list(msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"{what}: negative dimension in shape {shape}")
    np_dtype = _NP[msg.dtype]
    count = math.prod(shape)
    if count * np_dtype.itemsize != len(msg.data):
        raise InvalidRequest(f"{what}: shape {shape} needs {count * np_dtype.itemsize} bytes, "
                             f"got {len(msg.data)}")
    try:  # numpy refuses some shapes the checks above let through (> 64 dims, empty but huge)
        arr = np.frombuffer(msg.data, dtype=np_dtype).reshape(shape)
    except ValueError as exc:
        raise InvalidRequest(f"{what}: unusable shape {shape[:8]}{'...' if len(shape) > 8 else ''}: "
                             f"{exc}") from None
    return torch.from_numpy(arr.copy())


def ids_from_pb(msg: pb.Tensor, what: str) -> torch.Tensor:
    t = from_pb(msg, what)
    if t.dtype not in (torch.int32, torch.int64):
        raise InvalidRequest(f"{what}: token ids must be int32 or int64")
    if t.dim() != 1:
        raise InvalidRequest(f"{what}: token ids must be one-dimensional, got shape {list(t.shape)}")
    return t.long()


# ---------------------------------------------------------------------- Info
def info_to_pb(info: TeacherInfo) -> pb.InfoResponse:
    return pb.InfoResponse(model_name=info.model_name, vocab_size=info.vocab_size,
                           tokenizer_fingerprint=info.tokenizer_fingerprint,
                           max_sequence_length=info.max_sequence_length, dtype=info.dtype,
                           top_k_limit=info.top_k_limit,
                           max_full_row_positions=info.max_full_row_positions, device=info.device,
                           engine=info.engine, max_candidates=info.max_candidates)


def info_from_pb(msg: pb.InfoResponse) -> TeacherInfo:
    return TeacherInfo(model_name=msg.model_name, vocab_size=msg.vocab_size,
                       tokenizer_fingerprint=msg.tokenizer_fingerprint,
                       max_sequence_length=msg.max_sequence_length, dtype=msg.dtype,
                       top_k_limit=msg.top_k_limit, max_full_row_positions=msg.max_full_row_positions,
                       device=msg.device, engine=msg.engine, max_candidates=msg.max_candidates)


# ---------------------------------------------------------------------- Score
def score_request_to_pb(args: ScoreArgs) -> pb.ScoreRequest:
    sequences = [pb.ScoreSequence(token_ids=to_pb(s, torch.int32), score_from=f)
                 for s, f in zip(args.sequences, args.score_from)]
    for msg, c in zip(sequences, args.candidates or ()):
        msg.candidate_ids.CopyFrom(to_pb(c, torch.int32))
    return pb.ScoreRequest(sequences=sequences, top_k=args.top_k, temperature=args.temperature,
                           return_full_logprobs=args.full_logprobs)


def candidates_from_pb(msg: pb.ScoreRequest) -> list[torch.Tensor] | None:
    """Each sequence's candidate ids [n, C] as int64, or None when the request sent none."""
    given = [s.HasField("candidate_ids") for s in msg.sequences]
    if not any(given):
        return None
    if not all(given):
        raise InvalidRequest("candidate ids are needed for every sequence of a request, or none")
    out = []
    for i, s in enumerate(msg.sequences):
        c = from_pb(s.candidate_ids, f"sequence {i}'s candidate ids")
        if c.dtype not in (torch.int32, torch.int64):
            raise InvalidRequest(f"sequence {i}'s candidate ids must be int32 or int64")
        out.append(c.long())
    return out


def score_request_from_pb(msg: pb.ScoreRequest) -> ScoreArgs:
    return ScoreArgs(
        sequences=[ids_from_pb(s.token_ids, f"sequence {i}") for i, s in enumerate(msg.sequences)],
        score_from=[s.score_from for s in msg.sequences], top_k=msg.top_k,
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        full_logprobs=msg.return_full_logprobs, candidates=candidates_from_pb(msg))


def scored_to_pb(s: ScoredSequence) -> pb.ScoredSequence:
    msg = pb.ScoredSequence(topk_ids=to_pb(s.topk_ids, torch.int32),
                            topk_logprobs=to_pb(s.topk_logprobs, torch.float32),
                            token_logprobs=to_pb(s.token_logprobs, torch.float32),
                            tail_logprobs=to_pb(s.tail_logprobs, torch.float32))
    if s.full_logprobs is not None:
        msg.full_logprobs.CopyFrom(to_pb(s.full_logprobs, torch.float32))
    if s.candidate_logprobs is not None:
        msg.candidate_logprobs.CopyFrom(to_pb(s.candidate_logprobs, torch.float32))
    return msg


def scored_from_pb(msg: pb.ScoredSequence) -> ScoredSequence:
    if not msg.HasField("tail_logprobs"):
        # A server from before the field: the tail would have to be rebuilt as 1 - sum(top-k),
        # which is 0 for a confident teacher and silently wrong for every reverse-type loss.
        raise TeacherMismatch("the teacher server sent no tail_logprobs (it predates them); "
                           "upgrade the teacher server to this version of Distillery")
    return ScoredSequence(
        topk_ids=from_pb(msg.topk_ids).long(), topk_logprobs=from_pb(msg.topk_logprobs),
        token_logprobs=from_pb(msg.token_logprobs), tail_logprobs=from_pb(msg.tail_logprobs),
        full_logprobs=from_pb(msg.full_logprobs) if msg.HasField("full_logprobs") else None,
        candidate_logprobs=(from_pb(msg.candidate_logprobs) if msg.HasField("candidate_logprobs")
                            else None))


# ---------------------------------------------------------------------- Generate
def generate_request_to_pb(prompts: list[torch.Tensor], p: SamplingParams) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(prompts=[to_pb(x, torch.int32) for x in prompts],
                             max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                             top_p=p.top_p, top_k=p.top_k, stop_ids=list(p.stop_ids),
                             return_logprobs=p.return_logprobs, logprobs_top_k=p.logprobs_top_k)
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def generate_request_from_pb(msg: pb.GenerateRequest) -> tuple[list[torch.Tensor], SamplingParams]:
    prompts = [ids_from_pb(t, f"prompt {i}") for i, t in enumerate(msg.prompts)]
    params = SamplingParams(
        max_new_tokens=msg.max_new_tokens,
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k, stop_ids=tuple(msg.stop_ids),
        seed=msg.seed if msg.HasField("seed") else None,
        return_logprobs=msg.return_logprobs, logprobs_top_k=msg.logprobs_top_k)
    return prompts, params


def generation_to_pb(g: Generation) -> pb.Generation:
    msg = pb.Generation(token_ids=to_pb(g.token_ids, torch.int32), finish_reason=g.finish_reason)
    if g.token_logprobs is not None:
        msg.token_logprobs.CopyFrom(to_pb(g.token_logprobs, torch.float32))
    if g.topk_ids is not None and g.topk_logprobs is not None:
        msg.topk_ids.CopyFrom(to_pb(g.topk_ids, torch.int32))
        msg.topk_logprobs.CopyFrom(to_pb(g.topk_logprobs, torch.float32))
    return msg


def generation_from_pb(msg: pb.Generation) -> Generation:
    opt = lambda name: from_pb(getattr(msg, name)) if msg.HasField(name) else None  # noqa: E731
    topk_ids = opt("topk_ids")
    return Generation(token_ids=from_pb(msg.token_ids).long(), finish_reason=msg.finish_reason,
                      token_logprobs=opt("token_logprobs"),
                      topk_ids=topk_ids.long() if topk_ids is not None else None,
                      topk_logprobs=opt("topk_logprobs"))
