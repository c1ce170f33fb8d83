"""Helpers for tests that run the real launch scripts as separate processes."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import os
import signal
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


def processes_of(command: list[str]) -> int:
    """How many processes a launch command starts: its launcher's count, else 1."""
    for flag in ("--nproc_per_node", "--num_gpus"):
        if flag in command:
            return int(command[command.index(flag) + 1])
    return 1


def thread_share(processes: int) -> int:
    """Intra-op threads for each of `processes` processes started by one pytest worker: the cores are shared
    with the processes of the other pytest-xdist workers (the README's test command starts one per core)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // (processes * workers))


def run(command: list[str], timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """Run a command from the repo root; on failure the assertion shows the tail of its output. Its processes
    get their share of the cores (intra-op threads each, at most 4: the tests' models are too small for more)."""
    threads = min(4, thread_share(processes_of(command)))
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads),
                **env}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def python_launch(script: str, config: Path, *overrides: str) -> list[str]:
    return [sys.executable, f"launch/{script}", "--config", str(config), *overrides]


@functools.cache
def _launch_script(script: str):
    """launch/<script> as a module, loaded once (its top level puts the checkout on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"launch_{Path(script).stem}", ROOT / "launch" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_here(script: str, config: Path, *words: str) -> str:
    """What `python launch/<script> --config config words...` does (a world of one: the script's own argument
    parsing and main()), in this process; returns what it printed (stdout and stderr together). A fresh
    interpreter spends ~10 s of a small one-process run on imports and DeepSpeed's first engine, so tests about
    what a run computes use this; tests about launchers, exit statuses, user-error lines or rank processes run
    the script (`run`). The one-process group, once made, serves every later run; the environment variables and
    signal handlers a run sets are put back."""
    from dpo_dist.cli import parse_args
    from dpo_dist.config import load_config

    module = _launch_script(script)
    args = parse_args(module.__doc__, ["--config", str(config), *words], getattr(module, "FLAGS", ()))
    environment = dict(os.environ)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            status = module.main(load_config(args.config, args.overrides), args)
    finally:
        os.environ.clear()
        os.environ.update(environment)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert not status, printed.getvalue()[-4000:]
    return printed.getvalue()


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


def held_by_rank_0(line: str) -> tuple[int, int]:
    """(local, total) parameter elements from a run's `<model>: rank 0 holds <local> of <total> parameter ...` line."""
    local, total = line.split("holds ")[1].split(" parameter")[0].split(" of ")
    return int(local.replace(",", "")), int(total.replace(",", ""))


def logged_steps(output_dir: Path) -> list[int]:
    """Steps in metrics.jsonl so far; a line still being written is skipped."""
    path = output_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass
    return steps
