"""Warmup-Distill: hand-made flag and replacement cases, build_pairs against a scripted teacher and a
real LocalTeacher, preference training on tiny models. CPU, seeded."""

from __future__ import annotations

import math
from typing import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from student_worker.config import WarmupSpec
from student_worker.warmup import (
    PairStats,
    PreferencePair,
    build_pairs,
    first_flag,
    flag_tokens,
    frozen_copy,
    preference_loss,
    replacement_token,
    response_token_logprobs,
)
from teacher_server.contract import Generation, SamplingParams, ScoredSequence, TeacherInfo, as_ids
from teacher_server.in_process import LocalTeacher

LOG = math.log


def load(model_dir) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def as_lists(pairs: Sequence[PreferencePair]):
    return [(p.prompt.tolist(), p.chosen.tolist(), p.rejected.tolist(), p.flagged_at) for p in pairs]


# ---- flag_tokens / first_flag: one hand-made response, every rule --------------------------------

# Four response tokens. Teacher P, student Q of each, and the teacher's top-3 at each position.
TOKENS = torch.tensor([5, 6, 7, 8])
P = torch.tensor([0.9, 0.6, 0.1, 0.05])
Q = torch.tensor([0.95, 0.7, 0.8, 0.9])
TOPK = torch.tensor([[5, 1, 2],   # token at rank 1
                     [2, 6, 1],   # rank 2
                     [3, 1, 7],   # rank 3
                     [1, 2, 3]])  # outside the top 3


def flags(rule: str, threshold: float = 0.5, rank_k: int = 2, p=P, q=Q) -> list[bool]:
    spec = WarmupSpec(rule=rule, threshold=threshold, rank_k=rank_k)
    return flag_tokens(p.log(), q.log(), TOPK, TOKENS, spec).tolist()


@pytest.mark.parametrize("rule, threshold, rank_k, expected, first", [
    # Q - P = [0.05, 0.1, 0.7, 0.85]
    ("prob_diff", 0.5, 3, [False, False, True, True], 2),
    ("prob_diff", 0.8, 3, [False, False, False, True], 3),
    ("prob_diff", 0.07, 3, [False, True, True, True], 1),
    # log Q - log P = [0.054, 0.154, 2.079, 2.890]
    ("log_ratio", 1.0, 3, [False, False, True, True], 2),
    ("log_ratio", 2.5, 3, [False, False, False, True], 3),
    ("log_ratio", 0.0, 3, [True, True, True, True], 0),
    ("log_ratio", 3.0, 3, [False, False, False, False], None),
    # P < η
    ("teacher_prob", 0.2, 3, [False, False, True, True], 2),
    ("teacher_prob", 0.08, 3, [False, False, False, True], 3),
    ("teacher_prob", 0.7, 3, [False, True, True, True], 1),
    # outside the teacher's top rank_k (threshold unused)
    ("teacher_rank", 0.5, 1, [False, True, True, True], 1),
    ("teacher_rank", 0.5, 2, [False, False, True, True], 2),
    ("teacher_rank", 0.5, 3, [False, False, False, True], 3),
])
def test_flag_rules_by_hand(rule, threshold, rank_k, expected, first):
    got = flags(rule, threshold, rank_k=rank_k)
    assert got == expected
    assert first_flag(torch.tensor(got)) == first


def test_a_margin_equal_to_the_threshold_is_not_flagged():
    same = torch.tensor([0.5, 0.25, 0.125, 1.0])  # exact in binary: M = 0 exactly
    assert flags("prob_diff", 0.0, p=same, q=same) == [False] * 4
    assert flags("log_ratio", 0.0, p=same, q=same) == [False] * 4


def test_log_ratio_with_zero_probabilities():
    lp_teacher = torch.tensor([float("-inf"), float("-inf"), LOG(0.5), LOG(0.5)])
    lp_student = torch.tensor([LOG(0.1), float("-inf"), float("-inf"), LOG(0.5)])
    spec = WarmupSpec(rule="log_ratio", threshold=5.0)
    # P = 0 < Q: +inf margin, flagged; P = Q = 0: NaN margin, not flagged.
    assert flag_tokens(lp_teacher, lp_student, TOPK, TOKENS, spec).tolist() == [True, False, False, False]


