"""The teacher contract in Python: typed requests, results, errors and the `Teacher` protocol.

Three implementations answer it: `client.TeacherClient` (gRPC), `in_process.LocalTeacher`
and test doubles. The first two delegate to the same `engine.TeacherEngine`, so their answers are
the same numbers. Student code depends on this module only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch


# gRPC trailing metadata key the server sets on refusals worth retrying later (queue full,
# loading, draining), to tell them from RESOURCE_EXHAUSTED for an over-sized message.
RETRYABLE_KEY = "distillery-retryable"
# Request metadata naming the job a call is for, and the weight its client asks for it: the server
# shares its batches among jobs by weighted fair queueing (teacher_server.batcher).
JOB_KEY = "distillery-job"
JOB_WEIGHT_KEY = "distillery-job-weight"
MAX_JOB_ID_CHARS = 128
MIN_JOB_WEIGHT, MAX_JOB_WEIGHT = 0.01, 100.0


class TeacherError(Exception):
    """Base class of every error the teacher reports; maps to one gRPC status (see servicer)."""


class InvalidRequest(TeacherError, ValueError):
    """The request is malformed (bad ids, lengths, temperature, top_k...). gRPC INVALID_ARGUMENT."""


class Overloaded(TeacherError):
    """The server's queue is full; retry later. gRPC RESOURCE_EXHAUSTED."""


class Cancelled(TeacherError):
    """The caller went away or its deadline passed before the work finished."""


class TeacherUnavailable(TeacherError):
    """No endpoint answered within the deadline (after retries). gRPC UNAVAILABLE / DEADLINE."""


class TeacherMismatch(TeacherError):
    """The teacher's vocabulary or tokenizer differs from the student's."""


@dataclass(frozen=True)
class TeacherInfo:
    model_name: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_sequence_length: int
    dtype: str
    top_k_limit: int
    max_full_row_positions: int
    device: str
    engine: str = ""  # the engine and its version, e.g. "transformers 5.24.0", "vllm 0.32.0"
    max_candidates: int = 0  # candidate ids per position a Score may ask about (0: none)

    def check_compatible(self, vocab_size: int, tokenizer_fingerprint: str) -> None:
        """Raise `TeacherMismatch` naming both sides unless the student can learn from this teacher.

        Tokenizers are compared, by fingerprint, not logit widths: models of one family pad their
        output rows differently (152064 and 151936 rows for one tokenizer of 151665 tokens).
        `vocab_size` is the student's vocabulary (its tokenizer's tokens). The teacher must score
        every one of them; ids it has beyond them (padding rows an engine did not cut) are dropped
        by the student before any loss sees them."""
        if tokenizer_fingerprint != self.tokenizer_fingerprint:
            raise TeacherMismatch(
                f"teacher {self.model_name!r} cannot teach this student: their tokenizers differ "
                f"(tokenizer fingerprint: teacher {self.tokenizer_fingerprint or '<none>'}, "
                f"student {tokenizer_fingerprint or '<none>'}; vocabularies: teacher {self.vocab_size}, "
                f"student {vocab_size} tokens)")
        if self.vocab_size < vocab_size:
            raise TeacherMismatch(
                f"teacher {self.model_name!r} cannot teach this student: one tokenizer (fingerprint "
                f"{tokenizer_fingerprint}), but the teacher scores {self.vocab_size} token ids and the "
                f"student's vocabulary has {vocab_size}")


@dataclass(frozen=True)
class ScoredSequence:
    """Teacher log-probs for the n = length - score_from scored positions of one sequence.

    `tail_logprobs` is the log of the mass on every token outside S = top-k ∪ {actual token}
    (∪ the request's candidate ids, when it sent some), computed by the teacher as a log-sum-exp
    over those tokens (exact for a confident teacher, where 1 - sum(top-k) rounds to 0); -inf when
    S is the whole vocabulary.
    """

    topk_ids: torch.Tensor  # int64 [n, k], most likely first
    topk_logprobs: torch.Tensor  # float32 [n, k]
    token_logprobs: torch.Tensor  # float32 [n], log-prob of the actual token at each position
    tail_logprobs: torch.Tensor  # float32 [n], log mass outside top-k ∪ {actual token}
    full_logprobs: torch.Tensor | None = None  # float32 [n, V] when asked for
    candidate_logprobs: torch.Tensor | None = None  # float32 [n, C]: of the request's candidate ids

    @property
    def tail_mass(self) -> torch.Tensor:
        """float32 [n]: the teacher's probability mass outside top-k ∪ {actual token}."""
        return self.tail_logprobs.exp()


