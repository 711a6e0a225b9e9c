"""The built-in task's data and tokenizer, and SFT from scratch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.demo.sft import new_model, train_sft
from services.demo.task import as_chat, build_char_tokenizer, main, make_rows, write_splits
from student_worker.config import DataSpec
from student_worker.data import load_splits


def test_rows_are_seeded_distinct_and_correct():
    rows = make_rows(300, seed=3, digits=2, terms=3)
    assert rows == make_rows(300, seed=3, digits=2, terms=3)
    assert rows != make_rows(300, seed=4, digits=2, terms=3)
    assert len({r["prompt"] for r in rows}) == 300
    for r in rows:
        expr = r["prompt"][len("Q: "):-len("=?\nA:")]
        assert int(r["response"]) == eval(expr) >= 0  # noqa: S307 - digits and +/- only


def test_impossible_requests_fail_instead_of_looping():
    with pytest.raises(ValueError, match="distinct problems"):
        make_rows(200, seed=0, digits=1, terms=2)


def test_splits_never_share_a_prompt(tmp_path):
    train, evals = write_splits(tmp_path, n_train=500, n_eval=100, digits=2)
    train_p = {json.loads(line)["prompt"] for line in train.read_text().splitlines()}
    eval_p = {json.loads(line)["prompt"] for line in evals.read_text().splitlines()}
    assert len(train_p) == 500 and len(eval_p) == 100 and not train_p & eval_p


def test_character_tokenizer_round_trips(tmp_path):
    tok = build_char_tokenizer(tmp_path)
    text = "Q: 864-394+776=?\nA: 1246"
    ids = tok(text).input_ids
    assert len(ids) == len(text) and tok.decode(ids) == text


def test_sft_from_scratch_lowers_the_response_loss(tmp_path):
    train, evals = write_splits(tmp_path, n_train=400, n_eval=20, digits=2, terms=2)
    tok = build_char_tokenizer(tmp_path)
    examples, _ = load_splits(DataSpec(path=str(train), eval_path=str(evals)), tok)
    model = new_model(tok, hidden=32, layers=1, heads=2)
    losses = train_sft(model, examples, batch_size=32, lr=3e-3, steps=60, pad_id=tok.pad_token_id,
                       warmup_steps=5)
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:5]) / 5


def test_the_data_set_writer_writes_jsonl_chat_and_prompt_only_rows(tmp_path, monkeypatch, capsys):
    def write(*args: str) -> list[dict]:
        monkeypatch.setattr("sys.argv", ["task", *args])
        main()
        return [json.loads(line) for line in Path(args[0]).read_text().splitlines()]

    plain = write(str(tmp_path / "plain.jsonl"), "--n", "16")
    assert plain == make_rows(18, seed=0, digits=2)[:16]  # n + n // 8 drawn, the last 2 go to the test split
    chat = write(str(tmp_path / "chat.jsonl"), "--n", "16", "--chat")
    assert chat == [as_chat(r) for r in plain]
    assert chat[0]["messages"][-2:] == [{"role": "user", "content": plain[0]["prompt"]},
                                        {"role": "assistant", "content": plain[0]["response"].strip()}]
    assert write(str(tmp_path / "prompts.jsonl"), "--n", "16", "--prompts-only") == [
        {"prompt": r["prompt"]} for r in plain]
