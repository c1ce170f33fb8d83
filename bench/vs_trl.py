"""dpo-dist vs TRL's DPOTrainer: tokens/s, step time and peak memory per rank, in ONE invocation.

Both tools train the same model (a Qwen3-shaped checkpoint with random weights, written here), on the
same preference pairs, with the same micro-batch, accumulation, sequence length, precision (fp32 on
CPU, bf16 on GPU), learning rate, beta, optimizer (torch AdamW), number of ranks and DeepSpeed ZeRO
stage, each with a separate frozen reference loaded from the same checkpoint (or, with --lora-r, a LoRA
adapter and the adapter-disabled reference). Prints the numbers for both, MFU on a GPU, and the ratios
dpo-dist / TRL, and writes them to a JSON file (after every run, so a failed run keeps the others).

    python bench/vs_trl.py                                   # the CPU proxy case, 2 ranks (~5.5 min on 2 idle cores)
    python bench/vs_trl.py --steps 3 --seq-len 256 --hidden 64 --no-packing   # a quick smoke run (~1 min)
    python bench/vs_trl.py --variant chunk256:model.logps_chunk_tokens=256  # one more dpo-dist run
    python bench/vs_trl.py --trl-backend ddp                 # TRL under DDP instead of its DeepSpeed integration
    python bench/vs_trl.py --variant precomputed:reference.mode=precomputed   # launch/precompute_ref.py first
    # the GPU cases (one GPU): Qwen3-1.7B full-parameter ZeRO-3 bf16, and Qwen3-4B LoRA r16 (the seed recipe)
    python bench/vs_trl.py --device cuda --processes 1 --preset qwen3-1.7b --ds-config ds_configs/zero3.json \
        --seq-len 2048 --batch-size 2 --grad-accum 4 --steps 5 --warmup-steps 2
    python bench/vs_trl.py --device cuda --processes 1 --preset qwen3-4b --lora-r 16 \
        --seq-len 2048 --batch-size 2 --grad-accum 4 --steps 5 --warmup-steps 2

The CPU proxy case (issue 8): Qwen3 shape with the REAL 151,936-token vocabulary and few small layers
(hidden 256, 2 layers, tied embeddings as Qwen3-0.6B..4B), chat-formatted pairs whose prompt + completion
is ~1024 tokens (about half prompt, half completion), 2 ranks, 1 pair per rank per micro-batch. The
tokenizer is the repo's small Qwen-style one (examples/make_tiny_qwen3.py): token ids stay below 512,
but every log-prob is a softmax over all 151,936 logits, which is what costs memory and time.

How it is measured, the same way for both tools:
- tokens: the non-padding tokens of chosen + rejected of every micro-batch of every rank
  (dpo-dist: the step's growth of `num_tokens` in metrics.jsonl, which counts all trained on so far as TRL's
  does; TRL: `attention_mask.sum()` of each micro-batch it trains on).
  With `data.prefix_sharing` dpo-dist's decoder runs a shared prompt once, but `num_tokens` still counts it
  in chosen and in rejected, so tokens/s compares the pairs both tools get through per second.
- step time: wall time of each optimizer step, end of one step to the end of the next (dpo-dist:
  `step_seconds` with logging_steps=1; TRL: a callback's `on_step_end` timestamps). The first
  `--warmup-steps` steps are left out; tokens/s = tokens of the remaining steps / their total time.
- peak memory: every rank's peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`; on a GPU
  `torch.cuda.max_memory_allocated`) read right after each optimizer step, max over steps and ranks.
  dpo-dist's own `peak_memory_mb` (rank 0) is reported beside it. Neither tool writes a checkpoint or
  an export (TRL: save_strategy="no"; dpo-dist: the bench's rank wrapper skips the final ones).
- threads: each rank gets cores / ranks intra-op threads (OMP_NUM_THREADS), both tools alike.
- a variant with `reference.mode=precomputed` runs launch/precompute_ref.py on the same ranks first (its cache
  in the work dir). Its training rate leaves the pass out, so the report adds the pass's own rate (its
  "precompute: scored ..." line: scoring time of the slowest rank, model loading left out, the first
  batches' warm-up in) and tokens/s with the pass's time spread over 1 and 3 epochs,
  1 / (1/train + 1/(epochs x precompute)), with their ratios to TRL. Its MFU counts no reference forward.
- MFU (GPU): tokens/s x dpo_dist.metrics.flops_per_token (4N + 2N_trainable + 2N_reference per token,
  exact parameter counts, attention's T^2 term and recompute not counted) / the device's peak bf16
  FLOP/s (dpo_dist.metrics.PEAK_TFLOPS), one formula for both tools, on the tokens the decoder ran on
  (dpo-dist's `num_processed_tokens`: a shared prompt counted once).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workload import PRESETS, apply_preset, make_model, make_pairs, model_flops_per_token

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # dpo_dist, also when the package is not installed
WORKER_FLAG = "--dpo-dist-worker"  # internal: this file as one dpo-dist rank (see run_dpo_dist_worker)


# ----------------------------------------------------------------------------- launching
class RunFailed(RuntimeError):
    """One tool's run exited non-zero (its log's tail is the message)."""


def rank_env(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    threads = max(1, (os.cpu_count() or 1) // args.processes) if args.threads is None else args.threads
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def torchrun(args: argparse.Namespace, script_and_args: list[str], log: Path, finished=None) -> dict:
    """Run `script_and_args` on `args.processes` ranks; stops on failure, unless `finished()` says the run
    wrote everything it measures before its exit failed (recorded as `exit_code_after_training`). Returns
    the wall seconds, the CPU seconds the ranks used and the load average around the run: the bench shares
    the machine, and a CPU utilisation well below 1.0 means the ranks waited for cores (or on each other)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes),
               *script_and_args]
    env = rank_env(args)
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    exit_after_training = {}
    if result.returncode != 0 and finished is not None and finished():
        # Seen with TRL on CPU: every rank finished and wrote its record, then one aborted in teardown
        # ("terminate called without an active exception"). The measured steps are complete.
        print(f"  note: exit {result.returncode} after the run wrote all its records (see {log})", flush=True)
        exit_after_training = {"exit_code_after_training": result.returncode}
    elif result.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RunFailed(f"exit {result.returncode}: {' '.join(command)}\n--- last lines of {log} ---\n{tail}")
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    slots = args.processes * int(env["OMP_NUM_THREADS"])
    return {**exit_after_training, "wall_seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "cpu_utilisation": round(cpu / (seconds * slots), 3),
            "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def run_trl(args, model_dir: Path, data: Path, work: Path) -> dict:
    record_dir = work / "trl_records"
    command = [
        "bench/trl_runner.py", "--model", str(model_dir), "--data", str(data), "--record-dir", str(record_dir),
        "--output-dir", str(work / "trl_out"), "--backend", args.trl_backend, "--ds-config", args.ds_config,
        "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
        "--lr", str(args.lr), "--beta", str(args.beta), "--max-length", str(args.seq_len), "--seed", str(args.seed),
        "--device", args.device, "--dtype", args.dtype, "--lora-r", str(args.lora_r),
    ]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    records = [record_dir / f"trl_rank{r}.json" for r in range(args.processes)]  # written after trainer.train()
    run = torchrun(args, command, work / "trl.log", finished=lambda: all(path.exists() for path in records))
    ranks = [json.loads(path.read_text()) for path in records]
    step_ends = [ranks[0]["train_begin"]] + [s["end"] for s in ranks[0]["steps"]]  # ranks step in lockstep
    durations = [b - a for a, b in zip(step_ends, step_ends[1:])]
    tokens = [sum(rank["steps"][i]["tokens"] for rank in ranks) for i in range(len(durations))]
    peaks = [max(s["peak_memory_mb"] for s in rank["steps"]) for rank in ranks]
    if ranks[0]["world_size"] != args.processes:
        raise RunFailed(f"TRL ran on {ranks[0]['world_size']} processes, not {args.processes}")
    zero = ranks[0]["zero_stage"]
    backend = f"DeepSpeed ZeRO-{zero} (TRL integration)" if zero is not None else f"{ranks[0]['distributed_type']} (no DeepSpeed)"
    return {
        "backend": backend,
        **run,
        **summarize(durations, tokens, peaks, args.warmup_steps),
        "peak_memory_mb_before_first_step_max_over_ranks": max(rank["peak_memory_mb_before_first_step"] for rank in ranks),
        "engines": {key: ranks[0][key] for key in ("policy_engine", "optimizer", "reference_engine")},
        "device_name": ranks[0].get("device_name"),
        "torch_threads_per_rank": ranks[0]["torch_threads"],
        "loss_first_step": next((h["loss"] for h in ranks[0]["log_history"] if "loss" in h), None),
    }


def run_dpo_dist(args, model_dir: Path, data: Path, work: Path, name: str, overrides: list[str]) -> dict:
    import yaml

    output_dir = work / name
    record_dir = work / f"{name}_records"
    config = {
        "model": {"base_model": str(model_dir), "dtype": args.dtype, "attn_implementation": "sdpa",
                  "gradient_checkpointing": bool(args.gradient_checkpointing)},
        "dpo": {"beta": args.beta, "loss_type": "sigmoid"},
        "training": {"num_epochs": 1, "batch_size": args.batch_size, "gradient_accumulation_steps": args.grad_accum,
                     "learning_rate": args.lr, "warmup_ratio": 0.0, "lr_scheduler": "linear",
                     "max_seq_length": args.seq_len, "max_steps": args.steps, "output_dir": str(output_dir),
                     "logging_steps": 1, "eval_steps": 0, "save_steps": 0, "seed": args.seed},
        "data": {"train_files": [str(data)], "eval_files": [], "packing": False, "truncation_mode": "keep_start"},
        "deepspeed": {"config": args.ds_config},
        "reference": {"mode": "adapter" if args.lora_r else "model"},
    }
    if args.lora_r:
        config["lora"] = {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0,
                          "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    config_path = work / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    precompute = None
    if "reference.mode=precomputed" in overrides:  # the offline pass first, on the same ranks; timed apart
        overrides = [*overrides, f"reference.cache_dir={work / (name + '_cache')}"]
        precompute = run_precompute(args, config_path, [o for o in overrides if not o.startswith("reference.mode=")],
                                    work / f"{name}_precompute.log")
    run = torchrun(args, ["bench/vs_trl.py", WORKER_FLAG, str(record_dir), "--config", str(config_path), *overrides],
                   work / f"{name}.log")
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "step_seconds" in r]
    if any(b["step"] - a["step"] != 1 for a, b in zip(train, train[1:])):
        raise RunFailed(f"{output_dir}/metrics.jsonl: expected one record per step (logging_steps=1)")
    ranks = [json.loads((record_dir / f"rank{r}.json").read_text()) for r in range(args.processes)]
    peaks = [max(rank["peak_memory_mb_after_step"]) for rank in ranks]
    stage = json.loads((ROOT / args.ds_config).read_text())["zero_optimization"]["stage"]
    trained = [r["num_tokens"] for r in train]  # TRL's num_tokens: trained on so far; a step's are the difference
    steady = summarize([r["step_seconds"] for r in train], [b - a for a, b in zip([0.0] + trained, trained)], peaks,
                       args.warmup_steps)
    return {
        "backend": f"DeepSpeed ZeRO-{stage}" + (" " + " ".join(overrides) if overrides else ""),
        "overrides": overrides,
        **run,
        **steady,
        "peak_memory_mb_before_first_step_max_over_ranks": max(rank["peak_memory_mb_before_first_step"] for rank in ranks),
        "peak_memory_mb_rank0_logged": max(r["peak_memory_mb"] for r in train),
        "torch_threads_per_rank": ranks[0]["torch_threads"],
        "loss_first_step": train[0]["loss"],
        # What the decoder ran on: fewer than num_tokens with data.prefix_sharing (a shared prompt counts once).
        "processed_tokens_per_second": (sum(r["num_processed_tokens"] for r in train[args.warmup_steps:])
                                        / sum(r["step_seconds"] for r in train[args.warmup_steps:])),
        **({} if precompute is None
           else with_precompute(precompute, steady, model_flops_per_token(args, with_reference=False)[0])),
    }


PRECOMPUTE_LINE = re.compile(r"precompute: scored (\d+) pairs, ([\d,]+) tokens in ([\d.]+) s on (\d+) rank")
EPOCHS_AMORTISED = (1, 3)  # one pass over the data, and the standard config's num_epochs


def run_precompute(args, config_path: Path, overrides: list[str], log: Path) -> dict:
    """launch/precompute_ref.py on the bench's ranks; its own line gives the scoring time (model loading left out)."""
    run = torchrun(args, ["launch/precompute_ref.py", "--config", str(config_path), *overrides], log)
    found = PRECOMPUTE_LINE.search(log.read_text())
    if found is None:
        raise RunFailed(f"{log}: no 'precompute: scored ...' line")
    pairs, tokens, seconds = int(found[1]), int(found[2].replace(",", "")), float(found[3])
    return {"pairs": pairs, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "wall_seconds_with_start_up": run["wall_seconds"]}


def with_precompute(precompute: dict, steady: dict, flops_without_reference: float) -> dict:
    """What a precomputed reference costs, said beside the training rate that leaves it out: the offline pass
    scores each pair once and serves every epoch, so over E epochs a token costs 1/train + 1/(E x precompute)
    seconds. The same tokens (num_tokens) in both rates. MFU counts the work the run did: no reference forward."""
    train = steady["tokens_per_second"]
    return {
        "precompute": precompute,
        "flops_per_token": flops_without_reference,
        "tokens_per_second_with_precompute": {
            f"{epochs}_epochs": 1.0 / (1.0 / train + 1.0 / (epochs * precompute["tokens_per_second"]))
            for epochs in EPOCHS_AMORTISED
        },
    }


def summarize(durations: list[float], tokens: list[float], memory_per_rank: list[float], warmup: int) -> dict:
    if len(durations) <= warmup:
        raise RunFailed(f"only {len(durations)} steps recorded; need more than --warmup-steps {warmup}")
    steady_d, steady_t = durations[warmup:], tokens[warmup:]
    return {
        "steps_measured": len(steady_d),
        "step_seconds_median": statistics.median(steady_d),
        "step_seconds_mean": sum(steady_d) / len(steady_d),
        "tokens_per_step_mean": sum(steady_t) / len(steady_t),
        "tokens_per_second": sum(steady_t) / sum(steady_d),
        "peak_memory_mb_per_rank": [round(x, 1) for x in memory_per_rank],
        "peak_memory_mb_max_over_ranks": max(memory_per_rank),
        "step_seconds_all": [round(x, 3) for x in durations],
    }


def run_dpo_dist_worker(record_dir: str, train_argv: list[str]) -> None:
    """One dpo-dist rank: launch/train.py unchanged, plus this rank's peak RSS after every optimizer step."""
    import runpy

    import torch

    from dpo_dist import trainer as trainer_module

    from dpo_dist.metrics import peak_memory_mb  # CUDA max allocated on a GPU, peak RSS on CPU: as TRL's runner

    after_step: list[float] = []
    before_first: list[float] = []
    original = trainer_module.Trainer.train_step
    rank = int(os.environ.get("RANK", "0"))
    record = Path(record_dir) / f"rank{rank}.json"

    def write_record() -> None:
        # After every step, not at exit: launch/train.py leaves with os._exit (cli.exit_process), which runs no
        # `finally` of this frame
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(
            {"rank": rank, "torch_threads": torch.get_num_threads(), "peak_memory_mb_after_step": after_step,
             "peak_memory_mb_before_first_step": before_first[0] if before_first else None}))

    def train_step(self, micro_batches, window):
        if not before_first:
            before_first.append(peak_memory_mb())
        original(self, micro_batches, window)
        after_step.append(peak_memory_mb())
        write_record()

    trainer_module.Trainer.train_step = train_step
    # Like TRL's run (save_strategy="no"), no final checkpoint or export: writing a 1.7B model's optimizer
    # state is tens of GB of disk time that the bench does not measure.
    trainer_module.Checkpointer.save = lambda self, step, *_: self.output_dir
    trainer_module.export_hf = lambda *_, **__: None
    sys.argv = [str(ROOT / "launch/train.py"), *train_argv]
    runpy.run_path(str(ROOT / "launch/train.py"), run_name="__main__")