@dataclass(frozen=True)
class SamplingParams:
    """How to continue prompts. temperature 0 is greedy; top_k 0 and top_p 1 disable filters."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None
    return_logprobs: bool = False
    logprobs_top_k: int = 0

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one generation batch (seeds stay per prompt)."""
        return (self.temperature, self.top_p, self.top_k, self.stop_ids, self.return_logprobs,
                self.logprobs_top_k)


@dataclass(frozen=True)
class Generation:
    token_ids: torch.Tensor  # int64 [n], generated tokens only
    finish_reason: str  # "stop" | "length"
    token_logprobs: torch.Tensor | None = None  # float32 [n]
    topk_ids: torch.Tensor | None = None  # int64 [n, k]
    topk_logprobs: torch.Tensor | None = None  # float32 [n, k]


@dataclass(frozen=True)
class Limits:
    """What one server accepts; checked by `validate_score` / `validate_generate`."""

    vocab_size: int
    max_sequence_length: int
    top_k_limit: int = 128
    max_full_row_positions: int = 4096
    max_sequences: int = 1024
    max_new_tokens_limit: int = 4096
    max_reply_bytes: int | None = None  # the server's message cap; None: not checked
    max_candidates: int = 0  # candidate ids per scored position (0: the engine scores none)


def score_reply_bytes(args: "ScoreArgs", vocab_size: int) -> int:
    """An upper bound on the encoded ScoreResponse: 4 bytes per id / float32, plus framing."""
    per_position = (4 * (2 * args.top_k + 2) + 4 * args.num_candidates
                    + (4 * vocab_size if args.full_logprobs else 0))
    return args.num_positions * per_position + 128 * len(args.sequences) + 64


def generate_reply_bytes(n_prompts: int, params: "SamplingParams") -> int:
    """An upper bound on the encoded GenerateResponse."""
    per_token = 4 + (4 * (1 + 2 * params.logprobs_top_k) if params.return_logprobs else 0)
    return n_prompts * (params.max_new_tokens * per_token + 160) + 64


def _check_reply(size: int, limits: Limits, what: str) -> None:
    if limits.max_reply_bytes is not None and size > limits.max_reply_bytes:
        raise InvalidRequest(f"the reply would take about {size:,} bytes ({what}), more than this "
                             f"server's message limit of {limits.max_reply_bytes:,} bytes; split the "
                             f"request or ask for less")


TokenSeq = Sequence[int] | torch.Tensor


@dataclass
class ScoreArgs:
    """A validated score request, in internal form."""

    sequences: list[torch.Tensor]  # int64 [length] each
    score_from: list[int]
    top_k: int
    temperature: float = 1.0
    full_logprobs: bool = False
    # Per sequence, int64 [n, C]: extra ids to score at each of its n scored positions (typically
    # the student's own top-C there); C is the same for every sequence. None: no candidates.
    candidates: list[torch.Tensor] | None = None
    num_positions: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_positions = sum(len(s) - f for s, f in zip(self.sequences, self.score_from))

    @property
    def num_candidates(self) -> int:
        """C, the candidate ids per position (0 without candidates)."""
        if not self.candidates:
            return 0
        c = self.candidates[0]
        return int(c.shape[-1]) if c.dim() == 2 else 0


def as_ids(seq: TokenSeq) -> torch.Tensor:
    if isinstance(seq, torch.Tensor):
        return seq.detach().to("cpu", torch.int64).reshape(-1)
    return torch.tensor(list(seq), dtype=torch.int64)


def _check_temperature(t: float, allow_zero: bool) -> None:
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0 or (t == 0 and not allow_zero):
        need = ">= 0" if allow_zero else "> 0"
        raise InvalidRequest(f"temperature must be finite and {need}, got {t}")


def _check_ids(ids: torch.Tensor, what: str, limits: Limits) -> None:
    if ids.numel() == 0:
        raise InvalidRequest(f"{what} is empty")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= limits.vocab_size:
        raise InvalidRequest(f"{what} has token id {hi if hi >= limits.vocab_size else lo} "
                             f"outside [0, {limits.vocab_size})")


