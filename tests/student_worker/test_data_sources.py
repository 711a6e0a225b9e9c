"""Data sources (JSONL, Parquet, save_to_disk, load_dataset), conversational rows and chat templates,
optional references, the eval scorer and the service's refusals. Tiny data, no Ray, no downloads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from student_worker.config import DataSpec, JobSpec
from student_worker.data import DataError, check_data, load_splits, read_splits
from student_worker.eval import ScorerError, evaluate

CHAT_TEMPLATE = (Path(__file__).parents[2] / "examples" / "tiny_chat_template.jinja").read_text()

SYSTEM_CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "1 + 1 ="}, {"role": "assistant", "content": "2"},
    {"role": "user", "content": "3 + 4 ="}, {"role": "assistant", "content": "7"}]}
ROWS = [
    {"prompt": "2 + 2 =", "response": " 4"},
    {"prompt": "5 + 1 =", "response": None},  # a prompt only
    SYSTEM_CHAT,
    {"messages": [{"role": "user", "content": "9 + 0 ="}]},  # conversational, no reference
]
# (prompt, reference) of ROWS as the data layer reads them.
EXPECTED = [("2 + 2 =", " 4"), ("5 + 1 =", None), (SYSTEM_CHAT["messages"][:4], "7"),
            ([{"role": "user", "content": "9 + 0 ="}], None)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def parsed(spec: DataSpec) -> list[tuple]:
    train, evals = read_splits(spec)
    return [(r.prompt, r.response) for r in train + evals]


@pytest.fixture(scope="module")
def tok(tiny_student):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tiny_student))
    t.chat_template = CHAT_TEMPLATE
    return t


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same rows as JSONL, Parquet, a saved DatasetDict (train + test) and renamed-column JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from student_worker.sources import _datasets

    d = tmp_path_factory.mktemp("sources")
    datasets = _datasets()
    datasets.config.HF_DATASETS_CACHE = str(d / "cache")  # load_dataset's arrow cache, not ~/.cache
    out = {"jsonl": write_jsonl(d / "rows.jsonl", ROWS), "parquet": d / "rows.parquet", "saved": d / "saved"}
    table = [{k: r.get(k) for k in ("prompt", "response", "messages")} for r in ROWS]  # columns: null where absent
    pq.write_table(pa.Table.from_pylist(table), out["parquet"])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(table),
                          "test": datasets.Dataset.from_list(table[:1])}).save_to_disk(str(out["saved"]))
    renamed = [{"question": r["prompt"], "answer": r["response"], "id": i} for i, r in enumerate(ROWS[:2])]
    out["qa_train"] = write_jsonl(d / "qa_train.jsonl", renamed)
    out["qa_test"] = write_jsonl(d / "qa_test.jsonl", renamed[:1])
    (d / "pq_dir").mkdir()
    pq.write_table(pa.Table.from_pylist(table), d / "pq_dir" / "part-0.parquet")
    out["pq_dir"] = d / "pq_dir"
    return out


# ---- sources ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved"])
def test_each_source_reads_plain_conversational_and_prompt_only_rows(files, kind):
    spec = DataSpec(path=str(files[kind]), eval_fraction=0)
    assert parsed(spec) == EXPECTED


def test_a_saved_dataset_dict_gives_its_splits(files):
    spec = DataSpec(path=str(files["saved"]), eval_split="test")
    train, evals = read_splits(spec)
    assert len(train) == 4 and [(r.prompt, r.response) for r in evals] == [EXPECTED[0]]
    assert "[test] row 0" in evals[0].where
    with pytest.raises(DataError, match=r"no split 'dev'; its splits: train, test"):
        read_splits(DataSpec(path=str(files["saved"]), split="dev"))


def test_load_dataset_with_data_files_split_and_column_names(files):
    spec = DataSpec(path="json", data_files={"train": [str(files["qa_train"])], "test": [str(files["qa_test"])]},
                    eval_split="test", prompt_field="question", response_field="answer")
    train, evals = read_splits(spec)
    assert [(r.prompt, r.response) for r in train] == EXPECTED[:2]
    assert [(r.prompt, r.response) for r in evals] == EXPECTED[:1]
    # a local directory of Parquet files, its one split `train`
    assert parsed(DataSpec(path=str(files["pq_dir"]), eval_fraction=0)) == EXPECTED


def test_sources_are_refused_with_the_field_at_fault(files, tmp_path):
    from student_worker.sources import check_source

    cases = [
        (DataSpec(path=str(tmp_path / "nope.jsonl")), "data.path: .*nope.jsonl is not a file"),
        (DataSpec(path="org/some-dataset", format="load_dataset"), "neither a local file or directory nor one "
                                                                    "of the builders json, csv.*never downloads"),
        (DataSpec(path="json", data_files=[str(tmp_path / "x.jsonl")]), r"data.data_files.train: .*x.jsonl is not"),
        (DataSpec(path=str(files["jsonl"]), eval_split="test"), "has no splits; use data.eval_path"),
        (DataSpec(path=str(files["jsonl"]), format="load_dataset"), "load_dataset reads a directory"),
    ]
    for spec, message in cases:
        with pytest.raises(DataError, match=message):
            check_source(spec, "data.path", spec.path)
    with pytest.raises(ValueError, match="names the load_dataset builder, which reads data.data_files"):
        DataSpec(path="csv")
    with pytest.raises(ValueError, match="needs format load_dataset"):
        DataSpec(path="x.jsonl", format="jsonl", data_files=["a.jsonl"])
    with pytest.raises(DataError, match=r"neither a 'prompt' \(data.prompt_field\) nor a 'messages'"):
        read_splits(DataSpec(path="json", data_files=[str(files["qa_train"])]))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "system", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: the messages have no user turn"):
        read_splits(DataSpec(path=str(bad)))


# ---- conversational rows and chat templates ---------------------------------------------------------
def hand_rendered(tok, messages: list[dict]) -> list[int]:
    """CHAT_TEMPLATE's ids built piece by piece, without apply_chat_template."""
    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    ids: list[int] = []
    for m in messages:
        ids += [tok.bos_token_id, *enc(f"{m['role']}\n{m['content']}"), tok.eos_token_id, *enc("\n")]
    return ids + [tok.bos_token_id, *enc("assistant\n")]


