"""Metric sums across micro-steps and ranks, and where they are written (rank 0 only).

Sums stay as device tensors over a logging window; a log step stacks them and runs ONE
all-reduce, then divides by the global counts. Names and meanings follow TRL's DPOTrainer:
- per-pair means (over every pair of every rank): loss, rewards/chosen, rewards/rejected,
  rewards/accuracies (chosen reward strictly greater), rewards/margins, logps/chosen, logps/rejected;
- per-token means: logits/chosen, logits/rejected (the mean-over-vocab logit of completion tokens), entropy (of
  the policy's next-token distribution, over chosen and rejected completion tokens), mean_token_accuracy (the
  share of chosen completion tokens that are the policy's argmax); absent with training.token_metrics false;
- nll_loss: the per-token NLL of the chosen completion, averaged over pairs (the SFT term).
Eval padding pairs carry weight 0 and count nowhere.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dpo_dist.cache import write_atomic
from dpo_dist.losses import PreferenceLoss
from dpo_dist.logps import PairLogps

# name -> the count it is divided by after the all-reduce
_MEAN_OVER = {
    "loss": "pairs",
    "rewards/chosen": "pairs",
    "rewards/rejected": "pairs",
    "rewards/accuracies": "pairs",
    "rewards/margins": "pairs",
    "logps/chosen": "pairs",
    "logps/rejected": "pairs",
    "logits/chosen": "chosen_tokens",
    "logits/rejected": "rejected_tokens",
    "entropy": "completion_tokens",
    "mean_token_accuracy": "chosen_tokens",
    "nll_loss": "pairs",
    "sft_nll_loss": "sft_examples",
    "aux_loss": "routed_batches",
}
# The policy's per-token metrics, logged with training.token_metrics (the default)
TOKEN_METRICS = ("logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")
_COUNTS = ("pairs", "chosen_tokens", "rejected_tokens", "completion_tokens", "tokens", "processed_tokens", "sft_examples",
           "routed_batches")


def batch_sums(loss: PreferenceLoss, policy: PairLogps, nll: torch.Tensor, weight: torch.Tensor, num_tokens: int,
               processed_tokens: torch.Tensor, sft_nll: torch.Tensor | None = None, router_loss: torch.Tensor | None = None) -> dict:
    """Weighted sums of one micro-batch's metrics (detached); `weight` is (B,) with 0 for padding pairs;
    `num_tokens` the sequences' tokens (TRL's count), `processed_tokens` those the decoder ran on (fewer with
    prefix sharing: a shared prompt runs once); `sft_nll` (S,) per-token NLL of the SFT rows mixed in, if any;
    `router_loss` a MoE policy's load-balancing loss, if trained with it (TRL's aux_loss: a mean over micro-batches)."""
    w = weight.to(loss.losses.dtype)
    chosen_tokens = (policy.chosen_tokens.to(w.dtype) * w).sum()
    rejected_tokens = (policy.rejected_tokens.to(w.dtype) * w).sum()
    sums = {
        "nll_loss": (nll.detach() * w).sum(),
        "loss": (loss.losses.detach() * w).sum(),
        "rewards/chosen": (loss.chosen_rewards * w).sum(),
        "rewards/rejected": (loss.rejected_rewards * w).sum(),
        "rewards/accuracies": ((loss.chosen_rewards > loss.rejected_rewards).to(w.dtype) * w).sum(),
        "rewards/margins": ((loss.chosen_rewards - loss.rejected_rewards) * w).sum(),
        "logps/chosen": (policy.chosen_logps.detach() * w).sum(),
        "logps/rejected": (policy.rejected_logps.detach() * w).sum(),
        "pairs": w.sum(),
        "chosen_tokens": chosen_tokens,
        "rejected_tokens": rejected_tokens,
        "completion_tokens": chosen_tokens + rejected_tokens,
        "tokens": w.new_full((), float(num_tokens)),  # a fill kernel, no host copy
        "processed_tokens": processed_tokens.to(w.dtype),
        "sft_nll_loss": (sft_nll.detach().sum() if sft_nll is not None else w.new_zeros(())),
        "sft_examples": w.new_full((), float(sft_nll.numel()) if sft_nll is not None else 0.0),  # no host copy
        "aux_loss": router_loss.detach().float() if router_loss is not None else w.new_zeros(()),
        "routed_batches": w.new_full((), 1.0 if router_loss is not None else 0.0),
    }
    if policy.chosen_logits_sum is not None:  # the policy's forward computed TOKEN_METRICS (training.token_metrics)
        sums["logits/chosen"] = (policy.chosen_logits_sum * w).sum()
        sums["logits/rejected"] = (policy.rejected_logits_sum * w).sum()
        sums["entropy"] = ((policy.chosen_entropy_sum + policy.rejected_entropy_sum) * w).sum()
        sums["mean_token_accuracy"] = (policy.chosen_top1_tokens * w).sum()
    return sums


# Dense bf16 peak TFLOP/s per device (vendor datasheets, without sparsity); `training.peak_tflops` overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}


def device_peak_tflops(override: float | None) -> float | None:
    """Peak TFLOP/s of this process's device: the override, the table by CUDA device name, or None (CPU)."""
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def flops_per_token(policy_params: int, trainable_params: int, reference_params: int) -> float:
    """Model FLOPs per non-padding token of one training step, counted honestly:
    policy forward 2N, backward through all weights 2N for activations plus 2N_trainable for weight
    gradients (6N in full fine-tuning, ~4N with LoRA), reference forward 2N_ref (0 when precomputed).
    Attention's sequence-length term and activation-checkpointing recompute are not counted."""
    return 4.0 * policy_params + 2.0 * trainable_params + 2.0 * reference_params