def test_teacher_rank_needs_enough_top_ids():
    with pytest.raises(ValueError, match="rank_k 5"):
        flags("teacher_rank", rank_k=5)


def test_first_flag_of_nothing():
    assert first_flag(torch.zeros(0, dtype=torch.bool)) is None
    assert first_flag(torch.tensor([False, False])) is None
    assert first_flag(torch.tensor([False, True, True])) == 1


# ---- replacement_token -----------------------------------------------------------------------

IDS = torch.tensor([40, 41, 42, 43])
LPS = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()


def test_argmax_skips_the_students_token():
    assert replacement_token(IDS, LPS, 40, "argmax", None) == 41  # student's token is the top-1
    assert replacement_token(IDS, LPS, 41, "argmax", None) == 40
    assert replacement_token(IDS, LPS, 99, "argmax", None) == 40  # student's token outside the top-K


def test_sample_never_returns_the_students_token_and_is_seeded():
    def draws(seed: int, student: int, n: int = 400) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return [replacement_token(IDS, LPS, student, "sample", gen) for _ in range(n)]

    got = draws(0, student=40)
    assert 40 not in got and set(got) == {41, 42, 43}
    assert got == draws(0, student=40)
    assert got != draws(1, student=40)
    # Renormalized over {41, 42, 43}: 0.6, 0.3, 0.1.
    for token, p in ((41, 0.6), (42, 0.3), (43, 0.1)):
        assert abs(got.count(token) / len(got) - p) < 0.08
    # With K = 2 and the student's token at the top, the other one is the only choice.
    gen = torch.Generator().manual_seed(0)
    assert {replacement_token(IDS[:2], LPS[:2], 40, "sample", gen) for _ in range(20)} == {41}


def test_replacement_skips_impossible_tokens():
    lps = torch.tensor([LOG(0.9), float("-inf"), float("-inf")])
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="no token other than the student's"):
        replacement_token(ids, lps, 1, "argmax", None)
    lps = torch.tensor([LOG(0.9), LOG(0.1), float("-inf")])
    gen = torch.Generator().manual_seed(0)
    assert {replacement_token(ids, lps, 1, "sample", gen) for _ in range(50)} == {2}
    with pytest.raises(ValueError, match="unknown replacement mode"):
        replacement_token(ids, lps, 1, "greedy", None)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(2, 8), data=st.data())
def test_replacement_properties(k, data):
    ids = torch.tensor(data.draw(st.lists(st.integers(0, 50), min_size=k, max_size=k, unique=True)))
    logits = torch.tensor(data.draw(st.lists(st.floats(-8, 8), min_size=k, max_size=k)))
    lps = torch.log_softmax(logits, 0).sort(descending=True).values
    student = data.draw(st.sampled_from(ids.tolist() + [99]))
    others = ids != student
    best = int(ids[others][lps[others].argmax()])
    assert replacement_token(ids, lps, student, "argmax", None) == best
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    token = replacement_token(ids, lps, student, "sample", gen)
    assert token != student and token in ids.tolist()


# ---- build_pairs with a scripted teacher ---------------------------------------------------------

EOS = 2
CONT = [10, 11, 12, 13, 14, 15, 16, 17]