def test_a_multi_turn_conversation_is_the_students_rendering_up_to_the_last_user_turn(files, tok):
    train, _ = load_splits(DataSpec(path=str(files["jsonl"]), eval_fraction=0, max_prompt_tokens=512), tok)
    chat = train[2]
    assert chat.prompt_ids.tolist() == hand_rendered(tok, SYSTEM_CHAT["messages"][:4])
    assert chat.response == "7" and chat.response_ids.tolist() == tok.encode("7", add_special_tokens=False) + [
        tok.eos_token_id]
    plain, prompt_only = train[0], train[1]  # plain text keeps working, untemplated
    assert plain.prompt_ids.tolist() == tok("2 + 2 =").input_ids and prompt_only.response_ids is None
    assert train[3].prompt_ids.tolist() == hand_rendered(tok, [{"role": "user", "content": "9 + 0 ="}])
    # a prompt given as messages with a completion column (prompt/completion rows)
    row = {"prompt": SYSTEM_CHAT["messages"][:4], "completion": [{"role": "assistant", "content": "seven"}]}
    path = write_jsonl(files["jsonl"].parent / "pc.jsonl", [row])
    ex = load_splits(DataSpec(path=str(path), response_field="completion", eval_fraction=0), tok)[0][0]
    assert ex.prompt_ids.tolist() == chat.prompt_ids.tolist() and ex.response == "seven"


def test_conversations_need_the_students_chat_template(files, tiny_student):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(str(tiny_student))
    with pytest.raises(DataError, match="conversational rows, but the student's tokenizer has no chat template"):
        load_splits(DataSpec(path=str(files["jsonl"])), bare)


