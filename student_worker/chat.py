"""Conversational rows and chat templates: what the student sees, and what the teacher would.

    prompt, reference = split_messages(row["messages"], where)  # turns up to the last user turn; the reply
    text = render(tokenizer, prompt)                              # the student's template, generation prompt on
    check_teacher_template(spec, tokenizer, examples)             # the teacher's template gives the same ids

The teacher scores token ids, never text: a templated prompt is rendered once, with the student's
template, and the teacher judges those ids. That is the teacher's own rendering only when its
template gives the same ids, so a job whose teacher has a different template is checked prompt by
prompt and refused at the first that differs. "The teacher's template" is `teacher.chat_template`
(a Jinja file, or a directory whose tokenizer has one) when set; else the teacher model directory's
(`local_model`, `ray_actor.model`; none there means a teacher without a template, which has
nothing to compare). A served teacher (`endpoints`) sends token ids only, so with templated data
its template must be named, or the job is refused: what cannot be checked is not assumed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .config import JobSpec
from .sources import DataError

log = logging.getLogger(__name__)
Message = dict[str, Any]  # {"role": ..., "content": ...} and whatever else the template reads


def split_messages(value: Any, where: str) -> tuple[list[Message], str | None]:
    """(every turn up to the last user turn, the assistant turn right after it or None)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} is not a {{role: string, content: string}} object")
    users = [i for i, m in enumerate(value) if m["role"] == "user"]
    if not users:
        raise DataError(f"{where}: the messages have no user turn, so there is no prompt")
    last = users[-1]
    after = value[last + 1] if last + 1 < len(value) else None
    reference = after["content"] if after is not None and after["role"] == "assistant" else None
    return list(value[:last + 1]), reference


def as_messages(prompt: str | list[Message]) -> list[Message]:
    """A plain-text prompt as one user turn; messages as they are."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, prompt: str | list[Message], template: str | None = None) -> str:
    """The prompt as the template writes it, ending with the assistant's generation prompt.

    Encode the result with add_special_tokens=False: the template writes its own special tokens."""
    return tokenizer.apply_chat_template(as_messages(prompt), chat_template=template, add_generation_prompt=True,
                                         tokenize=False)


def template_of(path: str) -> str | None:
    """The chat template in `path`: a Jinja file, or a tokenizer directory's (None if it has none)."""
    p = Path(path)
    if p.is_file():
        return p.read_text(encoding="utf-8")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: no tokenizer to take the teacher's chat template from ({exc}); set "
                        f"teacher.chat_template to its template") from None
    return tok.get_chat_template() if has_template(tok) else None


def teacher_template(spec: JobSpec) -> tuple[str | None, str]:
    """(the teacher's chat template or None, where it comes from) for a job with templated data."""
    t = spec.teacher
    if t.chat_template is not None:
        if not Path(t.chat_template).exists():
            raise DataError(f"teacher.chat_template: {t.chat_template} is not a file or directory")
        template = template_of(t.chat_template)
        if template is None:
            raise DataError(f"teacher.chat_template: the tokenizer in {t.chat_template} has no chat template")
        return template, f"teacher.chat_template {t.chat_template}"
    if t.local_model:
        model, revision = t.local_model, t.revision
    elif t.ray_actor is not None:
        model, revision = t.ray_actor.model, t.ray_actor.revision
    else:
        raise DataError(
            "teacher.chat_template: the prompts are rendered with the student's chat template, and a served "
            "teacher (teacher.endpoints) sends no template to check that against: set teacher.chat_template to "
            "the teacher's template (a Jinja file or its tokenizer directory), or to the student model directory "
            "if the teacher uses the student's template")
    from teacher_server.model_dirs import resolve_model

    try:  # a hub id: its directory in the hub cache
        path = resolve_model(model, revision).path
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"the teacher's chat template: {exc}") from None
    return template_of(str(path)), f"the teacher model directory {model}"


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_teacher_template(spec: JobSpec, tokenizer, examples: list) -> None:
    """Refuse, naming the first prompt that differs, a teacher whose template renders any templated
    prompt into other token ids than the student's did (`examples`: data.Example, already encoded)."""
    templated = [ex for ex in examples if isinstance(ex.prompt, list) or spec.data.chat_template]
    if not templated:
        return
    template, source = teacher_template(spec)
    if template is None:
        log.info("the teacher (%s) has no chat template; it scores the prompts as the student's template "
                 "renders them", source)
        return
    if template == tokenizer.get_chat_template():
        return
    keep = spec.data.max_prompt_tokens
    for ex in templated:
        try:
            text = render(tokenizer, ex.prompt, template)
        except Exception as exc:  # a template may raise on purpose (e.g. "system role not supported")
            raise DataError(f"the teacher's chat template ({source}) cannot render the prompt of {ex.where}: "
                            f"{type(exc).__name__}: {exc}") from None
        ids, student = tokenizer(text, add_special_tokens=False).input_ids[-keep:], ex.prompt_ids.tolist()
        if ids != student:
            i = _first_difference(student, ids)
            raise DataError(
                f"the teacher's chat template ({source}) renders the prompt of {ex.where} into other token ids "
                f"than the student's template: they first differ at token {i} (student "
                f"{tokenizer.decode(student[i:i + 8])!r}, teacher {tokenizer.decode(ids[i:i + 8])!r}). The "
                f"teacher scores the student's ids, so both templates must give the same ids on this data: give "
                f"both models the same template (or a student whose template renders like the teacher's)")
