"""VllmEngine: the teacher's Score and Generate on vLLM, behind the unchanged Teacher contract.

    engine = VllmEngine.load(VllmEngineConfig(model_dir="./my-teacher", dtype="bfloat16"))
    engine.score(ScoreArgs(...)); engine.generate(prompts, SamplingParams(...)); engine.close()

It offers what the server uses from `engine.TeacherEngine` (`info()`, `limits`, `score(args)`,
`generate(prompts, params, *, seeds, max_new_tokens, cancelled)`), with the differences below.
vLLM is imported lazily: this module imports without it (its tests skip then).

API choice: `vllm.v1.engine.async_llm.AsyncLLM`, not the offline `vllm.LLM`.
    The server answers many gRPC threads at once and wants continuous batching: every sequence
    of every call goes straight into vLLM's scheduler as its own vLLM request, and vLLM batches
    whatever is in flight at each step (prefills with decodes, Score with Generate). `LLM` is a
    synchronous, single-caller loop (`generate()` adds its prompts and steps the engine until
    they are all done); from many threads it would need a lock, i.e. one call at a time and no
    batching across calls. AsyncLLM runs the engine core in its own process; this class owns
    one asyncio event loop in a daemon thread, and each sync call hands its requests to that
    loop (`asyncio.run_coroutine_threadsafe`) and waits on their futures. So our `Batcher` is
    not needed (nor wanted) in front of this engine; see `max_queue` for backpressure.
    Cancellation: `cancelled(i)` is polled every `poll_s` while a call waits; a cancelled row
    is aborted in vLLM (it leaves the running batch at the next step) and returns None, as with
    `TeacherEngine`.

Score = one vLLM request per sequence with `prompt_logprobs=top_k`, `max_tokens=1` (vLLM must
generate at least one token: one greedy token, discarded, costs no extra forward pass),
`flat_logprobs=True`, `detokenize=False`. For prompt position t vLLM returns [actual token,
top-1 .. top-k] as float32 log-probs of log_softmax(logits) (its `gather_logprobs`), for every
position from 1 on; the positions before `score_from` are dropped here. On a tiny fp32 Llama
they agree with `TeacherEngine` within 1e-5 (same top-k ids); in bf16 both engines differ from
fp32 by about 0.1 and from each other by as much (their bf16 kernels differ). For bf16 / fp16
weights the output head runs in float32 (`fp32_head`, vLLM's `head_dtype` override), as in
`TeacherEngine`. Sequences may have at most max_model_len - 1 tokens (room for the one
generated token), so `limits.max_sequence_length` is one less than `TeacherEngine`'s. Facts
and limits:

- Temperature: vLLM's prompt log-probs never go through the sampler (no temperature, whatever
  `logprobs_mode` says), so they are at temperature 1. The contract's Score temperature divides
  the logits before the softmax, which cannot be recovered from top-k log-probs (the normaliser
  needs the whole row). So this engine answers Score at temperature 1 only and refuses any
  other with InvalidRequest. (Possible later: a server-wide Score temperature through the
  `logit_scale` that vLLM's Llama reads from the config (hf_overrides), with Generate
  temperatures rescaled to match; Qwen2 in vLLM has no such scale.)
- A head padded past the tokenizer (checkpoints often pad it: 151936 rows for 151665 tokens):
  `TeacherEngine` cuts the extra rows; here a hook in vLLM's workers (teacher_server.vllm_worker)
  sets their logits to -inf before anything reads them, so prompt and sampled log-probs are
  normalised over the tokenizer's tokens, no padded id is sampled or returned in a top-k, and
  Info's vocab_size is the tokenizer's, as for `TeacherEngine`.
- Full rows: refused (InvalidRequest; `max_full_row_positions` is 0). vLLM can return all V
  log-probs (`prompt_logprobs=-1`), but as Python lists of V floats per position, which is
  unusable at real vocabulary sizes. `max_logprobs` is set to the server's `top_k_limit`.
- **tail_logprobs are NOT exact for confident teachers.** vLLM does not return the mass
  outside S = top-k ∪ {actual token}; it is computed here as log(1 - sum_{j in S} p_j), stably
  (log1mexp of the float64 logsumexp of the returned float32 log-probs), and -inf when S is
  the whole vocabulary. The returned log-probs carry float32 rounding (absolute error about
  1e-7 · |log p|, plus the normaliser's), so the tail mass has an absolute error of order 1e-7
  to 1e-6: a tail of 1e-3 is good to about 0.1 %, a tail below about 1e-6 is noise, and when
  the returned mass rounds to 1 (or above) the tail comes out as -inf although the true tail
  is small but positive. `TeacherEngine` computes the tail as a log-sum-exp over the tokens
  outside S and is exact there; a loss that uses the tail term of a very confident teacher
  should know this. Nothing better was found in vLLM 0.32: logits processors do not see prompt
  positions, `logprobs_mode="raw_logits"` gives top-k logits without the normaliser, and
  `prompt_logprob_token_ids` (scores of chosen ids) needs the V2 model runner, which the CPU
  build does not use (and it would not give the tail either).

Generate = one vLLM request per prompt: temperature / top_p / top_k per request, seeded per row
(`seed` = `sampling.row_seed(params.seed, i)` as in `TeacherEngine`, or the caller's `seeds`),
`stop_token_ids` = the request's stop ids and `ignore_eos=True`, so that, as in `TeacherEngine`,
only the client's stop ids stop a row (the client lists EOS when it wants it), and a stop id is
kept as the last token with finish_reason "stop". Differences from `TeacherEngine`:

- Sampling uses vLLM's own random streams: seeded answers are reproducible for this engine
  (same request, same seed: same tokens) but are not the tokens `TeacherEngine` draws for the
  same seed. Greedy decoding gives the same tokens (up to float ties). vLLM is not
  batch-invariant by default: a different mix of neighbours can, rarely, change a seeded
  row's logits in the last bits and so a draw (`VLLM_BATCH_INVARIANT=1` pins that down).
- Temperatures: vLLM clamps (0, 0.01) to 0.01 and refuses above 2; this engine refuses both
  ranges with InvalidRequest instead of answering at another temperature.
- Log-probs: the engine runs with `logprobs_mode="processed_logprobs"`, i.e. log_softmax of the
  temperature-scaled logits (temperature 1 when greedy), as the contract says, but vLLM takes
  them after its top-k / top-p filter (renormalised over the kept tokens) while the contract
  takes them before. So log-probs together with a top_k / top_p filter are refused
  (InvalidRequest); without a filter they are the contract's numbers.

Backpressure: `max_queue` bounds the calls (Score or Generate) in flight in this engine; one
more gets `Overloaded` at once, like the batcher's full queue. The vLLM scheduler's own queue
sits behind that.

Environment: vLLM's usage-stats reporting is switched off and its host address is pinned to
loopback (`VLLM_NO_USAGE_STATS`, `DO_NOT_TRACK`, `VLLM_HOST_IP`; set only when unset: set
`VLLM_HOST_IP` to the node's address for multi-node tensor parallelism), and
`HF_HUB_OFFLINE=1` (weights come from `model_dir` only). vLLM starts its engine in another
process; a script that creates this engine at import time needs the
`if __name__ == "__main__":` guard. On CPU: `gpu_memory_utilization` is the share of RAM vLLM
reserves (0.1 is plenty for small models) or give `kv_cache_memory_bytes`; `enforce_eager`
defaults to True there. The first requests of a fresh engine are slow (seconds, up to tens of
seconds on CPU, while kernels are built); `warmup()` pays that at load time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .contract import (
    Generation,
    InvalidRequest,
    Limits,
    Overloaded,
    SamplingParams,
    ScoreArgs,
    ScoredSequence,
    TeacherInfo,
    TeacherUnavailable,
    validate_generate,
    validate_score,
)

if TYPE_CHECKING:
    from .metrics import TeacherMetrics

log = logging.getLogger(__name__)

# vLLM clamps temperatures in (1e-5, 0.01) up to 0.01 and refuses those above 2.
VLLM_MIN_TEMPERATURE = 0.01
VLLM_MAX_TEMPERATURE = 2.0
ENGINE_NAME = "vllm"


@dataclass(frozen=True)
class VllmEngineConfig:
    """How to start vLLM for the teacher. Server-side only: nothing here comes from a request."""

    model_dir: str
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16"
    trust_remote_code: bool = False  # only ever set by the operator's command line
    max_sequence_length: int | None = None  # default: the model's max positions - 1 (see limits)
    top_k_limit: int = 128  # also vLLM's max_logprobs
    tensor_parallel_size: int = 1
    # Share of GPU memory vLLM reserves; on CPU the share of RAM. None: 0.9 on a GPU, 0.1 on CPU.
    gpu_memory_utilization: float | None = None
    kv_cache_memory_bytes: int | None = None  # explicit KV cache size (overrides the share)
    enforce_eager: bool | None = None  # None: True on CPU, False (CUDA graphs) elsewhere
    max_num_seqs: int | None = None  # vLLM's running batch, sequences (None: vLLM's default)
    max_num_batched_tokens: int | None = None  # vLLM's tokens per step (None: vLLM's default)
    enable_prefix_caching: bool | None = None  # None: vLLM's default (Score requests never read it)
    seed: int = 0  # vLLM's global seed (unseeded rows still differ from call to call)
    # The output head in float32 for bf16 / fp16 weights, as TeacherEngine does (vLLM's
    # hf_overrides head_dtype): logits are not rounded to the weights' dtype. On CUDA the matmul
    # accumulates into fp32 directly; on CPU vLLM casts the head's weight on every step.
    fp32_head: bool = True
    max_queue: int | None = 256  # calls in flight in this engine; more get Overloaded; None: no bound
    poll_s: float = 0.05  # how often a waiting call polls `cancelled` (only when one is given)
    extra_engine_args: tuple[tuple[str, Any], ...] = ()  # passed to vLLM's AsyncEngineArgs as is


def vllm_version() -> str | None:
    """The installed vLLM's version, or None when vLLM is not importable."""
    try:
        import vllm
    except ImportError:
        return None
    return str(vllm.__version__)


