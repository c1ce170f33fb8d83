"""Step time and peak memory of training with the online reference vs the precomputed cache.

Both runs train the same Qwen3-shaped model (random weights, bigger than the test model so the
reference's memory shows) on the same data, batches and number of processes, in this one
invocation. Prints the ratios precomputed / online and writes them to a JSON file.

    python bench/precompute_vs_online.py                       # CPU, one process, ~2 minutes
    python bench/precompute_vs_online.py --processes 2 --hidden 512 --layers 4 --steps 20

Step time is the median `step_seconds` over the logged windows after the first (warm-up);
peak memory is `peak_memory_mb` of rank 0 (CPU: peak RSS, GPU: CUDA max allocated).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from make_tiny_qwen3 import make_checkpoint  # noqa: E402


def launch(script: str, config: Path, processes: int, *overrides: str) -> None:
    if processes == 1:
        command = [sys.executable, f"launch/{script}"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), f"launch/{script}"]
    result = subprocess.run(command + ["--config", str(config), *overrides], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{script} failed:\n{result.stderr[-3000:]}")


def summarize(output_dir: Path) -> dict:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "step_seconds" in r]
    steady = train[1:] or train
    return {
        "step_seconds": statistics.median(r["step_seconds"] for r in steady),
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steady),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in train),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ds-config", default="ds_configs/zero2.json")
    parser.add_argument("--out", default="bench/precompute_vs_online.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dpo_bench_"))
    shape = dict(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                 num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256), head_dim=64)
    model_dir = make_checkpoint(work / "model", seed=0, **shape)
    config = {
        "model": {"base_model": str(model_dir), "dtype": "float32"},
        "training": {"batch_size": args.batch_size, "max_steps": args.steps, "logging_steps": 4, "learning_rate": 1e-5,
                     "max_seq_length": 128},
        "data": {"train_files": [str(ROOT / "examples/data/demo_train.jsonl")], "eval_files": []},
        "deepspeed": {"config": args.ds_config},
        "reference": {"cache_dir": str(work / "cache")},
    }
    config_path = work / "bench.yaml"
    config_path.write_text(yaml.safe_dump(config))

    launch("precompute_ref.py", config_path, args.processes)
    launch("train.py", config_path, args.processes, f"training.output_dir={work / 'online'}")
    launch("train.py", config_path, args.processes, f"training.output_dir={work / 'precomputed'}", "reference.mode=precomputed")
    online, precomputed = summarize(work / "online"), summarize(work / "precomputed")
    reference_mb = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20
    result = {
        "setup": {**vars(args), "reference_weights_mb": round(reference_mb, 1)},
        "online": online,
        "precomputed": precomputed,
        "step_time_ratio": precomputed["step_seconds"] / online["step_seconds"],
        "peak_memory_ratio": precomputed["peak_memory_mb"] / online["peak_memory_mb"],
        "memory_saved_mb": online["peak_memory_mb"] - precomputed["peak_memory_mb"],
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"model: hidden {args.hidden}, {args.layers} layers, reference weights {reference_mb:.0f} MB; "
          f"{args.processes} process(es), {args.steps} steps of {args.batch_size} pairs per process")
    print(f"{'':14}{'online':>12}{'precomputed':>14}{'ratio':>8}")
    for key in ("step_seconds", "tokens_per_second", "peak_memory_mb"):
        print(f"{key:14}{online[key]:12.3f}{precomputed[key]:14.3f}{precomputed[key] / online[key]:8.2f}")
    print(f"memory saved: {result['memory_saved_mb']:.0f} MB (the reference's weights: {reference_mb:.0f} MB)")


if __name__ == "__main__":
    main()
