"""Tiny random-weight causal LMs and a locally trained tokenizer, for demos, tests and benches.

Nothing is downloaded: the tokenizer is a byte-level BPE trained with `tokenizers` on text made
here, and the model is a transformers Llama or Qwen2 built from a config with seeded weights,
saved as safetensors. Real users point the server at their own model directories instead.

    python -m services.demo.tiny /tmp/tiny-llama --family llama --hidden 64 --layers 2
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
_WORDS = ("the of and to in is was for on that with as by at from it this be are an or which one "
          "two three four five six seven eight nine ten plus minus times equals answer question "
          "teacher student model learns data step loss sum number total each has more less").split()


def corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic text with words, numbers and arithmetic, enough to train a small BPE."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        lines.append(f"{words} {a} + {b} = {a + b}. {rng.choice(_WORDS).capitalize()}!")
    return lines


def build_bpe_tokenizer(out_dir: str | Path, vocab_size: int = 512, seed: int = 0):
    """Train a byte-level BPE on `corpus()` and save it as a transformers fast tokenizer of
    `vocab_size` tokens. The corpus holds about 2,000 merges; past them the vocabulary is filled
    with reserved tokens (`<reserved_i>`), as large real vocabularies are, so a model of any
    vocabulary has a tokenizer covering every row (engines score over the tokenizer's tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    if tok.get_vocab_size() < vocab_size:
        tok.add_tokens([f"<reserved_{i}>" for i in range(vocab_size - tok.get_vocab_size())])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(
    out_dir: str | Path,
    *,
    family: str = "llama",
    vocab_size: int | None = None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 512,
    tokenizer_vocab: int = 512,
    seed: int = 0,
) -> Path:
    """Save a seeded random-weight model (safetensors) plus tokenizer into `out_dir`.

    `vocab_size` defaults to the tokenizer's size; a larger value pads the embedding past the
    tokenizer, as real checkpoints often do (engines drop those rows: for a model with a large
    vocabulary, give `tokenizer_vocab` instead).
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_bpe_tokenizer(out, vocab_size=tokenizer_vocab)
    common = dict(
        vocab_size=vocab_size or len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=max_positions,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    if family == "llama":
        config = LlamaConfig(**common)
    elif family == "qwen2":
        config = Qwen2Config(**common)
    else:
        raise ValueError(f"unknown family {family!r}; use 'llama' or 'qwen2'")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # wider logits than the default init, so distributions are not flat
        model.get_output_embeddings().weight.normal_(0.0, 0.5 / hidden**0.5 * 8)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--family", default="llama", choices=["llama", "qwen2"])
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    path = build_model(a.out_dir, family=a.family, vocab_size=a.vocab_size, hidden=a.hidden,
                       layers=a.layers, heads=a.heads, max_positions=a.max_positions, seed=a.seed)
    print(path)


if __name__ == "__main__":
    main()