class ScriptedTeacher:
    """A teacher double: per prompt, which response index it finds improbable and which token it
    would put there; its continuations are always a prefix of CONT. Records every call."""

    def __init__(self, script: dict[tuple[int, ...], tuple[int | None, int]], vocab: int,
                 top_k_limit: int = 128, max_sequence_length: int = 512) -> None:
        self.script, self.vocab, self.top_k_limit = script, vocab, top_k_limit
        self.max_sequence_length = max_sequence_length
        self.score_calls: list[tuple[list[torch.Tensor], list[int], int]] = []
        self.generate_calls: list[tuple[list[torch.Tensor], SamplingParams]] = []

    def info(self) -> TeacherInfo:
        return TeacherInfo(model_name="scripted", vocab_size=self.vocab, tokenizer_fingerprint="",
                           max_sequence_length=self.max_sequence_length, dtype="float32",
                           top_k_limit=self.top_k_limit, max_full_row_positions=4096, device="cpu")

    def score(self, sequences, score_from, *, top_k, temperature=1.0, full_logprobs=False):
        seqs = [as_ids(s) for s in sequences]
        self.score_calls.append((seqs, list(score_from), top_k))
        out = []
        for seq, start in zip(seqs, score_from):
            flag_at, repl = self.script[tuple(seq[:start].tolist())]
            response = seq[start:]
            others = [t for t in range(3, 3 + top_k + 2) if t not in (repl,)]
            ids, lps, tok, tail = [], [], [], []
            for j, y in enumerate(response.tolist()):
                if j == flag_at:  # y improbable: the teacher prefers repl, y is outside its top-k
                    assert y != repl and y not in others[:top_k - 1], "pick other seeds"
                    row = [repl] + others[:top_k - 1]
                    lp, tok_lp = [LOG(0.8)] + [LOG(0.1 / top_k)] * (top_k - 1), LOG(0.001)
                    rest = 1 - 0.8 - 0.1 * (top_k - 1) / top_k - 0.001
                else:  # y is the teacher's favourite
                    row = [y] + [t for t in others if t != y][:top_k - 1]
                    lp, tok_lp = [LOG(0.9)] + [LOG(0.05 / top_k)] * (top_k - 1), LOG(0.9)
                    rest = 1 - 0.9 - 0.05 * (top_k - 1) / top_k
                ids.append(row)
                lps.append(lp)
                tok.append(tok_lp)
                tail.append(LOG(rest))
            out.append(ScoredSequence(topk_ids=torch.tensor(ids).reshape(-1, top_k),
                                      topk_logprobs=torch.tensor(lps).reshape(-1, top_k),
                                      token_logprobs=torch.tensor(tok),
                                      tail_logprobs=torch.tensor(tail)))
        return out

    def generate(self, prompts, params: SamplingParams) -> list[Generation]:
        self.generate_calls.append(([as_ids(p) for p in prompts], params))
        assert all(len(p) + params.max_new_tokens <= self.max_sequence_length for p in prompts)
        ids = torch.tensor(CONT[:params.max_new_tokens])
        return [Generation(token_ids=ids, finish_reason="length") for _ in prompts]


def student_with_mode_probe(model_dir):
    model = load(model_dir)
    modes: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    return model, modes


