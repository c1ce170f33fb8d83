"""Host memory and time of loading a training split, three ways in one invocation: the pairs held as Python
lists and encoded one record at a time (what dpo-dist did before; any loader that keeps `input_ids` lists per
pair holds the same), dpo-dist's `ExampleStore` (int32 ids, 256 records per tokenizer call; this run also
writes the split cache), and a restart that maps that cache (`data.cache_tokenized`).

Then a first start on two ranks of one machine, two ways: each rank tokenizing the whole split for itself
(dpo-dist before), and the ranks tokenizing a block each and exchanging them (`tokenization.TokenizeShards`, real
ranks under torchrun, gloo). The time is the slowest rank's.

Every rank holds every pair, so the held bytes are per rank, times the ranks on a node. Qwen's tokenizer
cannot be downloaded here, so the bench builds a word-level tokenizer with Qwen's 151,936-token vocabulary:
the ids are spread over the real range (Python caches ints below 257 only, so a small vocabulary would make
lists look cheap). Its words are one token each; the timing is of our code around the tokenizer, and the
tokenizer's own speed differs from Qwen's BPE.

    python bench/data_loading.py                       # 20,000 chat pairs, ~1,000 + 2 x 500 tokens: ~6 min
    python bench/data_loading.py --pairs 5000 --prompt-words 300 --completion-words 200

Each way runs in its own process (clean resident-memory numbers); "held" is the private memory the loaded
split keeps after every pair was built once, "shared" the file-backed pages of a mapped split (one copy per
node). Prints a table and writes bench/data_loading.json.
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


def resident_mb() -> tuple[float, float]:
    """(private, file-backed) resident memory now in MB, after handing freed heap pages back (glibc keeps them
    otherwise, and the tokenizer's transient outputs would count as held). Mapped split files are file-backed:
    the ranks of a node share those pages."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as handle:
        resident, shared = (int(field) * os.sysconf("SC_PAGE_SIZE") / 2**20 for field in handle.read().split()[1:3])
    return resident - shared, shared


def reset_peak_mb() -> float:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM); the resident MB now."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_mb("VmRSS")


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class Quiet:
    def info(self, message):
        pass


