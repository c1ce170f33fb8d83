"""Make a tiny, randomly initialised Qwen3 model and a small Qwen-style tokenizer, saved to disk.

The demo and the tests load these through the same `from_pretrained` path as a real Qwen
checkpoint, so nothing here is a mock: it is a real `Qwen3ForCausalLM`, only small (2 layers,
hidden 64), and a real byte-level BPE tokenizer with Qwen's ChatML special tokens and template.
No download is involved. `--family qwen2.5` makes a `Qwen2ForCausalLM` instead, shaped as Qwen2.5-7B
and larger are: q/k/v biases, no q/k norms, untied embeddings, no head_dim in config.json; `--family
qwen3-moe` a `Qwen3MoeForCausalLM` (every layer's MLP a set of routed experts, as Qwen3-30B-A3B).

    python examples/make_tiny_qwen3.py examples/tiny-qwen3            # policy / SFT stand-in
    python examples/make_tiny_qwen3.py examples/tiny-qwen3-ref --seed 1  # a different reference
    python examples/make_tiny_qwen3.py examples/tiny-qwen2.5 --family qwen2.5
    python examples/make_tiny_qwen3.py examples/tiny-qwen3-moe --family qwen3-moe
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

HERE = Path(__file__).resolve().parent

# Qwen's special tokens: <|endoftext|> pads, <|im_end|> ends an assistant turn (Qwen3 chat EOS).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# ChatML as Qwen2.5/Qwen3 render it (without Qwen3's thinking logic and default system prompt).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _training_corpus() -> list[str]:
    """Text the BPE merges are learned from: the shipped demo data plus digits and common words."""
    corpus = [" ".join(str(n) for n in range(100)), "system user assistant You are a helpful assistant."]
    for name in ("demo_train.jsonl", "demo_eval.jsonl"):
        path = HERE / "data" / name
        if path.exists():
            corpus.extend(path.read_text().splitlines())
    return corpus


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=32768,
    )


TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    tie_word_embeddings=True,  # as Qwen3-0.6B..4B
)


# Qwen2.5's config.json has no head_dim (hidden / heads, 16 here as in TINY_SHAPE); its attention projections
# carry biases by architecture; 7B and larger untie the output embedding.
QWEN25_SHAPE = {**{k: v for k, v in TINY_SHAPE.items() if k != "head_dim"}, "tie_word_embeddings": False}
# Qwen3-MoE (Qwen3-30B-A3B's layout): every layer's MLP is 8 experts of width 32 here, 2 per token, untied.
QWEN3_MOE_SHAPE = {**TINY_SHAPE, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
                   "tie_word_embeddings": False}
FAMILIES = {"qwen3": (Qwen3Config, Qwen3ForCausalLM, TINY_SHAPE), "qwen2.5": (Qwen2Config, Qwen2ForCausalLM, QWEN25_SHAPE),
            "qwen3-moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, QWEN3_MOE_SHAPE)}


def build_model(vocab_size: int, seed: int, family: str = "qwen3", **overrides):
    """A random Qwen3 (or Qwen2.5, Qwen3-MoE); `overrides` replace entries of the tiny shape (benchmarks use bigger shapes)."""
    config_class, model_class, shape = FAMILIES[family]
    config = config_class(vocab_size=vocab_size, **{**shape, **overrides})
    torch.manual_seed(seed)
    return model_class(config)


def make_checkpoint(out_dir: str | Path, seed: int = 0, family: str = "qwen3", **overrides) -> Path:
    """Write a tokenizer + random Qwen3 (or Qwen2.5, Qwen3-MoE) model to `out_dir`, loadable with `from_pretrained`.
    `overrides` may set `vocab_size` too (default: the tokenizer's; ids past the tokenizer's are never seen)."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    model = build_model(overrides.pop("vocab_size", len(tokenizer)), seed, family, **overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "made_by.json").write_text(json.dumps({"script": "examples/make_tiny_qwen3.py", "seed": seed, "family": family}))
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen3")
    args = parser.parse_args()
    print(f"wrote {make_checkpoint(args.out_dir, seed=args.seed, family=args.family)}")


if __name__ == "__main__":
    main()