def test_build_pairs_with_a_scripted_teacher(tiny_llama):
    student, modes = student_with_mode_probe(tiny_llama)
    student.train()
    max_new = 8
    prompts = [torch.tensor([20, 21, 22]), torch.tensor([30, 31]), torch.tensor([40, 41, 42, 43]),
               torch.tensor([50, 51, 52]), torch.tensor([60])]
    script = {
        (20, 21, 22): (2, 100),           # flagged at 2: continuation of budget 8 - 3 = 5
        (30, 31): (None, 0),              # never flagged: dropped
        (40, 41, 42, 43): (0, 101),       # flagged at 0: budget 7
        (50, 51, 52): (1, EOS),           # the teacher ends the response: no continuation
        (60,): (max_new - 1, 102),        # flagged at the last token: budget exhausted
    }
    teacher = ScriptedTeacher(script, vocab=student.config.vocab_size)
    spec = WarmupSpec(rule="teacher_prob", threshold=0.01, rank_k=1, samples_per_prompt=2,
                      max_new_tokens=max_new, sample_temperature=0.7)
    pairs, stats = build_pairs(student, teacher, prompts, spec, eos_id=EOS, seed=3)

    assert student.training and modes and not any(modes)  # eval while sampling, mode restored
    seqs, starts, top_k = teacher.score_calls[0]
    assert len(teacher.score_calls) == 1 and top_k == 2  # K = max(rank_k, 2)
    assert starts == [len(p) for p in prompts for _ in range(2)]
    rejected = [s[len(p):] for s, p in zip(seqs, [p for p in prompts for _ in range(2)])]
    assert all(1 <= len(r) <= max_new for r in rejected)

    expected = []
    for i, prompt in enumerate(p for p in prompts for _ in range(2)):
        flag_at, repl = script[tuple(prompt.tolist())]
        y = rejected[i]
        if flag_at is None or flag_at >= len(y):
            continue
        budget = 0 if repl == EOS else max_new - flag_at - 1
        chosen = y[:flag_at].tolist() + [repl] + CONT[:budget]
        expected.append((prompt.tolist(), chosen, y.tolist(), flag_at))
    assert len(expected) >= 6, "the student's samples ended too early to cover the script"
    assert as_lists(pairs) == expected
    assert all(isinstance(p, PreferencePair) for p in pairs)

    # Continuations: asked for prompt + head with the remaining budget, at the sample temperature.
    asked = {}
    for call_prompts, params in teacher.generate_calls:
        assert params.stop_ids == (EOS,) and params.temperature == 0.7 and params.seed is not None
        for p in call_prompts:
            asked[tuple(p.tolist())] = params.max_new_tokens
    want = {tuple(p + c[:t + 1]): max_new - t - 1 for p, c, _, t in expected
            if c[t] != EOS and t < max_new - 1}
    assert set(asked) == set(want)
    assert all(asked[k] >= want[k] for k in want)  # shared calls ask for the most, rows are cut

    assert stats == PairStats(samples=10, pairs=len(expected), dropped=10 - len(expected),
                              flagged_fraction=len(expected) / sum(len(r) for r in rejected),
                              mean_flagged_position=sum(e[3] for e in expected) / len(expected))
    assert stats.as_dict()["dropped"] == 10 - len(expected)


def test_continuations_fit_the_teachers_sequence_length(tiny_llama):
    student = load(tiny_llama)
    limit, max_new = 12, 8
    prompts = [torch.tensor([20]), torch.tensor([30, 31, 32, 33]), torch.tensor([40, 41, 42, 43, 44, 45])]
    script = {(20,): (0, 100), (30, 31, 32, 33): (2, 101), (40, 41, 42, 43, 44, 45): (1, 102)}
    teacher = ScriptedTeacher(script, vocab=student.config.vocab_size, max_sequence_length=limit)
    spec = WarmupSpec(rule="teacher_prob", threshold=0.01, samples_per_prompt=1, max_new_tokens=max_new)
    pairs, _ = build_pairs(student, teacher, prompts, spec, eos_id=EOS, seed=5)
    assert [p.flagged_at for p in pairs] == [0, 2, 1]
    # Budgets: min(max_new, limit - prompt) - head = 7, 5, 4; the rows cannot share one call.
    assert [len(p.chosen) for p in pairs] == [8, 8, 6]
    assert [p.chosen[p.flagged_at + 1:].tolist() for p in pairs] == [CONT[:7], CONT[:5], CONT[:4]]
    assert [params.max_new_tokens for _, params in teacher.generate_calls] == [7, 5, 4]
    assert len({params.seed for _, params in teacher.generate_calls}) == 3


def test_build_pairs_when_nothing_is_flagged(tiny_llama):
    student = load(tiny_llama)
    prompts = [torch.tensor([20, 21]), torch.tensor([30])]
    teacher = ScriptedTeacher({(20, 21): (None, 0), (30,): (None, 0)}, vocab=student.config.vocab_size)
    spec = WarmupSpec(rule="teacher_prob", threshold=0.5, samples_per_prompt=3, max_new_tokens=4)
    pairs, stats = build_pairs(student, teacher, prompts, spec, eos_id=EOS, seed=0)
    assert pairs == [] and teacher.generate_calls == []
    assert stats == PairStats(samples=6, pairs=0, dropped=6, flagged_fraction=0.0, mean_flagged_position=0.0)
    assert stats.as_dict() == {"samples": 6.0, "pairs": 0.0, "dropped": 6.0, "flagged_fraction": 0.0,
                               "mean_flagged_position": 0.0}


