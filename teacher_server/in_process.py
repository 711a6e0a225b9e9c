"""LocalTeacher: the teacher contract in-process, over the same `TeacherEngine` as the server.

For small setups and tests: the teacher lives on the worker's own device, with no network hop.
Requests are validated exactly as the server validates them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .contract import (
    Generation,
    SamplingParams,
    ScoreArgs,
    ScoredSequence,
    TeacherInfo,
    TokenSeq,
    as_ids,
    validate_generate,
    validate_score,
)
from .engine import EngineConfig, TeacherEngine

if TYPE_CHECKING:
    import torch


class LocalTeacher:
    def __init__(self, engine: TeacherEngine) -> None:
        self.engine = engine

    @classmethod
    def from_model_dir(cls, model_dir: str, **engine_options) -> "LocalTeacher":
        return cls(TeacherEngine.load(EngineConfig(model_dir=model_dir, **engine_options)))

    def info(self) -> TeacherInfo:
        return self.engine.info()

    def score(self, sequences: Sequence[TokenSeq], score_from: Sequence[int], *, top_k: int,
              temperature: float = 1.0, full_logprobs: bool = False,
              candidates: Sequence[torch.Tensor] | None = None) -> list[ScoredSequence]:
        args = ScoreArgs([as_ids(s) for s in sequences], list(score_from), top_k, temperature,
                         full_logprobs, list(candidates) if candidates is not None else None)
        validate_score(args, self.engine.limits)
        return self.engine.score(args)

    def generate(self, prompts: Sequence[TokenSeq], params: SamplingParams) -> list[Generation]:
        ids = [as_ids(p) for p in prompts]
        validate_generate(ids, params, self.engine.limits)
        return self.engine.generate(ids, params)  # type: ignore[return-value]

    def close(self) -> None:
        """Nothing to release; present so callers can treat every teacher alike."""
