"""Model directories saved by transformers 4.x and by 5.x both load: tokenizer, teacher, student.

transformers 5 writes `tokenizer_class: TokenizersBackend` (and the chat template to its own
`chat_template.jinja`); 4.x wrote `PreTrainedTokenizerFast` with the template inside
`tokenizer_config.json`, and `torch_dtype` where 5.x writes `dtype`. Users bring both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from student_worker.data import encode
from student_worker.config import DataSpec
from student_worker.trainer import load_student
from teacher_server.contract import ScoreArgs
from teacher_server.engine import EngineConfig, TeacherEngine
from teacher_server.model_dirs import load_tokenizer_fingerprint

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def saved_as(src: Path, dst: Path, style: str) -> Path:
    shutil.copytree(src, dst)
    tok_cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg = json.loads((dst / "config.json").read_text())
    if style == "4.x":
        tok_cfg.pop("backend", None)
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok_cfg["chat_template"] = TEMPLATE
        cfg["torch_dtype"] = cfg.pop("dtype", "float32")
        cfg["transformers_version"] = "4.57.6"
    else:
        assert tok_cfg["tokenizer_class"] == "TokenizersBackend"  # what this transformers writes
        (dst / "chat_template.jinja").write_text(TEMPLATE)
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("style", ["4.x", "5.x"])
def test_a_model_dir_saved_by_either_major_loads_everywhere(style, tiny_student, tmp_path):
    from transformers import AutoTokenizer

    model_dir = saved_as(tiny_student, tmp_path / style, style)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert load_tokenizer_fingerprint(model_dir) == load_tokenizer_fingerprint(tiny_student)
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<s>user: 2+2?</s><s>assistant:"
    example = encode(tok, "2+2?", " 4", DataSpec(path="unused", chat_template=True))
    assert tok.decode(example.prompt_ids) == text

    student, original = load_student(model_dir, "fp32", "cpu"), load_student(tiny_student, "fp32", "cpu")
    for (name, a), (_, b) in zip(student.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name

    engine = TeacherEngine.load(EngineConfig(model_dir=str(model_dir)))
    reference = TeacherEngine.load(EngineConfig(model_dir=str(tiny_student)))
    seq = torch.tensor(tok("1+1=2")["input_ids"] + [3, 4, 5])
    got, want = (e.score(ScoreArgs([seq], [1], top_k=4))[0] for e in (engine, reference))
    assert torch.equal(got.topk_ids, want.topk_ids)
    assert torch.equal(got.token_logprobs, want.token_logprobs)
    assert engine.info().tokenizer_fingerprint == reference.info().tokenizer_fingerprint