# ----------------------------------------------------------------------------- main
def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a real Qwen3 shape (overrides the shape flags)")
    parser.add_argument("--vocab-size", type=int, default=151936, help="Qwen3's real vocabulary")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=None, help="default 3 x hidden")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=None, help="default hidden / head_dim")
    parser.add_argument("--kv-heads", type=int, default=None, help="default heads / 2")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--untied", action="store_true", help="separate lm_head (as Qwen3-8B+); default tied")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per rank")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default fp32 on CPU, bf16 on GPU")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank on all linear layers (alpha 2r), adapter-disabled reference in both tools; 0 = full fine-tuning with a separate reference")
    parser.add_argument("--seq-len", type=int, default=1024, help="max_length / max_seq_length; pairs are built just under it")
    parser.add_argument("--completion-share", type=float, default=0.5, help="share of each sequence that is completion")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per rank (default cores / ranks)")
    parser.add_argument("--batch-size", type=int, default=1, help="pairs per rank per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of the numbers")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on for both (TRL's default is on)")
    parser.add_argument("--ds-config", default="ds_configs/zero2.json")
    parser.add_argument("--trl-backend", choices=["deepspeed", "ddp"], default="deepspeed")
    parser.add_argument("--no-trl", action="store_true", help="dpo-dist runs only (no ratios)")
    parser.add_argument("--no-packing", action="store_true", help="skip the dpo-dist data.packing=true variant")
    parser.add_argument("--no-defaults", action="store_true", help="skip the dpo-dist run with default settings (variants only)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help="one more dpo-dist run with these config overrides, e.g. chunk256:model.logps_chunk_tokens=256")
    parser.add_argument("--work-dir", default=None, help="default: a fresh temp dir, removed at the end")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, metrics)")
    parser.add_argument("--out", default="bench/vs_trl.json")
    args = parser.parse_args()
    for flag in ("processes", "batch_size", "grad_accum", "steps", "seq_len", "layers", "hidden", "vocab_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.warmup_steps < args.steps:  # checked before any run: the numbers leave the warm-up steps out
        parser.error(f"--warmup-steps {args.warmup_steps} leaves no measured step of --steps {args.steps}")
    args.variants = []  # (run name, overrides), parsed once here so a bad spec stops the bench before any run
    for spec in args.variant:
        name, _, overrides = spec.partition(":")
        if not name or "=" in name or not overrides:
            parser.error(f"--variant {spec!r}: give NAME:KEY=VALUE[,KEY=VALUE], e.g. chunk256:model.logps_chunk_tokens=256")
        args.variants.append((f"dpo_dist_{name}", [o for o in overrides.split(",") if o]))
    apply_preset(args)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def machine_info(args: argparse.Namespace) -> dict:
    import deepspeed
    import torch
    import transformers

    info = {"device": args.device, "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "deepspeed": deepspeed.__version__}
    try:
        import trl as trl_pkg

        info["trl"] = trl_pkg.__version__
    except ImportError:
        info["trl"] = None
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def add_ratios_and_mfu(results: dict, flops_per_token: float, peak_tflops: float | None, processes: int) -> dict:
    """MFU of every run from its tokens/s and ONE formula for both tools (the trainer's: per device, so the
    run's tokens/s over `processes` devices); ratios dpo-dist / TRL."""
    for r in results.values():
        if "tokens_per_second" in r and peak_tflops:  # hardware MFU: on the tokens each tool's decoder ran on
            r["mfu"] = (r.get("processed_tokens_per_second", r["tokens_per_second"]) * r.get("flops_per_token", flops_per_token)
                        / processes / (peak_tflops * 1e12))
    trl = results.get("trl", {})
    ratios = {}
    for name in [k for k in results if k != "trl"]:
        ours = results[name]
        if "tokens_per_second" not in ours or "tokens_per_second" not in trl:
            continue
        ratios[name] = {
            "tokens_per_second": ratio(ours["tokens_per_second"], trl["tokens_per_second"]),
            "step_seconds_median": ratio(ours["step_seconds_median"], trl["step_seconds_median"]),
            "peak_memory_mb_max_over_ranks": ratio(ours["peak_memory_mb_max_over_ranks"], trl["peak_memory_mb_max_over_ranks"]),
        }
        for epochs, rate in ours.get("tokens_per_second_with_precompute", {}).items():
            ratios[name][f"tokens_per_second_with_precompute_{epochs}"] = ratio(rate, trl["tokens_per_second"])
    return ratios


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="dpo_vs_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}", flush=True)
    model_dir = make_model(work / "model", args)
    num_pairs = args.steps * args.batch_size * args.grad_accum * args.processes
    data = work / "pairs.jsonl"
    lengths = make_pairs(data, model_dir, num_pairs, args.seq_len, args.completion_share, args.seed)
    print(f"model: {model_dir} ({time.perf_counter() - start:.0f} s); {num_pairs} pairs, mean tokens {lengths}", flush=True)

    from dpo_dist.metrics import device_peak_tflops

    machine = machine_info(args)
    peak_tflops = device_peak_tflops(None) if args.device == "cuda" else None  # the trainer's own table lookup
    flops, counts = model_flops_per_token(args)
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = ([] if args.no_trl else [("trl", None)]) + ([] if args.no_defaults else [("dpo_dist", [])])
    runs += [] if args.no_packing else [("dpo_dist_packed", ["data.packing=true"])]
    runs += args.variants

    results: dict = {}
    for name, overrides in runs:
        print(f"{name} ({'TRL DPOTrainer' if overrides is None else ' '.join(overrides) or 'defaults'}) ...", flush=True)
        try:  # one failed run (e.g. out of memory) is recorded; the others still run
            results[name] = (run_trl(args, model_dir, data, work) if overrides is None
                             else run_dpo_dist(args, model_dir, data, work, name, overrides))
            print(f"  {results[name]['tokens_per_second']:.1f} tokens/s, {results[name]['peak_memory_mb_max_over_ranks']:.0f} MB",
                  flush=True)
        except RunFailed as failure:
            results[name] = {"failed": str(failure)}
            print(f"  FAILED: {failure}", flush=True)
        ratios = add_ratios_and_mfu(results, flops, peak_tflops, args.processes)
        report = {
            "settings": {
                **{k: v for k, v in vars(args).items() if k not in ("work_dir", "keep", "out")},
                "reference": "adapter disabled" if args.lora_r else "separate frozen model, same checkpoint",
                "optimizer": "torch.optim.AdamW(fused=True) in both", "mean_tokens": lengths, "pairs": num_pairs,
                "flops_per_token": flops, **counts, "peak_tflops": peak_tflops,
            },
            "machine": machine,
            "results": results,
            "ratios_dpo_dist_over_trl": ratios,
            "goals": ({"mfu_min": 0.45, "tokens_per_second_ratio_min": 1.5, "peak_memory_ratio_max": 0.7}
                      if args.device == "cuda" else {"peak_memory_ratio_max": 0.6, "tokens_per_second_ratio_min": 1.3}),
            "bench_wall_seconds": time.perf_counter() - start,
        }
        out.write_text(json.dumps(report, indent=2) + "\n")  # after every run: a later failure keeps what ran

    memory = "peak MB" if args.device == "cuda" else "peak RSS MB"
    print()
    print(f"{'run':<26}{'backend':<44}{'tokens/s':>9}{'step s':>8}{memory:>12}{'pre-step':>10}{'MFU':>7}")
    for name, r in results.items():
        if "failed" in r:
            print(f"{name:<26}FAILED")
            continue
        mfu = f"{r['mfu']:.3f}" if "mfu" in r else "-"
        print(f"{name:<26}{r['backend'][:43]:<44}{r['tokens_per_second']:>9.1f}{r['step_seconds_median']:>8.2f}"
              f"{r['peak_memory_mb_max_over_ranks']:>12.0f}{r['peak_memory_mb_before_first_step_max_over_ranks']:>10.0f}{mfu:>7}")
    goals = report["goals"]
    for name, r in ratios.items():
        print(f"{name} / trl: tokens/s {r['tokens_per_second']:.2f}x (goal >= {goals['tokens_per_second_ratio_min']}), "
              f"step time {r['step_seconds_median']:.2f}x, peak memory {r['peak_memory_mb_max_over_ranks']:.2f}x "
              f"(goal <= {goals['peak_memory_ratio_max']})")
        amortised = [f"{key.rsplit('_', 2)[1]} epochs {value:.2f}x" for key, value in r.items()
                     if key.startswith("tokens_per_second_with_precompute_")]
        if amortised:
            print(f"  with the precompute pass's time spread over: {', '.join(amortised)}")
    print(f"wrote {out} ({report['bench_wall_seconds']:.0f} s)")
    if not args.keep and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, r in results.items() if "failed" in r]
    if failed:  # a script or CI reading only the exit status must see it
        sys.exit(f"failed: {', '.join(failed)} (their errors are above and in {out})")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == WORKER_FLAG:
        run_dpo_dist_worker(sys.argv[2], sys.argv[3:])
    else:
        main()
