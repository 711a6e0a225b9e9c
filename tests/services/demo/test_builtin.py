"""The built-in teacher/student recipe: trained once into the cache, never reused when stale."""

from __future__ import annotations

import json
from dataclasses import replace

from transformers import AutoModelForCausalLM, AutoTokenizer

from services.demo import builtin


def test_prepare_trains_once_then_reuses_the_cache(tmp_path):
    recipe = builtin.quick_recipe()
    calls = []
    assets = builtin.prepare(recipe, tmp_path, lambda *a: calls.append(a))
    assert assets.root == tmp_path / recipe.key()
    assert {c[0] for c in calls} == {"teacher", "student"}
    assert calls[-1][1:3] == (recipe.student.steps, recipe.student.steps)
    for who, m in (("teacher", recipe.teacher), ("student", recipe.student)):
        model = AutoModelForCausalLM.from_pretrained(getattr(assets, who))
        assert model.config.hidden_size == m.hidden and model.config.num_hidden_layers == m.layers
        tok = AutoTokenizer.from_pretrained(getattr(assets, who))
        assert tok.decode(tok("Q: 12+3=?\nA:", add_special_tokens=False).input_ids) == "Q: 12+3=?\nA:"
        s = assets.scores[who]
        assert s["n"] == recipe.n_eval and 0 <= s["exact_match"] <= 1
        assert s["parameters"] == sum(p.numel() for p in model.parameters())
    rows = [json.loads(line) for line in assets.train.read_text().splitlines()]
    evals = {json.loads(line)["prompt"] for line in assets.eval.read_text().splitlines()}
    assert len(rows) == recipe.n_train and len(evals) == recipe.n_eval
    assert not evals & {r["prompt"] for r in rows}
    stamp = (assets.teacher / "model.safetensors").stat().st_mtime_ns
    again = builtin.prepare(recipe, tmp_path, lambda *a: calls.append(("again",)))
    assert again == assets and ("again",) not in calls
    assert (assets.teacher / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no work directory left


def test_a_changed_recipe_or_an_incomplete_cache_is_not_used(tmp_path):
    recipe = builtin.quick_recipe()
    other = replace(recipe, student=replace(recipe.student, steps=recipe.student.steps + 1))
    assert other.key() != recipe.key()
    assets = builtin.prepare(recipe, tmp_path)
    (assets.student / "model.safetensors").unlink()  # e.g. a half-deleted cache
    assert builtin.load(assets.root) is None
    rebuilt = builtin.prepare(recipe, tmp_path)
    assert (rebuilt.student / "model.safetensors").is_file()