def test_build_pairs_refuses_a_top_k_the_teacher_cannot_give(tiny_llama):
    student = load(tiny_llama)
    teacher = ScriptedTeacher({}, vocab=student.config.vocab_size, top_k_limit=4)
    with pytest.raises(ValueError, match="top 10"):
        build_pairs(student, teacher, [torch.tensor([5])], WarmupSpec(rank_k=10), eos_id=EOS, seed=0)
    with pytest.raises(ValueError, match="non-empty"):
        build_pairs(student, teacher, [torch.tensor([], dtype=torch.long)], WarmupSpec(rank_k=2),
                    eos_id=EOS, seed=0)


# ---- build_pairs with a real teacher ---------------------------------------------------------

REAL_PROMPTS = [torch.tensor(p) for p in ([5, 60, 7, 80], [100, 9], [300, 301, 302], [44], [250, 12, 13])]
REAL_SPEC = WarmupSpec(rule="prob_diff", threshold=0.3, rank_k=4, replacement="sample",
                       samples_per_prompt=2, max_new_tokens=10)


@pytest.fixture(scope="module")
def real_teacher(tiny_qwen2) -> LocalTeacher:
    return LocalTeacher.from_model_dir(str(tiny_qwen2))  # seed 1; the student tiny_llama is seed 0


def test_build_pairs_with_a_real_teacher_is_deterministic(tiny_llama, real_teacher):
    student = load(tiny_llama)
    eos = student.config.eos_token_id
    first, stats = build_pairs(student, real_teacher, REAL_PROMPTS, REAL_SPEC, eos_id=eos, seed=7)
    again, stats_again = build_pairs(student, real_teacher, REAL_PROMPTS, REAL_SPEC, eos_id=eos, seed=7)
    other, _ = build_pairs(student, real_teacher, REAL_PROMPTS, REAL_SPEC, eos_id=eos, seed=8)
    assert as_lists(first) == as_lists(again) and stats == stats_again
    assert as_lists(first) != as_lists(other)
    assert stats.pairs == len(first) >= 3 and stats.samples == 10

    # Each pair agrees with the rule computed one sequence at a time, without padding.
    for pair in first:
        t, y = pair.flagged_at, pair.rejected
        s = real_teacher.score([torch.cat([pair.prompt, y])], [len(pair.prompt)], top_k=4)[0]
        with torch.no_grad():
            logits = student(torch.cat([pair.prompt, y])[None]).logits[0, len(pair.prompt) - 1:-1]
        q = torch.log_softmax(logits, -1).gather(-1, y[:, None])[:, 0].exp()
        margin = q - s.token_logprobs.exp()
        assert margin[t] > REAL_SPEC.threshold and (margin[:t] <= REAL_SPEC.threshold).all()
        assert torch.equal(pair.chosen[:t], y[:t]) and pair.chosen[t] != y[t]
        assert int(pair.chosen[t]) in s.topk_ids[t].tolist()
        assert len(pair.chosen) <= REAL_SPEC.max_new_tokens
        assert len(pair.chosen) == REAL_SPEC.max_new_tokens or int(pair.chosen[-1]) == eos


# ---- preference training ---------------------------------------------------------------------