def worker(kind: str, tokenizer_dir: str, data: str, cache: str, max_len: int) -> dict:
    """Load the split one way; time it (records read and tokenized, or mapped) and what it holds after every
    pair was built once."""
    from transformers import AutoTokenizer

    from dpo_dist.tokenization import TokenizeStats, load_examples, tokenize_record
    from dpo_dist.records import read_records

    shards = None
    if kind == "together":  # a rank of a torchrun job
        from dpo_dist.engine import init_distributed, tokenize_shards

        shards = tokenize_shards(init_distributed(30))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer(["w1 w2"])  # warm the tokenizer up outside the timing
    private_before, shared_before = resident_mb()
    resident_before = reset_peak_mb()
    started = time.perf_counter()
    if kind == "lists":
        records, _ = read_records([data], skip_invalid=False)
        stats = TokenizeStats()
        held = [tokenize_record(record, tokenizer, max_len, "keep_start", stats) for record in records]
        held = [example for example in held if example is not None]
        del records
    elif kind in ("alone", "together"):  # a first start: no split cache
        held = load_examples([data], tokenizer, max_len, "keep_start", False, Quiet(), "train", shards=shards)
    else:  # "store" tokenizes and writes the split cache that "mapped" then reads
        held = load_examples([data], tokenizer, max_len, "keep_start", False, Quiet(), "train", cache_root=Path(cache),
                             write_cache=kind == "store")
    seconds = time.perf_counter() - started
    peak_added = status_mb("VmHWM") - resident_before  # what loading added at its peak (imports excluded)
    tokens = sum(example.num_tokens for example in held)  # every pair built once: all its pages touched
    private, shared = resident_mb()
    rank = int(os.environ.get("RANK", os.environ.get("RANK_FOR_REPORT", "0")))
    return {"rank": rank, "seconds": seconds, "held_mb": private - private_before, "shared_mb": shared - shared_before,
            "tokens": tokens, "pairs": len(held), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_added_mb": peak_added}


def two_ranks(scratch: Path, max_len: int) -> tuple[list[dict], list[dict]]:
    """A first start on two ranks: two processes each tokenizing the whole split at once, then a torchrun job of
    two ranks tokenizing a block each. Each rank's result, by rank."""
    def command(*launcher: str, kind: str) -> list[str]:
        return [*launcher, __file__, "--worker", kind, "--tokenizer", str(scratch / "tokenizer"), "--data",
                str(scratch / "pairs.jsonl"), "--max-length", str(max_len), "--report", str(scratch / kind)]

    processes = [subprocess.Popen(command(sys.executable, kind="alone"), env={**os.environ, "RANK_FOR_REPORT": str(rank)})
                 for rank in range(2)]
    assert [process.wait() for process in processes] == [0, 0]
    subprocess.run(command(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           kind="together"), check=True, capture_output=True)
    return tuple([json.loads((scratch / f"{kind}-rank{rank}.json").read_text()) for rank in range(2)]
                 for kind in ("alone", "together"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--prompt-words", type=int, default=1_000)
    parser.add_argument("--completion-words", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=4_096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=("lists", "store", "mapped", "alone", "together"))
    parser.add_argument("--tokenizer")
    parser.add_argument("--data")
    parser.add_argument("--cache")
    parser.add_argument("--report")
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.tokenizer, args.data, args.cache, args.max_length)
        if args.report:  # one file per rank: ranks printing at once can interleave their lines
            Path(f"{args.report}-rank{result['rank']}.json").write_text(json.dumps(result))
        else:
            print(json.dumps(result), flush=True)
        os._exit(0)  # a torchrun rank leaves without the interpreter's teardown of gloo's threads (cli.exit_process)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        make_tokenizer(scratch / "tokenizer")
        make_data(scratch / "pairs.jsonl", args.pairs, args.prompt_words, args.completion_words, args.seed)
        results = {}
        for kind in ("lists", "store", "mapped"):
            command = [sys.executable, __file__, "--worker", kind, "--tokenizer", str(scratch / "tokenizer"),
                       "--data", str(scratch / "pairs.jsonl"), "--cache", str(scratch / "tokenized"),
                       "--max-length", str(args.max_length)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[kind] = json.loads(output.strip().splitlines()[-1])
        results["two_alone"], results["two_together"] = two_ranks(scratch, args.max_length)
    lists, store, mapped = results["lists"], results["store"], results["mapped"]
    assert lists["tokens"] == store["tokens"] == mapped["tokens"] and lists["pairs"] == store["pairs"] == mapped["pairs"], results
    print(f"{store['pairs']:,} pairs, {store['tokens']:,} tokens (chosen + rejected), {os.cpu_count()} cores, "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}")
    print(f"{'':34} {'load s':>8} {'held MB':>8} {'bytes/token':>12} {'shared MB':>10} {'peak RSS MB':>12}")
    rows = (("lists, one record per call", lists), ("ExampleStore, 256 per call", store), ("mapped from data.cache_tokenized", mapped))
    for name, row in rows:
        print(f"{name:34} {row['seconds']:8.2f} {row['held_mb']:8.0f} {row['held_mb'] * 2**20 / row['tokens']:12.1f} "
              f"{row['shared_mb']:10.0f} {row['peak_rss_mb']:12.0f}")
    print(f"store / lists: load time {store['seconds'] / lists['seconds']:.2f}x, held memory {store['held_mb'] / lists['held_mb']:.2f}x; "
          f"mapped / lists: load time {mapped['seconds'] / lists['seconds']:.3f}x, held memory {mapped['held_mb'] / lists['held_mb']:.3f}x "
          "(the mapped pages are shared by the ranks of a node)")
    alone, together = results["two_alone"], results["two_together"]
    assert [rank["tokens"] for rank in alone + together] == [store["tokens"]] * 4, results
    print(f"first start on 2 ranks (slowest rank): each tokenizing all {max(r['seconds'] for r in alone):.2f} s, "
          f"a block each + exchange {max(r['seconds'] for r in together):.2f} s "
          f"({max(r['seconds'] for r in together) / max(r['seconds'] for r in alone):.2f}x); held MB per rank "
          f"{max(r['held_mb'] for r in alone):.0f} vs {max(r['held_mb'] for r in together):.0f}; peak MB the load added "
          f"{max(r['peak_added_mb'] for r in alone):.0f} vs {max(r['peak_added_mb'] for r in together):.0f} "
          f"(peak RSS {max(r['peak_rss_mb'] for r in alone):.0f} vs {max(r['peak_rss_mb'] for r in together):.0f}, "
          "deepspeed's import included in the second)")
    settings = {key: value for key, value in vars(args).items() if key not in ("worker", "tokenizer", "data", "cache", "report")}
    report = {"settings": settings, "lists": lists, "store": store, "mapped": mapped, "two_alone": alone,
              "two_together": together}
    (ROOT / "bench" / "data_loading.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