def _job(path: Path, teacher: dict, **sections) -> JobSpec:
    return JobSpec.model_validate({"student": {"model": "s"}, "teacher": teacher,
                                   "data": {"path": str(path), "eval_fraction": 0, "max_prompt_tokens": 512},
                                   **sections})


def test_a_teacher_template_is_checked_against_the_students_ids(files, tok, chat_models, tmp_path):
    from student_worker.chat import check_teacher_template

    examples = load_splits(DataSpec(path=str(files["jsonl"]), eval_fraction=0, max_prompt_tokens=512), tok)[0]
    same_ids = tmp_path / "same.jinja"  # another template text that renders the same ids
    same_ids.write_text("{# the teacher's own copy #}" + CHAT_TEMPLATE)
    other = tmp_path / "other.jinja"  # a different turn header: other ids
    other.write_text(CHAT_TEMPLATE.replace("{{ m['role'] }}\n", "{{ m['role'] }}: "))
    served = {"endpoints": ["127.0.0.1:50051"]}
    check_teacher_template(_job(files["jsonl"], {**served, "chat_template": str(same_ids)}), tok, examples)
    check_teacher_template(_job(files["jsonl"], {"local_model": str(chat_models[0])}), tok, examples)
    check_teacher_template(_job(files["jsonl"], {"ray_actor": {"model": str(chat_models[0])}}), tok, examples)
    with pytest.raises(DataError, match=r"other.jinja\) renders the prompt of .*rows.jsonl:3 into other token ids "
                                        r"than the student's template: they first differ at token 7 \(student "
                                        r"'\\nBe brief', teacher ': Be brief'\)"):
        check_teacher_template(_job(files["jsonl"], {**served, "chat_template": str(other)}), tok, examples)
    # a served teacher's template cannot be read from here: it must be named, not assumed
    with pytest.raises(DataError, match="teacher.chat_template: .* a served teacher"):
        check_teacher_template(_job(files["jsonl"], served), tok, examples)
    # plain prompts without data.chat_template are not templated: nothing to check
    check_teacher_template(_job(files["jsonl"], served), tok, [examples[0]])


# ---- references: optional, refused where needed ----------------------------------------------------
def test_prompt_only_data_is_refused_only_where_references_are_needed(tmp_path, tok):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{i} + 1 ="} for i in range(10)])
    teacher = {"local_model": "t"}
    check_data(_job(data, teacher, eval={"enabled": False}))
    train, _ = load_splits(DataSpec(path=str(data), eval_fraction=0), tok)
    assert all(e.response is None and e.response_ids is None for e in train)
    with pytest.raises(DataError, match=r"on_policy_fraction 0.5 < 1 .* 10 of 10 training rows have none "
                                        r"\(a 'response' field \(data.response_field\)"):
        check_data(_job(data, teacher, eval={"enabled": False}, distill={"on_policy_fraction": 0.5}))
    check_data(_job(data, teacher, eval={"enabled": False},  # SeqKD: the teacher writes them
                    distill={"on_policy_fraction": 0.5, "off_policy_source": "teacher"}))
    with pytest.raises(DataError, match=r"exact match and ROUGE-L .* set eval.scorer, or set eval.enabled false"):
        check_data(_job(data, teacher, data={"path": str(data), "eval_fraction": 0.2}))
    check_data(_job(data, teacher, data={"path": str(data), "eval_fraction": 0.2}, eval={"scorer": "m:f"}))


# ---- the eval scorer --------------------------------------------------------------------------------
SCORERS = '''
calls = []

def length(prompt, completion, reference):
    calls.append((prompt, completion, reference))
    return float(len(completion))

def several(prompt, completion, reference):
    return {"has_ref": reference is not None, "chars": len(completion)}

def broken(prompt, completion, reference):
    return 1 / 0

def text(prompt, completion, reference):
    return "good"
'''


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    d = tmp_path_factory.mktemp("scorers")
    (d / "dist_test_scorers.py").write_text(SCORERS)
    sys.path.insert(0, str(d))
    import dist_test_scorers

    yield dist_test_scorers
    sys.path.remove(str(d))
    sys.modules.pop("dist_test_scorers", None)


