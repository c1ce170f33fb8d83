"""Helpers for tests that run the real launch scripts as separate processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path: Path, policy: Path, ref_model: Path | None, output_dir: Path, **sections) -> Path:
    """A run config for the tiny models and the demo data; `sections` update it key by key."""
    config = {
        "model": {"base_model": str(policy), "dtype": "float32"},
        "dpo": {"beta": 0.1},
        "training": {
            "num_epochs": 1,
            "batch_size": 4,
            "learning_rate": 1e-3,
            "max_seq_length": 128,
            "output_dir": str(output_dir),
            "logging_steps": 1,
            "seed": 3,
        },
        "data": {
            "train_files": [str(ROOT / "examples/data/demo_train.jsonl")],
            "eval_files": [str(ROOT / "examples/data/demo_eval.jsonl")],
        },
        "deepspeed": {"config": "ds_configs/zero2.json", "timeout_minutes": 5},
    }
    if ref_model is not None:
        config["model"]["ref_model"] = str(ref_model)
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def run(command: list[str], timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """Run a command from the repo root; on failure the assertion shows the tail of its output."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **env}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def python_launch(script: str, config: Path, *overrides: str) -> list[str]:
    return [sys.executable, f"launch/{script}", "--config", str(config), *overrides]


def deepspeed_launch(script: str, config: Path, *overrides: str, processes: int = 2) -> list[str]:
    return ["deepspeed", "--num_gpus", str(processes), "--master_port", str(free_port()), f"launch/{script}", "--config", str(config), *overrides]


def torchrun_launch(script: str, config: Path, *overrides: str, processes: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_port", str(free_port()), f"launch/{script}", "--config", str(config), *overrides,
    ]


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"


def read_metrics(output_dir: Path) -> tuple[dict[int, dict], list[dict]]:
    """(train metrics by step, eval metric records in order) from metrics.jsonl."""
    train, evals = {}, []
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval_loss" in record:
            evals.append(record)
        else:
            train[record["step"]] = record
    return train, evals
