"""Host memory and time of loading a training split: dpo-dist's `ExampleStore` (int32 ids, records encoded a
batch at a time) against the same pairs held as Python lists and encoded one record at a time (what
dpo-dist did before; a loader that keeps `input_ids` lists per pair holds the same), in one invocation.

Every rank holds every pair, so the held bytes are per rank, times the ranks on a node. Qwen's tokenizer
cannot be downloaded here, so the bench builds a word-level tokenizer with Qwen's 151,936-token vocabulary:
the ids are spread over the real range (Python caches ints below 257 only, so a small vocabulary would make
lists look cheap). Its words are one token each; the timing is of our code around the tokenizer, and the
tokenizer's own speed differs from Qwen's BPE.

    python bench/data_loading.py                       # 20,000 chat pairs, ~1,000 + 2 x 500 tokens
    python bench/data_loading.py --pairs 5000 --prompt-words 300 --completion-words 200

Each side runs in its own process (clean resident-memory numbers); prints a table and writes
bench/data_loading.json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB = 151_936
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(directory: Path) -> None:
    """A word-level tokenizer: VOCAB - 3 words w0..wN plus Qwen's three special tokens, with Qwen's chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - len(SPECIAL))}
    vocab.update({token: VOCAB - len(SPECIAL) + i for i, token in enumerate(SPECIAL)})
    vocab["\n"] = vocab.pop(f"w{VOCAB - len(SPECIAL) - 1}")
    core = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern=Regex("[ \n]"), behavior="removed")  # "\n" after the role: no token needed
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL[1:])
    tokenizer.chat_template = AutoTokenizer.from_pretrained(ROOT / "examples" / "tiny-qwen3").chat_template
    tokenizer.save_pretrained(directory)


def make_data(path: Path, pairs: int, prompt_words: int, completion_words: int, seed: int) -> None:
    rng = random.Random(seed)

    def words(count: int) -> str:
        return " ".join(f"w{rng.randrange(VOCAB - len(SPECIAL) - 1)}" for _ in range(count))

    with path.open("w") as handle:
        for _ in range(pairs):
            record = {
                "prompt": [{"role": "user", "content": words(prompt_words)}],
                "chosen": [{"role": "assistant", "content": words(completion_words)}],
                "rejected": [{"role": "assistant", "content": words(completion_words)}],
            }
            handle.write(json.dumps(record) + "\n")


def resident_mb() -> float:
    """Resident memory now, after handing freed heap pages back (glibc keeps them otherwise, and the tokenizer's
    transient outputs would count as held)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(kind: str, tokenizer_dir: str, data: str, max_len: int) -> dict:
    from transformers import AutoTokenizer

    from dpo_dist.data import TokenizeStats, tokenize_record, tokenize_records
    from dpo_dist.records import read_records

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    records, _ = read_records([data], skip_invalid=False)
    tokenizer(["w1 w2"])  # warm the tokenizer up outside the timing
    gc.collect()
    before = resident_mb()
    started = time.perf_counter()
    if kind == "lists":
        stats = TokenizeStats()
        held = [tokenize_record(record, tokenizer, max_len, "keep_start", stats) for record in records]
        held = [example for example in held if example is not None]
    else:
        held, _, _ = tokenize_records(records, tokenizer, max_len, "keep_start", skip_invalid=False)
    seconds = time.perf_counter() - started
    held_mb = resident_mb() - before  # the records are still alive, as in `before`
    tokens = sum(example.num_tokens for example in held)
    return {"seconds": seconds, "held_mb": held_mb, "tokens": tokens, "pairs": len(held),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--prompt-words", type=int, default=1_000)
    parser.add_argument("--completion-words", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=4_096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=("lists", "store"))
    parser.add_argument("--tokenizer")
    parser.add_argument("--data")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokenizer, args.data, args.max_length)))
        return

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        make_tokenizer(scratch / "tokenizer")
        make_data(scratch / "pairs.jsonl", args.pairs, args.prompt_words, args.completion_words, args.seed)
        results = {}
        for kind in ("lists", "store"):
            command = [sys.executable, __file__, "--worker", kind, "--tokenizer", str(scratch / "tokenizer"),
                       "--data", str(scratch / "pairs.jsonl"), "--max-length", str(args.max_length)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[kind] = json.loads(output.strip().splitlines()[-1])
    lists, store = results["lists"], results["store"]
    assert lists["tokens"] == store["tokens"] and lists["pairs"] == store["pairs"], results
    print(f"{store['pairs']:,} pairs, {store['tokens']:,} tokens (chosen + rejected), threads: {os.cpu_count()} cores, "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}")
    print(f"{'':24} {'load s':>8} {'held MB':>9} {'bytes/token':>12} {'peak RSS MB':>12}")
    for name, row in (("lists, one at a time", lists), ("ExampleStore, batched", store)):
        print(f"{name:24} {row['seconds']:8.2f} {row['held_mb']:9.0f} {row['held_mb'] * 2**20 / row['tokens']:12.1f} "
              f"{row['peak_rss_mb']:12.0f}")
    print(f"store / lists: load time {store['seconds'] / lists['seconds']:.2f}x, held memory "
          f"{store['held_mb'] / lists['held_mb']:.2f}x")
    settings = {key: value for key, value in vars(args).items() if key not in ("worker", "tokenizer", "data")}
    report = {"settings": settings, "lists": lists, "store": store}
    (ROOT / "bench" / "data_loading.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