def test_a_scorer_gets_prompt_completion_reference_and_is_averaged(files, tok, scorers):
    examples = load_splits(DataSpec(path=str(files["jsonl"]), eval_fraction=0), tok)[0]
    answers = ["4", "six", "7", "nine!"]
    gen = iter([torch.tensor(tok.encode(a, add_special_tokens=False)) for a in answers])

    def generate(prompts):
        return [next(gen) for _ in prompts]

    result = evaluate(generate, examples, tok, batch_size=3, max_samples=4, scorer="dist_test_scorers:length")
    assert scorers.calls == [(p, a, r) for (p, r), a in zip(EXPECTED, answers)]
    assert result.scores == {"score": pytest.approx(sum(map(len, answers)) / 4)}
    assert result.exact_match is None and result.rouge_l is None  # two rows have no reference
    assert result.as_dict()["score"] == result.scores["score"] and result.samples[0]["scores"] == {"score": 1.0}
    many = evaluate(lambda ps: [torch.tensor([5])] * len(ps), examples, tok, batch_size=4, max_samples=4,
                    scorer="dist_test_scorers:several")
    assert many.scores["score/has_ref"] == 0.5 and set(many.scores) == {"score/has_ref", "score/chars"}


def test_a_failing_scorer_fails_the_eval_naming_it(files, tok, scorers):
    examples = load_splits(DataSpec(path=str(files["jsonl"]), eval_fraction=0), tok)[0]
    with pytest.raises(ScorerError, match=r"eval.scorer dist_test_scorers:broken raised ZeroDivisionError: "
                                          r"division by zero \(on .*rows.jsonl:1\)"):
        evaluate(lambda ps: ps, examples, tok, batch_size=2, max_samples=2, scorer="dist_test_scorers:broken")
    with pytest.raises(ScorerError, match=r"dist_test_scorers:text returned 'good' .* finite float"):
        evaluate(lambda ps: ps, examples, tok, batch_size=2, max_samples=2, scorer="dist_test_scorers:text")
    with pytest.raises(ScorerError, match=r"eval.scorer no_such_module_x:f: cannot import no_such_module_x"):
        evaluate(lambda ps: ps, examples, tok, batch_size=2, max_samples=2, scorer="no_such_module_x:f")
    with pytest.raises(ScorerError, match="dist_test_scorers has no function 'missing'"):
        evaluate(lambda ps: ps, examples, tok, batch_size=2, max_samples=2, scorer="dist_test_scorers:missing")


# ---- the job service --------------------------------------------------------------------------------
def test_the_service_refuses_a_scorer_unless_allowed_and_roots_every_data_path(tmp_path):
    from services.jobs import JobService
    from services.protocol import PathRefused, UnsafeSpec
    from services.settings import Settings

    models, data = tmp_path / "models", tmp_path / "data"
    for d in (models / "s", models / "t", data):
        d.mkdir(parents=True)
    (data / "a.jsonl").write_text("")

    def accept(allowed: tuple[str, ...] = (), **sections) -> JobSpec:
        settings = Settings(model_roots=(str(models),), data_roots=(str(data),), runs_dir=str(tmp_path / "runs"),
                            cluster_autoscales=True, allowed_scorers=allowed)
        doc = {"student": {"model": "s"}, "teacher": {"local_model": "t"},
               "data": {"path": "json", "data_files": {"train": ["a.jsonl"]}}, **sections}
        return JobService(settings, store=None, ray_ping=lambda: True).accept(json.dumps(doc).encode())

    spec = accept()
    assert spec.data.path == "json" and spec.data.data_files == {"train": [str(data / "a.jsonl")]}
    for scorer, allowed in (("evil:run", ()), ("myorg.scoring_x:f", ("myorg.scoring",))):
        with pytest.raises(UnsafeSpec, match=r"eval.scorer .* \(DISTILLERY_ALLOWED_SCORERS"):
            accept(allowed, eval={"scorer": scorer})
    assert accept(("myorg.scoring",), eval={"scorer": "myorg.scoring.math:exact"}).eval.scorer
    refused = [({"data": {"path": "json", "data_files": ["../outside.jsonl"]}}, "data.data_files.train"),
               ({"data": {"path": "../elsewhere"}}, "data.path"),
               ({"teacher": {"local_model": "t", "chat_template": "../t.jinja"}}, "teacher.chat_template")]
    for sections, field in refused:
        with pytest.raises(PathRefused, match=field):
            accept(**sections)


