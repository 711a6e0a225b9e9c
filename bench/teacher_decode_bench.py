"""Teacher Generate / Score costs: last-position prefill, on-device sampling, float32 output head.

    python bench/teacher_decode_bench.py            # Llama 256 x 4 layers, vocab 32k, CPU
    python bench/teacher_decode_bench.py --quick    # a smoke run on a tiny model
    python bench/teacher_decode_bench.py --device cuda --hidden 2048 --layers 16

"Before" is a minimal copy, kept in this file, of the loop the engine used until this change:
the prefill asks the model for logits at every prompt position ([B, T, V]) and keeps the last;
each step copies the [B, V] probabilities to the host and draws row by row with torch.multinomial
(CPU generators); bf16 / fp16 weights give bf16 / fp16 logits, upcast afterwards. "After" is the
code in teacher_server: sampling.generate with fp32_head=True, as TeacherEngine.generate calls it
(decoder + float32 head at the last position; batched inverse-CDF draws on the model's device from
per-row generators there), and TeacherEngine.score. Both run in the same process on the same
model and inputs.

Rows:
1. prefill of --prompts x --prompt-len tokens: wall time (median of --repeats, after a warm-up)
   and peak memory. Memory on CPU: the process's peak resident set during one prefill (VmHWM,
   reset to the current resident set just before it through /proc/self/clear_refs) minus its
   resident set just before it, in a fresh subprocess per variant and run (median of
   --mem-repeats); on CUDA: torch.cuda.max_memory_allocated over the allocation before the
   prefill, also per subprocess.
2. decode: generated tokens per second of a whole generate call (its short prefill included),
   --decode-prompts prompts of mixed lengths, --new-tokens each, temperature 1, log-probs on.
3. bf16 (and fp16) vs float32 on full rows: max and mean |delta log p| over every position of
   --score-seqs sequences, the bf16 engine's Score with the old head and with the float32 head,
   against the float32 engine's Score on the same weights; and old head against float32 head on
   the same bf16 hidden states, which is the part of the gap the float32 head removes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.demo.tiny import build_model  # noqa: E402
from teacher_server.contract import Generation, SamplingParams, ScoreArgs  # noqa: E402
from teacher_server.engine import EngineConfig, TeacherEngine  # noqa: E402
from teacher_server.sampling import (  # noqa: E402
    _last_logits_fn,
    cache_arg,
    output_cache,
    _generation,
    attention_mask_4d,
    derive_seed,
    filter_logits,
    generate,
    left_pad,
    temper,
)


# ------------------------------------------------------------------ before: the old code path
def old_next_tokens(scaled, params, gens):
    if params.temperature == 0:
        return scaled.argmax(-1)
    probs = filter_logits(scaled, params.top_k, params.top_p).softmax(-1).cpu()
    return torch.stack([torch.multinomial(probs[r], 1, generator=g)[0]
                        for r, g in enumerate(gens)]).to(scaled.device)


@torch.no_grad()
def old_generate(model, prompts, params):
    """The engine's generate loop before this change (no cancellation, default seeds/budgets)."""
    n = len(prompts)
    device = next(model.parameters()).device
    seeds = [derive_seed(params.seed, i) for i in range(n)]
    budget = [params.max_new_tokens] * n
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    stop = set(params.stop_ids)
    out_ids, out_lp = [[] for _ in range(n)], [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    active = list(range(n))
    ids, mask = left_pad(prompts, device)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=attention_mask_4d(mask, ids.shape[1]),
                position_ids=position_ids, use_cache=True)
    cache, last_pos, logits = output_cache(out), position_ids[:, -1], out.logits[:, -1].float()
    while True:
        scaled = temper(logits, params.temperature) if params.temperature > 0 else logits
        logprobs = torch.log_softmax(scaled, dim=-1)
        tokens = old_next_tokens(scaled, params, [gens[i] for i in active])
        keep = []
        for r, i in enumerate(active):
            tok = int(tokens[r])
            out_ids[i].append(tok)
            if params.return_logprobs:
                out_lp[i].append(logprobs[r, tok])
            if tok in stop:
                finish[i] = "stop"
            elif len(out_ids[i]) >= budget[i]:
                finish[i] = "length"
            else:
                keep.append(r)
        if not keep:
            break
        if len(keep) < len(active):
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, last_pos, tokens = mask[sel], last_pos[sel], tokens[sel]
            active = [active[r] for r in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        last_pos = last_pos + 1
        out = model(input_ids=tokens[:, None], attention_mask=attention_mask_4d(mask, 1),
                    position_ids=last_pos[:, None], use_cache=True, **{cache_arg(model): cache})
        cache, logits = output_cache(out), out.logits[:, -1].float()
    return [_generation(out_ids[i], out_lp[i], [], finish[i] or "length", params) for i in range(n)]


def old_prefill(model, ids, mask, position_ids):
    out = model(input_ids=ids, attention_mask=attention_mask_4d(mask, ids.shape[1]),
                position_ids=position_ids, use_cache=True)
    return output_cache(out), out.logits[:, -1].float()


def old_logprobs(engine: TeacherEngine):
    """TeacherEngine._logprobs before this change: logits in the weights' dtype, upcast afterwards."""
    def _logprobs(states: torch.Tensor, temperature: float) -> torch.Tensor:
        logits = engine._head(states).float()
        if engine._softcap:
            logits = torch.tanh(logits / engine._softcap) * engine._softcap
        return torch.log_softmax(temper(logits, temperature), dim=-1)
    return _logprobs


# ------------------------------------------------------------------ helpers
def prefill_inputs(args, vocab: int, device):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=g) for _ in range(args.prompts)]
    ids, mask = left_pad(prompts, device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def run_prefill(variant: str, engine: TeacherEngine, ids, mask, position_ids):
    with torch.inference_mode():
        if variant == "before":
            _, logits = old_prefill(engine.model, ids, mask, position_ids)
        else:
            forward = _last_logits_fn(engine.model, fp32_head=(variant == "after"))
            _, logits = forward(input_ids=ids, attention_mask=attention_mask_4d(mask, ids.shape[1]),
                                position_ids=position_ids, cache=None)
    return logits


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def proc_status_kib(field: str) -> int:
    """VmRSS / VmHWM of this process in KiB (Linux). ru_maxrss would not do: it survives exec, so
    a child started by a large parent reports the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_memory(args) -> None:
    """One prefill in this fresh process; prints {"mb": peak growth} as JSON."""
    torch.set_num_threads(args.threads)
    engine = TeacherEngine.load(EngineConfig(model_dir=str(args.model_dir), device=args.device,
                                             dtype=args.dtype))
    ids, mask, position_ids = prefill_inputs(args, engine.vocab_size, engine.device)
    if engine.device.type == "cuda":
        sync(args.device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_prefill(args.child, engine, ids, mask, position_ids)
        sync(args.device)
        print(json.dumps({"mb": (torch.cuda.max_memory_allocated() - before) / 2**20}))
        return
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = proc_status_kib("VmRSS")
    run_prefill(args.child, engine, ids, mask, position_ids)
    print(json.dumps({"mb": (proc_status_kib("VmHWM") - before) / 1024}))


def memory_mb(args, variant: str) -> float:
    cmd = [sys.executable, __file__, "--child", variant, "--model-dir", str(args.model_dir),
           "--device", args.device, "--dtype", args.dtype, "--prompts", str(args.prompts),
           "--prompt-len", str(args.prompt_len), "--threads", str(args.threads)]
    runs = []
    for _ in range(args.mem_repeats):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return statistics.median(r["mb"] for r in runs)


def median_time(fn, repeats: int, device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_prompts(args, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lo, hi = max(1, args.decode_prompt_len // 2), args.decode_prompt_len
    return [torch.randint(3, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g)
            for _ in range(args.decode_prompts)]


def delta_rows(args, dtype: str) -> dict[str, tuple[float, float]]:
    ref = TeacherEngine.load(EngineConfig(model_dir=str(args.model_dir), device=args.device))
    low = TeacherEngine.load(EngineConfig(model_dir=str(args.model_dir), device=args.device, dtype=dtype))
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, ref.vocab_size, (args.score_len,), generator=g) for _ in range(args.score_seqs)]
    score = ScoreArgs(seqs, [1] * len(seqs), top_k=0, full_logprobs=True)
    expected = [r.full_logprobs for r in ref.score(score)]
    after = [r.full_logprobs for r in low.score(score)]
    low._logprobs = old_logprobs(low)  # the same Score path with the old head
    before = [r.full_logprobs for r in low.score(score)]
    out = {}
    for name, got, ref_rows in (("before", before, expected), ("after", after, expected),
                                ("head", before, after)):  # head: the old head's own rounding
        diff = torch.cat([(a - b).abs().flatten() for a, b in zip(got, ref_rows)])
        out[name] = (float(diff.max()), float(diff.mean()))
    return out


# ------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-prompts", type=int, default=16)
    p.add_argument("--decode-prompt-len", type=int, default=32, help="longest decode prompt")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--score-seqs", type=int, default=8)
    p.add_argument("--score-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mem-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="weights for the prefill and decode rows")
    p.add_argument("--model-dir", type=Path, default=None, help="benchmark this model instead")
    p.add_argument("--quick", action="store_true", help="tiny model, small inputs: a smoke run")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab = 64, 2, 4096
        args.prompts, args.prompt_len, args.decode_prompts, args.new_tokens = 4, 64, 4, 8
        args.score_seqs, args.score_len, args.repeats, args.mem_repeats = 2, 32, 2, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        child_memory(args)
        return {}
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir is None:
            args.model_dir = build_model(Path(tmp) / "model", family="llama", tokenizer_vocab=args.vocab,
                                         hidden=args.hidden, layers=args.layers, heads=args.heads,
                                         max_positions=max(1024, args.prompt_len + args.new_tokens))
        return measure(args)


def measure(args) -> dict:
    engine = TeacherEngine.load(EngineConfig(model_dir=str(args.model_dir), device=args.device,
                                             dtype=args.dtype))
    n_params = sum(p.numel() for p in engine.model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters, vocab {engine.vocab_size}, {args.dtype} on "
          f"{args.device}, {torch.get_num_threads()} threads", flush=True)
    results: dict = {}

    ids, mask, position_ids = prefill_inputs(args, engine.vocab_size, engine.device)
    variants = {"before": "before: logits at every position",
                "after": "after: decoder + float32 head at the last position (engine)",
                "keep1": "after: model forward with logits_to_keep=1 (student rollouts)"}
    same = torch.equal(run_prefill("before", engine, ids, mask, position_ids).argmax(-1),
                       run_prefill("after", engine, ids, mask, position_ids).argmax(-1))
    for v in variants:
        t = median_time(lambda: run_prefill(v, engine, ids, mask, position_ids), args.repeats, args.device)
        mb = memory_mb(args, v)
        results[v] = {"s": t, "mb": mb}
        print(f"  prefill {v}: {t:.3f} s, {mb:.0f} MB", flush=True)

    prompts = decode_prompts(args, engine.vocab_size)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=0, return_logprobs=True)
    n_tokens = args.decode_prompts * args.new_tokens

    def decode(fn):
        def run():
            with torch.inference_mode():
                gens: list[Generation] = fn()
            assert sum(len(g.token_ids) for g in gens) == n_tokens
        return run

    for name, fn in (("decode before", lambda: old_generate(engine.model, prompts, params)),
                     ("decode after", lambda: generate(engine.model, prompts, params, fp32_head=True))):
        t = median_time(decode(fn), args.repeats, args.device)
        results[name] = n_tokens / t
        print(f"  {name}: {n_tokens / t:,.0f} tokens/s", flush=True)

    for dtype in ("bfloat16", "float16"):
        results[dtype] = delta_rows(args, dtype)
        print(f"  {dtype}: {results[dtype]}", flush=True)

    print()
    print(f"Prefill: {args.prompts} prompts x {args.prompt_len} tokens, {args.dtype}; memory = "
          + ("peak CUDA allocation over the allocation before the prefill"
             if torch.device(args.device).type == "cuda"
             else "peak RSS during the prefill (VmHWM) minus RSS just before it, fresh process")
          + f"; greedy next tokens identical before/after: {same}")
    print()
    print("| prefill | time (s) | × before | peak memory (MB) | × before |")
    print("|---|---:|---:|---:|---:|")
    for v, label in variants.items():
        r, b = results[v], results["before"]
        print(f"| {label} | {r['s']:.3f} | {r['s'] / b['s']:.2f} | {r['mb']:,.0f} | {r['mb'] / b['mb']:.2f} |")
    print()
    before, after = results["decode before"], results["decode after"]
    print(f"| decode ({args.decode_prompts} prompts, {args.new_tokens} new tokens, temperature 1) "
          "| tokens/s | × before |")
    print("|---|---:|---:|")
    print(f"| before: host copy of [B, V] probabilities, row-by-row multinomial | {before:,.0f} | 1.00 |")
    print(f"| after: per-row generators on the device, batched inverse-CDF draw | {after:,.0f} | {after / before:.2f} |")
    print()
    print(f"| vs float32 on full rows ({args.score_seqs} x {args.score_len - 1} positions) "
          "| max abs Δ log p | mean abs Δ log p |")
    print("|---|---:|---:|")
    for dtype in ("bfloat16", "float16"):
        for name, label in (("before", "head in the weights' dtype (before)"),
                            ("after", "float32 head (after)"),
                            ("head", "before vs after on the same hidden states (the head's rounding)")):
            mx, mean = results[dtype][name]
            print(f"| {dtype}, {label} | {mx:.4f} | {mean:.5f} |")
    return results


if __name__ == "__main__":
    main()