def validate_score(args: ScoreArgs, limits: Limits) -> None:
    """Raise `InvalidRequest` with a precise message for anything the engine must not see."""
    if not args.sequences:
        raise InvalidRequest("no sequences to score")
    if len(args.sequences) > limits.max_sequences:
        raise InvalidRequest(f"{len(args.sequences)} sequences exceed the limit of {limits.max_sequences}")
    if len(args.score_from) != len(args.sequences):
        raise InvalidRequest("score_from needs one entry per sequence")
    for i, (ids, start) in enumerate(zip(args.sequences, args.score_from)):
        _check_ids(ids, f"sequence {i}", limits)
        if len(ids) > limits.max_sequence_length:
            raise InvalidRequest(f"sequence {i} has {len(ids)} tokens, more than the limit of "
                                 f"{limits.max_sequence_length}")
        if not 1 <= start <= len(ids):
            raise InvalidRequest(f"sequence {i}: score_from must be in [1, {len(ids)}], got {start}")
    if not 0 <= args.top_k <= limits.top_k_limit:
        raise InvalidRequest(f"top_k must be in [0, {limits.top_k_limit}], got {args.top_k}")
    if args.top_k > limits.vocab_size:
        raise InvalidRequest(f"top_k {args.top_k} exceeds the vocabulary ({limits.vocab_size})")
    _check_temperature(args.temperature, allow_zero=False)
    if args.candidates is not None:
        _check_candidates(args, limits)
    if args.full_logprobs and args.num_positions > limits.max_full_row_positions:
        raise InvalidRequest(f"full log-prob rows for {args.num_positions} positions exceed the limit "
                             f"of {limits.max_full_row_positions} (each row is "
                             f"{4 * limits.vocab_size} bytes); use top_k instead")
    detail = (f"{args.num_positions} positions × {limits.vocab_size} × 4 bytes of full rows"
              if args.full_logprobs else f"{args.num_positions} positions at top_k {args.top_k}")
    _check_reply(score_reply_bytes(args, limits.vocab_size), limits, detail)


def _check_candidates(args: ScoreArgs, limits: Limits) -> None:
    if len(args.candidates) != len(args.sequences):
        raise InvalidRequest(f"candidate ids are needed for every sequence: {len(args.candidates)} "
                             f"for {len(args.sequences)} sequences")
    width = args.num_candidates
    if limits.max_candidates == 0:
        raise InvalidRequest("this teacher does not score candidate ids (its Info says "
                             "max_candidates = 0); send none")
    if not 1 <= width <= limits.max_candidates:
        raise InvalidRequest(f"candidate ids per position must be in [1, {limits.max_candidates}], "
                             f"got {width}")
    for i, (c, ids, start) in enumerate(zip(args.candidates, args.sequences, args.score_from)):
        n = len(ids) - start
        if c.dim() != 2 or tuple(c.shape) != (n, width):
            raise InvalidRequest(f"sequence {i}: candidate ids must have shape [{n}, {width}] (its "
                                 f"scored positions × candidates), got {list(c.shape)}")
        if c.numel():
            _check_ids(c, f"sequence {i}'s candidate ids", limits)


def validate_generate(prompts: list[torch.Tensor], params: SamplingParams, limits: Limits) -> None:
    if not prompts:
        raise InvalidRequest("no prompts to generate from")
    if len(prompts) > limits.max_sequences:
        raise InvalidRequest(f"{len(prompts)} prompts exceed the limit of {limits.max_sequences}")
    if not 1 <= params.max_new_tokens <= limits.max_new_tokens_limit:
        raise InvalidRequest(f"max_new_tokens must be in [1, {limits.max_new_tokens_limit}], "
                             f"got {params.max_new_tokens}")
    for i, ids in enumerate(prompts):
        _check_ids(ids, f"prompt {i}", limits)
        if len(ids) + params.max_new_tokens > limits.max_sequence_length:
            raise InvalidRequest(f"prompt {i} ({len(ids)} tokens) + max_new_tokens "
                                 f"({params.max_new_tokens}) exceed the limit of "
                                 f"{limits.max_sequence_length}")
    _check_temperature(params.temperature, allow_zero=True)
    if not (math.isfinite(params.top_p) and 0 < params.top_p <= 1):
        raise InvalidRequest(f"top_p must be in (0, 1], got {params.top_p}")
    for name, k in (("top_k", params.top_k), ("logprobs_top_k", params.logprobs_top_k)):
        if not 0 <= k <= min(limits.top_k_limit, limits.vocab_size):
            raise InvalidRequest(f"{name} must be in [0, {min(limits.top_k_limit, limits.vocab_size)}], "
                                 f"got {k}")
    for s in params.stop_ids:
        if not 0 <= s < limits.vocab_size:
            raise InvalidRequest(f"stop id {s} outside [0, {limits.vocab_size})")
    _check_reply(generate_reply_bytes(len(prompts), params), limits,
                 f"{len(prompts)} prompts × {params.max_new_tokens} new tokens")


@runtime_checkable
class Teacher(Protocol):
    """What a student worker needs from a teacher, wherever it runs."""

    def info(self) -> TeacherInfo: ...

    def score(
        self,
        sequences: Sequence[TokenSeq],
        score_from: Sequence[int],
        *,
        top_k: int,
        temperature: float = 1.0,
        full_logprobs: bool = False,
        candidates: Sequence[torch.Tensor] | None = None,
    ) -> list[ScoredSequence]: ...

    def generate(self, prompts: Sequence[TokenSeq], params: SamplingParams) -> list[Generation]: ...