# ---- `distillery train` ------------------------------------------------------------------------------
def test_distillery_train_refuses_prompt_only_data_for_exact_match_before_the_teacher_loads(
        tiny_student, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import student_worker.trainer as trainer_mod
    from services.cli import app

    monkeypatch.setattr(trainer_mod, "build_teacher", lambda *_: pytest.fail("the teacher was loaded"))
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{i} + 1 ="} for i in range(10)])
    spec = {"student": {"model": str(tiny_student)}, "teacher": {"local_model": str(tiny_student)},
            "data": {"path": str(data)}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "exact match and ROUGE-L against references, but 1 of the 1 eval rows have none" in result.output
    assert "(data.response_field)" in result.output



def test_distillery_train_runs_a_conversational_job(chat_models, chat_data, scorers, tmp_path):
    from typer.testing import CliRunner

    from services.cli import app

    teacher, student = chat_models
    spec = {"name": "chat", "student": {"model": str(student)}, "teacher": {"local_model": str(teacher)},
            "data": {"path": str(chat_data), "eval_fraction": 0.1, "max_prompt_tokens": 64, "max_response_tokens": 4},
            "distill": {"steps": 2, "batch_size": 2, "top_k": 4, "max_new_tokens": 4, "on_policy_fraction": 0.5,
                        "warmup_steps": 0},
            "checkpoint": {"dir": str(tmp_path / "run"), "every_steps": 10},
            "eval": {"max_samples": 2, "max_new_tokens": 4, "teacher": False, "scorer": "dist_test_scorers:length"}}
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    ev = summary["eval"]["student"]
    assert ev["n"] == 2 and 0 <= ev["exact_match"] <= 1 and ev["score"] >= 0
    assert ev["samples"][0]["prompt"][0] == {"role": "system", "content": "Answer with the result."}
    assert summary["timing"]["distill"]["steps"] == 2
    references = {json.loads(line)["messages"][-1]["content"] for line in chat_data.read_text().splitlines()}
    assert ev["samples"][0]["reference"] in references


@pytest.mark.parametrize("name", ["chat_local", "prompts_scorer", "splits_load_dataset"])
def test_the_data_examples_are_valid_specs(name):
    spec = JobSpec.from_file(Path(__file__).parents[2] / "examples" / f"{name}.yaml")
    assert spec.name == name.replace("_", "-")


def test_the_example_scorer_checks_the_sum():
    import importlib.util

    where = Path(__file__).parents[2] / "examples" / "arith_scorer.py"
    module_spec = importlib.util.spec_from_file_location("arith_scorer", where)
    scorer = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(scorer)
    assert scorer.answer_is_sum("12 + 30 =", " 42 and more", None) == 1.0
    assert scorer.answer_is_sum("Q: 34-12+5=?\nA:", " 27", None) == 1.0
    assert scorer.answer_is_sum([{"role": "user", "content": "1 + 1 ="}], "3", "2") == 0.0
    assert scorer.answer_and_length("1 + 1 =", "2 x", None) == {"correct": 1.0, "words": 2.0}