def _quiet_defaults() -> None:
    for key, value in (("VLLM_NO_USAGE_STATS", "1"), ("DO_NOT_TRACK", "1"),
                       ("VLLM_HOST_IP", "127.0.0.1"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(key, value)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0, stably (Mächler 2012); -inf for a >= 0."""
    a = a.to(torch.float64)
    out = torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))
    return torch.where(a >= 0, torch.full_like(a, float("-inf")), out)


def tail_from_returned(token_lp: torch.Tensor, token_ids: torch.Tensor, topk_lp: torch.Tensor,
                       topk_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float32 [n]: log of the mass outside S = top-k ∪ {actual token}, from the returned log-probs
    only: log1mexp(logsumexp over S), in float64. Not exact when that mass rounds to 1 (see the
    module docstring); -inf when S is the whole vocabulary."""
    n, k = topk_lp.shape
    if n == 0:
        return torch.empty(0)
    in_topk = (topk_ids == token_ids[:, None]).any(-1)
    lp = torch.cat([topk_lp.to(torch.float64),
                    torch.where(in_topk, float("-inf"), token_lp.to(torch.float64))[:, None]], dim=-1)
    tail = log1mexp(torch.logsumexp(lp, dim=-1))
    whole = (k + (~in_topk).long()) >= vocab_size
    return torch.where(whole, float("-inf"), tail).to(torch.float32)


class VllmEngine:
    """Score and Generate on a vLLM `AsyncLLM`; thread-safe, one call per gRPC thread."""

    batches_itself = True  # the server hands calls straight to it, without our Batcher

    def __init__(self, config: VllmEngineConfig, metrics: "TeacherMetrics | None" = None) -> None:
        from .engine import DTYPES
        from .model_dirs import check_model_dir, load_tokenizer_facts

        if config.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
        path = check_model_dir(config.model_dir)
        _quiet_defaults()
        import vllm  # noqa: F401 - fail here, before any thread starts, when vLLM is missing

        self.config = config
        self.metrics = metrics
        self.name = path.resolve().name
        self.fingerprint, self._tokenizer_size = load_tokenizer_facts(path)
        self.vllm_version = vllm_version()
        self._ids = itertools.count()
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop",
                                        daemon=True)
        self._thread.start()
        try:
            self._llm = self._run(self._start(path)).result()
        except BaseException:
            self._stop_loop()
            raise
        mc = self._llm.model_config
        self.vocab_size = int(mc.get_vocab_size())
        if self._tokenizer_size is not None and self._tokenizer_size < self.vocab_size:
            self._mask_padded_vocab(self._tokenizer_size)
        self.max_model_len = int(mc.max_model_len)
        # A Score sequence is a vLLM prompt that must leave room for one generated token.
        self.max_sequence_length = self.max_model_len - 1
        from vllm.platforms import current_platform

        self.device = str(current_platform.device_type)
        log.info("vLLM %s engine on %s: %s (vocab %d, max_model_len %d)", self.vllm_version,
                 self.device, self.name, self.vocab_size, self.max_model_len)

    def _mask_padded_vocab(self, tokenizer_size: int) -> None:
        """A head padded past the tokenizer: its extra rows get -inf logits in every worker
        (teacher_server.vllm_worker), so scores, samples and the tail are over the tokenizer's
        tokens, as TeacherEngine's, which cuts those rows."""
        hooked = self._run(self._llm.collective_rpc("mask_padded_vocab", args=(tokenizer_size,))).result()
        if not hooked or not all(hooked):
            self.close()
            raise RuntimeError(f"could not mask the head's rows past the tokenizer's {tokenizer_size} "
                               f"tokens in vLLM's model (hooked per worker: {hooked})")
        log.info("head padded to %d rows: ids from %d on are masked (the tokenizer's size)",
                 self.vocab_size, tokenizer_size)
        self.vocab_size = tokenizer_size

    @classmethod
    def load(cls, config: VllmEngineConfig, metrics: "TeacherMetrics | None" = None) -> "VllmEngine":
        return cls(config, metrics)

    async def _start(self, path: Path):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        cfg = self.config
        max_pos = _max_positions(path)
        max_model_len = max_pos if cfg.max_sequence_length is None else min(cfg.max_sequence_length + 1,
                                                                            max_pos)
        eager = cfg.enforce_eager if cfg.enforce_eager is not None else current_platform.is_cpu()
        kwargs: dict[str, Any] = dict(
            model=str(path), dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
            max_model_len=max_model_len, max_logprobs=cfg.top_k_limit,
            logprobs_mode="processed_logprobs", tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=(cfg.gpu_memory_utilization if cfg.gpu_memory_utilization is not None
                                    else 0.1 if current_platform.is_cpu() else 0.9),
            kv_cache_memory_bytes=cfg.kv_cache_memory_bytes, enforce_eager=eager, seed=cfg.seed,
            skip_tokenizer_init=True, generation_config="vllm", disable_log_stats=True,
        )
        if cfg.fp32_head and cfg.dtype != "float32":
            kwargs["hf_overrides"] = {"head_dtype": "float32"}
        for key in ("max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching"):
            if getattr(cfg, key) is not None:
                kwargs[key] = getattr(cfg, key)
        # Mixed into vLLM's workers: masks a head padded past the tokenizer (_mask_padded_vocab).
        kwargs["worker_extension_cls"] = "teacher_server.vllm_worker.VocabMask"
        kwargs.update(dict(cfg.extra_engine_args))
        # Created on the loop's thread, so vLLM's output handler task lives on this loop.
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    # ------------------------------------------------------------------ facts
    @property
    def limits(self) -> Limits:
        return Limits(vocab_size=self.vocab_size, max_sequence_length=self.max_sequence_length,
                      top_k_limit=self.config.top_k_limit, max_full_row_positions=0)

    def info(self) -> TeacherInfo:
        return TeacherInfo(model_name=self.name, vocab_size=self.vocab_size,
                           tokenizer_fingerprint=self.fingerprint,
                           max_sequence_length=self.max_sequence_length,
                           dtype=self.config.dtype, top_k_limit=self.config.top_k_limit,
                           max_full_row_positions=0, device=self.device, engine=self.engine_version)

    @property
    def engine_version(self) -> str:
        """"vllm <version>", as Info reports it."""
        return f"{ENGINE_NAME} {self.vllm_version}"

    @property
    def inflight(self) -> int:
        """Calls now in this engine (waiting in vLLM or running)."""
        return self._inflight

    @property
    def unfinished_requests(self) -> int:
        """vLLM requests (one per sequence or prompt) not finished or aborted yet."""
        return 0 if self._llm is None else int(self._llm.get_num_unfinished_requests())

    # ------------------------------------------------------------------ lifecycle
    def warmup(self) -> None:
        """One tiny Score and Generate, so the first real request does not pay vLLM's start-up
        compilation (tens of seconds on CPU)."""
        ids = torch.zeros(2, dtype=torch.long)
        self.score(ScoreArgs([ids], [1], top_k=min(1, self.config.top_k_limit)))
        self.generate([ids], SamplingParams(max_new_tokens=1, temperature=0.0))

    def close(self) -> None:
        """Shut vLLM's engine process down and stop the event loop (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._shutdown()).result(120)
        finally:
            self._stop_loop()
            # Collected now, while the interpreter is whole: AsyncLLM.__del__ shuts down again.
            self._llm = None
            gc.collect()

    async def _shutdown(self) -> None:
        # Stop vLLM's output handler first, on its own loop; otherwise it sees the engine process
        # go away and logs an EngineDeadError for a normal shutdown.
        handler = getattr(self._llm, "output_handler", None)
        if handler is not None:
            handler.cancel()
            await asyncio.gather(handler, return_exceptions=True)
            self._llm.output_handler = None
        self._llm.shutdown()

    def __enter__(self) -> "VllmEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # ------------------------------------------------------------------ score
    def score(self, args: ScoreArgs, *,
              cancelled: Callable[[int], bool] | None = None) -> list[ScoredSequence | None]:
        """Log-probs at positions score_from..len-1 of each sequence (see the module docstring).

        Validates the request itself (InvalidRequest), so it is safe to call directly. Rows whose
        `cancelled(i)` turns true while waiting are aborted in vLLM and return None.
        """
        if args.full_logprobs:
            raise InvalidRequest("this teacher (vLLM engine) does not return full log-prob rows; "
                                 "use top_k (its Info says max_full_row_positions = 0)")
        validate_score(args, self.limits)
        if args.temperature != 1.0:
            raise InvalidRequest(f"this teacher (vLLM engine) scores at temperature 1 only, got "
                                 f"{args.temperature}: vLLM's prompt log-probs are not "
                                 f"temperature-scaled")
        from vllm import SamplingParams as VllmParams
        from vllm.sampling_params import RequestOutputKind

        params = VllmParams(max_tokens=1, temperature=0.0, prompt_logprobs=args.top_k,
                            flat_logprobs=True, detokenize=False, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
        k = args.top_k
        rows: dict[int, Any] = {}
        results: list[ScoredSequence | None] = [None] * len(args.sequences)
        for i, (ids, start) in enumerate(zip(args.sequences, args.score_from)):
            if start >= len(ids):  # nothing to score: no vLLM request
                results[i] = ScoredSequence(torch.empty(0, k, dtype=torch.long), torch.empty(0, k),
                                            torch.empty(0), torch.empty(0))
            else:
                rows[i] = (ids.tolist(), params)
        start = time.monotonic()
        for i, out in self._submit_and_wait(rows, cancelled).items():
            results[i] = None if out is None else self._scored(out, args.score_from[i], k,
                                                              args.sequences[i])
        if self.metrics is not None:
            self.metrics.observe_batch("score", 1, sum(len(rows[i][0]) for i in rows),
                                       time.monotonic() - start)
        return results

    def _scored(self, out, score_from: int, k: int, ids: torch.Tensor) -> ScoredSequence:
        plp = out.prompt_logprobs  # FlatLogprobs; position 0 is empty
        n = len(ids) - score_from
        starts = torch.tensor(plp.start_indices[score_from:], dtype=torch.long)
        ends = torch.tensor(plp.end_indices[score_from:], dtype=torch.long)
        if len(starts) != n or not bool(((ends - starts) == k + 1).all()):
            raise RuntimeError(f"vLLM returned prompt log-probs of an unexpected shape for a "
                               f"sequence of {len(ids)} tokens scored from {score_from}")
        first = int(starts[0])
        lp = torch.tensor(plp.logprobs[first:], dtype=torch.float32).view(n, k + 1)
        tok = torch.tensor(plp.token_ids[first:], dtype=torch.long).view(n, k + 1)
        if not torch.equal(tok[:, 0], ids[score_from:]):
            raise RuntimeError("vLLM's prompt log-probs are not for the tokens sent")
        topk_ids, topk_lp = tok[:, 1:].contiguous(), lp[:, 1:].contiguous()
        token_lp = lp[:, 0].contiguous()
        return ScoredSequence(topk_ids=topk_ids, topk_logprobs=topk_lp, token_logprobs=token_lp,
                              tail_logprobs=tail_from_returned(token_lp, tok[:, 0], topk_lp, topk_ids,
                                                               self.vocab_size))

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        prompts: Sequence[torch.Tensor],
        params: SamplingParams,
        *,
        seeds: Sequence[int | None] | None = None,
        max_new_tokens: Sequence[int] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[Generation | None]:
        """Continue each prompt with vLLM's sampler; rows cancelled while waiting return None.

        Validates the request itself (InvalidRequest). `seeds` / `max_new_tokens` override the
        per-row defaults (row_seed(params.seed, i) / params.max_new_tokens), as in TeacherEngine.
        """
        prompts = list(prompts)
        validate_generate(prompts, params, self.limits)
        t = params.temperature
        if 0 < t < VLLM_MIN_TEMPERATURE or t > VLLM_MAX_TEMPERATURE:
            raise InvalidRequest(f"this teacher (vLLM engine) samples at temperature 0 or in "
                                 f"[{VLLM_MIN_TEMPERATURE}, {VLLM_MAX_TEMPERATURE}], got {t}")
        filtered = (0 < params.top_k < self.vocab_size) or params.top_p < 1.0
        if (params.return_logprobs or params.logprobs_top_k) and t > 0 and filtered:
            raise InvalidRequest("this teacher (vLLM engine) cannot return log-probs together with "
                                 "a top_k / top_p filter (vLLM reports them after the filter, the "
                                 "contract before it); drop the filter or the log-probs")
        from vllm import SamplingParams as VllmParams
        from vllm.sampling_params import RequestOutputKind

        from .sampling import derive_seed as row_seed

        n = len(prompts)
        if seeds is None:
            seeds = [None if params.seed is None else row_seed(params.seed, i) for i in range(n)]
        budget = list(max_new_tokens) if max_new_tokens is not None else [params.max_new_tokens] * n
        want_lp = params.return_logprobs or params.logprobs_top_k > 0
        rows = {}
        for i, ids in enumerate(prompts):
            vp = VllmParams(
                max_tokens=int(budget[i]), temperature=float(t), top_p=float(params.top_p),
                top_k=int(params.top_k), seed=seeds[i], stop_token_ids=list(params.stop_ids),
                ignore_eos=True, logprobs=params.logprobs_top_k if want_lp else None,
                flat_logprobs=True, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)
            rows[i] = (ids.tolist(), vp)
        start = time.monotonic()
        outs = self._submit_and_wait(rows, cancelled)
        gens = [None if outs[i] is None else self._generation(outs[i], params) for i in range(n)]
        if self.metrics is not None:
            self.metrics.observe_batch("generate", 1, sum(len(g.token_ids) for g in gens if g is not None),
                                       time.monotonic() - start)
        return gens

    @staticmethod
    def _generation(out, params: SamplingParams) -> Generation:
        o = out.outputs[0]
        ids = torch.tensor(list(o.token_ids), dtype=torch.long)
        finish = "stop" if o.finish_reason == "stop" else "length"
        k = params.logprobs_top_k
        token_lp = topk_ids = topk_lp = None
        if params.return_logprobs or k:
            lps = o.logprobs  # FlatLogprobs: per token [sampled, top-1 .. top-k]
            n = len(ids)
            lp = torch.tensor(lps.logprobs, dtype=torch.float32).view(n, k + 1)
            tok = torch.tensor(lps.token_ids, dtype=torch.long).view(n, k + 1)
            if params.return_logprobs:
                token_lp = lp[:, 0].contiguous()
            if k:
                topk_ids, topk_lp = tok[:, 1:].contiguous(), lp[:, 1:].contiguous()
        return Generation(token_ids=ids, finish_reason=finish, token_logprobs=token_lp,
                          topk_ids=topk_ids, topk_logprobs=topk_lp)

    # ------------------------------------------------------------------ plumbing
    def _submit_and_wait(self, rows: dict[int, tuple[list[int], Any]],
                         cancelled: Callable[[int], bool] | None) -> dict[int, Any]:
        """Send each row to vLLM as its own request; wait for all, aborting rows whose
        `cancelled(i)` turns true. Returns {row: final RequestOutput, or None if cancelled}."""
        if not rows:
            return {}
        if self._closed:
            raise TeacherUnavailable("the vLLM engine is shut down")
        with self._inflight_lock:
            if self.config.max_queue is not None and self._inflight >= self.config.max_queue:
                if self.metrics is not None:
                    self.metrics.rejected.inc()
                raise Overloaded(f"teacher queue is full ({self.config.max_queue} calls in flight)")
            self._inflight += 1
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._inflight)
        futures: dict[concurrent.futures.Future, int] = {}
        try:
            call = next(self._ids)
            out: dict[int, Any] = {}
            for i, (ids, vp) in rows.items():
                if cancelled is not None and cancelled(i):  # never sent
                    out[i] = None
                    continue
                futures[self._run(self._one(f"distillery-{call}-{i}", ids, vp))] = i
            pending = set(futures)
            while pending:
                done, pending = concurrent.futures.wait(
                    pending, timeout=None if cancelled is None else self.config.poll_s)
                for f in done:
                    out[futures[f]] = self._result(f)
                if cancelled is not None:
                    for f in list(pending):
                        if cancelled(futures[f]):
                            f.cancel()  # cancels the task on the loop: vLLM aborts the request
                            pending.discard(f)
                            out[futures[f]] = None
                            if self.metrics is not None:
                                self.metrics.cancelled.inc()
            return out
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            with self._inflight_lock:
                self._inflight -= 1
                if self.metrics is not None:
                    self.metrics.queue_depth.set(self._inflight)

    async def _one(self, request_id: str, ids: list[int], vp):
        from vllm.inputs import tokens_input

        final = None
        async for final in self._llm.generate(tokens_input(ids), vp, request_id):
            pass
        return final

    @staticmethod
    def _result(f: concurrent.futures.Future):
        if f.cancelled():
            return None
        exc = f.exception()
        if exc is None:
            return f.result()
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, VLLMClientError):
            raise InvalidRequest(f"vLLM refused the request: {exc}") from exc
        if isinstance(exc, EngineDeadError):
            raise TeacherUnavailable(f"the vLLM engine died: {exc}") from exc
        raise exc


def _max_positions(path: Path) -> int:
    """The model's max_position_embeddings from its config.json (2048 when it has none)."""
    import json

    cfg = json.loads((path / "config.json").read_text())
    text = cfg.get("text_config") or {}
    return int(cfg.get("max_position_embeddings") or text.get("max_position_embeddings") or 2048)
