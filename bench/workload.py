"""The benchmark workload shared by bench/vs_trl.py: a random Qwen3-shaped checkpoint and chat pairs.

Model shapes: `--preset` picks a real Qwen3 shape (from the models' published config.json files:
hidden, MLP, layers, heads, KV heads, head dim, vocabulary, tied embeddings), else the CPU proxy's
flags apply. Weights are random (no hub here); what the bench measures does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (hidden, intermediate, layers, heads, kv_heads, head_dim); all tie embeddings, vocab 151,936
PRESETS = {
    "qwen3-0.6b": (1024, 3072, 28, 16, 8, 128),
    "qwen3-1.7b": (2048, 6144, 28, 16, 8, 128),
    "qwen3-4b": (2560, 9728, 36, 32, 8, 128),
}


def apply_preset(args: argparse.Namespace) -> None:
    """Overwrite the shape flags with a preset's (in place), if one was named."""
    if args.preset:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.head_dim = PRESETS[args.preset]
        args.vocab_size, args.untied = 151936, False


def hf_config(args: argparse.Namespace, tokenizer):
    from transformers import Qwen3Config

    heads = args.heads or max(1, args.hidden // args.head_dim)
    return Qwen3Config(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=args.kv_heads or max(1, heads // 2),
        head_dim=args.head_dim,
        max_position_embeddings=max(4096, 2 * args.seq_len),
        tie_word_embeddings=not args.untied,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def make_model(out_dir: Path, args: argparse.Namespace) -> Path:
    """The repo's small Qwen-style tokenizer + a random Qwen3 of the chosen shape, saved in `args.dtype`.
    On a GPU the weights are initialised there (a 4B model takes minutes on a CPU)."""
    import torch
    from transformers import Qwen3ForCausalLM

    sys.path.insert(0, str(ROOT / "examples"))
    from make_tiny_qwen3 import build_tokenizer

    tokenizer = build_tokenizer()
    config = hf_config(args, tokenizer)
    torch.manual_seed(0)
    device = "cuda" if args.device == "cuda" else "cpu"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.dtype))
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out_dir


def make_pairs(path: Path, model_dir: Path, num_pairs: int, seq_len: int, completion_share: float, seed: int) -> dict:
    """Chat pairs "sort these numbers": chosen sorted, rejected shuffled; prompt + completion <= seq_len
    tokens (the prompt carries a context list so the prompt/completion split is `completion_share`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    budget = seq_len - 8  # a little room: the chosen and rejected renderings differ by a token or two

    def length(prompt, completion) -> int:
        return len(tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"])

    stats = {"prompt": [], "chosen": [], "rejected": []}
    with path.open("w") as handle:
        for _ in range(num_pairs):
            n = max(2, int(budget * completion_share))  # ~1 token per number with this tokenizer
            numbers = [rng.randrange(100) for _ in range(n)]
            context = [rng.randrange(100) for _ in range(max(0, budget - 2 * n - 16))]  # prompt = context + numbers
            while True:
                text = ("Context: " + " ".join(map(str, context)) + "\n" if context else "") + "Sort ascending: "
                prompt = [{"role": "user", "content": text + " ".join(map(str, numbers))}]
                shuffled = numbers[:]
                rng.shuffle(shuffled)
                chosen = [{"role": "assistant", "content": " ".join(map(str, sorted(numbers)))}]
                rejected = [{"role": "assistant", "content": " ".join(map(str, shuffled))}]
                lengths = (length(prompt, chosen), length(prompt, rejected))
                if max(lengths) <= budget:
                    break
                over = max(lengths) - budget
                if not context and len(numbers) <= 2:
                    sys.exit(f"--seq-len {seq_len} is too short for a pair of this chat format")
                if context:
                    context = context[: max(0, len(context) - over)]
                else:
                    numbers = numbers[: max(2, len(numbers) - (over + 1) // 2)]
            prompt_len = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True)["input_ids"])
            stats["prompt"].append(prompt_len)
            stats["chosen"].append(lengths[0] - prompt_len)
            stats["rejected"].append(lengths[1] - prompt_len)
            handle.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return {name: round(statistics.mean(values), 1) for name, values in stats.items()}


def model_flops_per_token(args: argparse.Namespace, with_reference: bool = True) -> tuple[float, dict]:
    """dpo_dist.metrics.flops_per_token for this workload, from the exact parameter counts (the same
    formula for both tools): full fine-tuning 4N + 2N + 2N_ref, LoRA 4N + 2N_lora + 2N (adapter off);
    without the 2N_ref term for a run that reads precomputed reference log-probs."""
    from dpo_dist.metrics import flops_per_token
    from dpo_dist.planner import ModelShape

    heads = args.heads or max(1, args.hidden // args.head_dim)
    shape = ModelShape(args.vocab_size, args.hidden, args.intermediate or 3 * args.hidden, args.layers, heads,
                       args.kv_heads or max(1, heads // 2), args.head_dim, not args.untied)
    n = shape.parameters()
    lora = args.layers * sum(args.lora_r * (i + o) for i, o in shape.linear_shapes().values()) if args.lora_r else 0
    trainable = lora or n
    return flops_per_token(n + lora, trainable, n if with_reference else 0), {"parameters": n, "trainable": trainable}