def random_pairs(n: int, seed: int) -> list[PreferencePair]:
    """Pairs of varied prompt / response lengths, so padding and alignment are exercised."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> torch.Tensor:
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(3, 500, (n,), generator=g)

    return [PreferencePair(prompt=ids(1, 6), chosen=ids(1, 9), rejected=ids(1, 9), flagged_at=0)
            for _ in range(n)]


def unpadded_logps(model, prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.cat([prompt, response])[None]).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.double(), -1).gather(-1, response[:, None])[:, 0]


def test_response_logprobs_match_unpadded_forwards(tiny_llama):
    model = load(tiny_llama)
    pairs = random_pairs(5, seed=0)
    with torch.no_grad():
        logps, mask = response_token_logprobs(model, [p.prompt for p in pairs], [p.chosen for p in pairs],
                                              pad_id=0)
    for row, m, pair in zip(logps, mask, pairs):
        assert int(m.sum()) == len(pair.chosen) and bool(m[:len(pair.chosen)].all())
        torch.testing.assert_close(row[m].double(), unpadded_logps(model, pair.prompt, pair.chosen),
                                   atol=1e-4, rtol=1e-4)
        assert (row[~m] == 0).all()


def train(spec: WarmupSpec, model_dir, pairs, steps: int = 6, lr: float = 1e-3):
    policy = load(model_dir).train()
    reference = frozen_copy(policy)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        loss, metrics = preference_loss(policy, reference, pairs, spec, pad_id=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(metrics)
    assert all(p.grad is None for p in reference.parameters())
    return history


@pytest.fixture(scope="module")
def pairs() -> list[PreferencePair]:
    return random_pairs(6, seed=1)


def test_dpo_starts_at_log_2_and_widens_the_margin(tiny_llama, pairs):
    history = train(WarmupSpec(loss="dpo", beta=0.1), tiny_llama, pairs)
    start, end = history[0], history[-1]
    assert start["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert start["reward_margin"] == 0 and start["chosen_reward"] == 0 and start["accuracy"] == 0
    assert end["reward_margin"] > start["reward_margin"] + 0.1 and end["loss"] < start["loss"]
    assert (end["chosen_logps"] - end["rejected_logps"]) > (start["chosen_logps"] - start["rejected_logps"])
    assert end["accuracy"] > 0.5


def test_dpo_label_smoothing_at_zero_margin_is_still_log_2(tiny_llama, pairs):
    policy = load(tiny_llama)
    loss, _ = preference_loss(policy, frozen_copy(policy), pairs,
                              WarmupSpec(loss="dpo", label_smoothing=0.2), pad_id=0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("name", ["simpo", "hinge"])
def test_simpo_and_hinge_decrease_their_loss(tiny_llama, pairs, name):
    history = train(WarmupSpec(loss=name, beta=0.5, simpo_gamma=0.5), tiny_llama, pairs)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["reward_margin"] > history[0]["reward_margin"]
    if name == "hinge":
        assert history[0]["loss"] == pytest.approx(1.0, abs=1e-6)  # max(0, 1 - β·0)


def test_simpo_value_by_hand(tiny_llama, pairs):
    policy = load(tiny_llama)
    spec = WarmupSpec(loss="simpo", beta=0.5, simpo_gamma=0.3)
    loss, metrics = preference_loss(policy, policy, pairs, spec, pad_id=0)
    margins = [spec.beta * (unpadded_logps(policy, p.prompt, p.chosen).mean()
                            - unpadded_logps(policy, p.prompt, p.rejected).mean()) - spec.simpo_gamma
               for p in pairs]
    want = sum(-math.log(1 / (1 + math.exp(-float(m)))) for m in margins) / len(pairs)
    assert loss.item() == pytest.approx(want, rel=1e-4)


def test_sft_weight_adds_the_chosen_nll(tiny_llama, pairs):
    policy = load(tiny_llama)
    reference = frozen_copy(policy)
    base, m0 = preference_loss(policy, reference, pairs, WarmupSpec(sft_weight=0.0), pad_id=0)
    with_sft, m1 = preference_loss(policy, reference, pairs, WarmupSpec(sft_weight=0.5), pad_id=0)
    nll = -sum(float(unpadded_logps(policy, p.prompt, p.chosen).sum()) for p in pairs) / \
        sum(len(p.chosen) for p in pairs)
    assert m1["sft_nll"] == pytest.approx(nll, rel=1e-4) and m0["sft_nll"] == m1["sft_nll"]
    assert with_sft.item() - base.item() == pytest.approx(0.5 * nll, rel=1e-4)
    assert m1["preference_loss"] == pytest.approx(m0["loss"])


def test_frozen_copy_is_independent_and_frozen(tiny_llama):
    policy = load(tiny_llama).train()
    ref = frozen_copy(policy)
    assert not ref.training and policy.training
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)
    assert not torch.equal(next(policy.parameters()), next(ref.parameters()))


def test_preference_loss_needs_pairs(tiny_llama):
    policy = load(tiny_llama)
    with pytest.raises(ValueError, match="at least one pair"):
        preference_loss(policy, policy, [], WarmupSpec(), pad_id=0)