def peak_memory_mb() -> float:
    """This process's peak memory: CUDA max allocated on a GPU, else the peak resident set (CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class PreemptionFlag:
    """Set by SIGTERM or SIGUSR1 (what SLURM sends before preemption or the time limit); the loop
    reads it after each optimizer step, checkpoints and exits instead of dying mid-step."""

    def __init__(self) -> None:
        self.requested = False
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


class TrainClock:
    """Seconds spent training since the last reset; time while paused (eval) is not counted."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._seconds = 0.0
        self._since: float | None = time.perf_counter()

    def pause(self) -> None:
        self._seconds = self.seconds()
        self._since = None

    def resume(self) -> None:
        self._since = time.perf_counter()

    def seconds(self) -> float:
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self._seconds + running


class RunTotals:
    """This invocation's training, for `train_results.json` at the end (the train_* summary HF's Trainer logs
    when TRL's DPOTrainer finishes): wall time from the first step to the last (evals and checkpoint saves
    included, as HF counts), the pairs, tokens and steps trained in it, and the mean per-step loss over its
    logging windows. A resumed run counts from where it resumed, as transformers 5 does."""

    def __init__(self, state) -> None:
        self._start = time.perf_counter()
        self._first = (state.step, state.consumed_pairs, state.consumed_tokens)
        self._loss_sum, self._loss_steps = 0.0, 0

    def add_window(self, loss: float, steps: int) -> None:
        """A logging window's mean loss over its `steps` steps (every step trains the same number of pairs)."""
        self._loss_sum += loss * steps
        self._loss_steps += steps

    def summary(self, state, epoch: float) -> dict[str, float | None]:
        runtime = time.perf_counter() - self._start
        step, pairs, tokens = self._first
        return {
            "train_runtime": runtime,
            "train_samples_per_second": (state.consumed_pairs - pairs) / runtime,
            "train_steps_per_second": (state.step - step) / runtime,
            "train_tokens_per_second": (state.consumed_tokens - tokens) / runtime,
            "train_loss": self._loss_sum / self._loss_steps if self._loss_steps else None,
            "train_steps": state.step - step,
            "epoch": epoch,
        }


class MetricWindow:
    """Accumulates `batch_sums` over micro-steps; `reduce()` all-reduces once and returns means. `token_metrics`:
    whether the sums carry TOKEN_METRICS (training.token_metrics). The names reduced follow it, not the sums at
    hand, so every rank stacks the same names in the same order, and a missing sum fails loudly."""

    def __init__(self, token_metrics: bool = True) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._names = [name for name in (*_MEAN_OVER, *_COUNTS) if token_metrics or name not in TOKEN_METRICS]

    def add(self, sums: dict[str, torch.Tensor]) -> None:
        for name, value in sums.items():
            self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()

    def reduce(self) -> dict[str, float]:
        """Global means over all ranks since the last reduce (collective: every rank calls it)."""
        names = self._names
        local = torch.stack([self._sums[name].double() for name in names])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
        totals = dict(zip(names, local.tolist()))
        self._sums = {}
        means = {name: totals[name] / max(totals[count], 1.0) for name, count in _MEAN_OVER.items() if name in totals}
        if not totals["sft_examples"]:
            del means["sft_nll_loss"]  # no SFT data in this window: nothing to report
        if not totals["routed_batches"]:
            del means["aux_loss"]  # not a MoE policy trained with its load-balancing loss
        means["num_pairs"] = totals["pairs"]
        means["num_tokens"] = totals["tokens"]
        means["num_processed_tokens"] = totals["processed_tokens"]
        return means


class NullLogger:
    """What ranks other than 0 get: the loop calls `log` everywhere and never branches on rank."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def progress(self, total: int, initial: int = 0, desc: str = "train", unit: str = "step"):
        return _NullProgress()

    def info(self, message: str) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def write_results(self, name: str, results: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _NullProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def tensorboard_tag(name: str) -> str:
    """A metric's TensorBoard tag as transformers' TensorBoard callback writes TRL's (`rewrite_logs`): eval_x ->
    eval/x, everything else train/x, so the two tools' runs overlay. metrics.jsonl keeps the names themselves."""
    return f"eval/{name[len('eval_'):]}" if name.startswith("eval_") else f"train/{name}"


class RankZeroLogger(NullLogger):
    """metrics.jsonl (appended), TensorBoard events and a tqdm bar, written by rank 0."""

    def __init__(self, output_dir: str | os.PathLike, use_tensorboard: bool = True):
        self.output_dir = Path(output_dir)
        self.use_tensorboard = use_tensorboard
        self._jsonl = None
        self._tensorboard = None
        self._purge_step = None

    def _open(self) -> None:
        """Files are opened at the first metric, so a run that logs none (precompute) leaves none behind."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.output_dir / "metrics.jsonl").open("a", encoding="utf-8")
        if self.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self._purge_step)

    def truncate_after(self, step: int) -> None:
        """On resume: keep the records up to the checkpoint's step, so steps after it are logged once."""
        path = self.output_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            write_atomic(path, "".join(line + "\n" for line in kept).encode())
        self._purge_step = step + 1  # TensorBoard drops events past the checkpoint too

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._jsonl is None:
            self._open()
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(tensorboard_tag(name), value, step)
            self._tensorboard.flush()

    def write_results(self, name: str, results: dict) -> None:
        """`output_dir/<name>` (a summary: train_results.json, eval_results.json), whole or not at all."""
        write_atomic(self.output_dir / name, json.dumps(results, indent=2).encode())

    def progress(self, total: int, initial: int = 0, desc: str = "train", unit: str = "step"):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

    def info(self, message: str) -> None:
        print(message, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def make_logger(rank: int, output_dir: str | os.PathLike) -> NullLogger:
    return RankZeroLogger(output_dir) if rank == 0 else NullLogger()
