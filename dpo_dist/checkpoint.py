"""Checkpoints to resume from, and exports of the trained policy in Hugging Face layout.

`Checkpointer` (below) saves and restores everything a run needs to continue exactly. `export_hf` gathers the parameters one at a time (under ZeRO-3 each is all-gathered, copied to CPU
on rank 0, and released), so no rank ever needs the whole model on its device. Rank 0 writes
safetensors + config + tokenizer to a temporary directory and renames it into place: a reader
never sees half an export.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from dpo_dist.cache import fsync_path
from dpo_dist.engine import DistInfo, barrier
from dpo_dist.errors import UserError

ENGINE_TAG = "engine"  # the DeepSpeed tag (sub-directory) of the engine state inside checkpoint-<step>/


def gathered_state_dict(model: nn.Module, dist_info: DistInfo) -> dict[str, torch.Tensor]:
    """Full CPU copies of `model`'s parameters and persistent buffers on rank 0 (empty elsewhere)."""
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if dist_info.is_main:
                state[name] = param.detach().to("cpu", copy=True)
    non_persistent = {
        f"{module_name}.{buffer}" if module_name else buffer
        for module_name, module in model.named_modules()
        for buffer in getattr(module, "_non_persistent_buffers_set", ())
    }
    for name, buffer in model.named_buffers():
        if dist_info.is_main and name not in non_persistent:
            state[name] = buffer.detach().to("cpu", copy=True)
    return state


def _write_merged(peft_model: nn.Module, state: dict[str, torch.Tensor], out_dir: Path, max_shard_size: str) -> None:
    """Rank 0: a CPU copy of the base model gets the trained adapter, merged into its weights.

    Under ZeRO-3 the live model is partitioned, so the merge runs on a fresh CPU copy loaded from
    the policy's starting checkpoint, with the gathered state (base + adapter) loaded into it.
    """
    from peft import get_peft_model

    from dpo_dist.models import causal_lm_from_pretrained  # models.py imports this module

    base_path = peft_model.peft_config["default"].base_model_name_or_path
    dtype = next(iter(state.values())).dtype
    base = causal_lm_from_pretrained(base_path, dtype=dtype)
    _untie_adapted_embeddings(peft_model, base)
    copy = get_peft_model(base, peft_model.peft_config["default"])
    missing, unexpected = copy.load_state_dict(state, strict=False)
    if unexpected or any("lora_" in key for key in missing):
        raise RuntimeError(f"merged export: state does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    copy.merge_and_unload().save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)


def _untie_adapted_embeddings(peft_model: nn.Module, base: nn.Module) -> None:
    """Give `base` (the merge's fresh copy) an lm_head of its own when it shares its weight with the input
    embeddings and the trained adapter adapts either of them (`lora.target_modules` with lm_head, as on Qwen3 up to
    4B, whose embeddings are tied). Training added the adapter to that one module only; merged into the shared
    weight it would move the other as well, and the merged model would not compute what was trained. Untied, the
    merged model holds the vocabulary matrix twice (V x H more parameters) and says so in its config."""
    trained = peft_model.get_base_model()
    ends = (trained.get_input_embeddings(), trained.get_output_embeddings())
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    if head is None or head.weight is not embeddings.weight or not any(hasattr(end, "base_layer") for end in ends):
        return
    head.weight = nn.Parameter(head.weight.detach().clone())
    base.config.tie_word_embeddings = False
    base.config.get_text_config().tie_word_embeddings = False  # the same object for Qwen; a composite's text part


def export_hf(causal_lm: nn.Module, tokenizer, out_dir: str | os.PathLike, dist_info: DistInfo,
              merge: bool = False, max_shard_size: str = "5GB") -> Path:
    """Write `causal_lm` to `out_dir`, loadable by `from_pretrained`. Collective: every rank calls it.

    A plain model is written as full safetensors weights with its config (sharded with an index
    past `max_shard_size`); a PEFT model as its adapter (`peft.PeftModel.from_pretrained` loads it)
    and, with `merge`, also as a full model with the adapter merged, in `out_dir/merged/`. The
    tokenizer goes beside each.
    """
    out_dir = Path(out_dir)
    state = gathered_state_dict(causal_lm, dist_info)
    if dist_info.is_main:
        tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp_dir, ignore_errors=True)
        is_peft = hasattr(causal_lm, "peft_config")
        if is_peft:
            from dpo_dist.models import hub_offline_while_unreachable  # models.py imports this module

            with hub_offline_while_unreachable(causal_lm.peft_config["default"].base_model_name_or_path or ""):
                causal_lm.save_pretrained(tmp_dir, state_dict=state)
            if merge:
                _write_merged(causal_lm, state, tmp_dir / "merged", max_shard_size)
                tokenizer.save_pretrained(tmp_dir / "merged")
        else:
            causal_lm.save_pretrained(tmp_dir, state_dict=state, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp_dir)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp_dir, out_dir)
    barrier()
    return out_dir


def consolidated_checkpoint_state(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The policy's full fp32 weights from a DeepSpeed checkpoint of any ZeRO stage, on CPU, in one
    process: DeepSpeed's own consolidation of the partitions, keys as in the causal LM."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=ENGINE_TAG)
    prefix = "causal_lm."  # the engine's root module is SequenceLogps(causal_lm)
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


# ---------------------------------------------------------------- training checkpoints

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
SYNCED_REFERENCE = "reference"  # a TR-DPO run's moved reference (reference.sync_steps), in HF layout
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "stopped on a signal after a checkpoint; run me again to resume"


@dataclass
class TrainerState:
    """Where the run is: enough to continue it exactly (with the engine state and the RNG states)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next step belongs to
    epoch_step: int = 0  # optimizer steps already done in that epoch
    consumed_pairs: int = 0
    consumed_tokens: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    world_size: int = 1
    global_batch: int = 0
    zero3_sub_group_size: int | None = None  # ZeRO-3's optimizer sub-groups, which shape its saved optimizer state
    total_steps: int = 0  # the optimizer steps the run plans: its learning-rate schedule's length (0: not recorded)

    def advance(self, steps_per_epoch: int) -> None:
        """Count one optimizer step of `global_batch` pairs; the epoch ends after `steps_per_epoch` of them."""
        self.step, self.epoch_step, self.consumed_pairs = self.step + 1, self.epoch_step + 1, self.consumed_pairs + self.global_batch
        if self.epoch_step == steps_per_epoch:
            self.epoch, self.epoch_step = self.epoch + 1, 0


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint, oldest first. Unfinished ones end in `.tmp`."""
    found = []
    for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        if suffix.isdigit() and (path / TRAINER_STATE).is_file():
            found.append((int(suffix), path))
    return sorted(found)


class Checkpointer:
    """Saves every `save_steps` and at the end, atomically; finds and loads the checkpoint to resume from.

    A checkpoint is written to `checkpoint-<step>.tmp/` by every rank (DeepSpeed engine state with
    ZeRO partitions, each rank's RNG states), then rank 0 adds the trainer state and the config and
    renames the directory to `checkpoint-<step>/` after a barrier: resume only ever sees checkpoints
    every rank finished. Old ones beyond `save_total_limit` are deleted (the best by eval loss kept
    when asked).
    """

    def __init__(self, training, dist_info: DistInfo):
        self.training = training
        self.dist = dist_info
        self.output_dir = Path(training.output_dir)
        self._replaced: list[Path] | None = None  # the checkpoints of an old run overwrite_output_dir replaces

    def should_save(self, step: int, last: bool) -> bool:
        return last or (self.training.save_steps > 0 and step % self.training.save_steps == 0)

    def save(self, step: int, engine, state: TrainerState, config_text: str,
             write_more: Callable[[Path], None] | None = None) -> Path:
        """Collective: every rank calls it with the same step; `write_more(directory)` (collective too) adds
        what else the run needs to resume (a TR-DPO reference), inside the directory before it is renamed."""
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.output_dir / f"{CHECKPOINT_PREFIX}{step}.tmp"
        if self.dist.is_main:
            for stale in self.output_dir.glob(f"{CHECKPOINT_PREFIX}*.tmp"):  # left by runs killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        engine.save_state(tmp, ENGINE_TAG)
        torch.save(rng_state(), tmp / f"rng_state_rank{self.dist.rank}.pt")
        if write_more is not None:
            write_more(tmp)
        barrier()
        if self.dist.is_main:
            (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=1))
            (tmp / "config.yaml").write_text(config_text)
            fsync_path(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_path(self.output_dir)
            self._prune(state)
        barrier()
        return final

    def _prune(self, state: TrainerState) -> None:
        limit = self.training.save_total_limit
        if limit is None:
            return
        checkpoints = complete_checkpoints(self.output_dir)
        keep = {step for step, _ in checkpoints[-limit:]}
        if self.training.keep_best_checkpoint and state.best_step is not None:
            keep.add(state.best_step)
        for step, path in checkpoints:
            if step not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def resume_path(self) -> Path | None:
        """The checkpoint this run continues from, None for a fresh start; refuses to mix two runs. An old run
        that training.overwrite_output_dir replaces is only listed here (`clear_replaced_run` deletes it)."""
        resume_from = self.training.resume_from
        existing = complete_checkpoints(self.output_dir)
        if resume_from is None:
            if not existing and not (self.output_dir / "metrics.jsonl").exists():
                return None
            if not self.training.overwrite_output_dir:
                names = ", ".join(path.name for _, path in existing[-3:]) or "metrics.jsonl"
                raise UserError(
                    f"{self.output_dir} holds another run ({names}). Continue it with training.resume_from=auto, "
                    "start over with training.overwrite_output_dir=true (deletes its checkpoints and metrics), "
                    "or choose another training.output_dir"
                )
            self._replaced = [path for _, path in existing]
            return None
        if resume_from == "auto":
            return existing[-1][1] if existing else None
        path = Path(resume_from)
        if not path.exists():
            found = ", ".join(checkpoint.name for _, checkpoint in existing[-3:]) or "none"
            raise UserError(f"training.resume_from: {path} does not exist (checkpoints in {self.output_dir}: {found}; "
                            "training.resume_from=auto takes the newest)")
        if not (path / TRAINER_STATE).is_file():
            raise UserError(f"training.resume_from: {path} is not a finished checkpoint (no {TRAINER_STATE})")
        return path

    def clear_replaced_run(self) -> None:
        """Delete the old run that training.overwrite_output_dir replaces (its checkpoints, metrics, TensorBoard
        events and final/), if `resume_path` found one. Called once the new run has loaded its data and models, so
        that a config failing on the way leaves the old run as it was. Collective."""
        if self._replaced is None:
            return
        barrier()  # every rank has finished setting up before rank 0 clears the directory
        if self.dist.is_main:
            for path in self._replaced:
                shutil.rmtree(path)
            for name in ("metrics.jsonl", "train_results.json", "tensorboard", "final"):
                target = self.output_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        barrier()
        self._replaced = None

    def load(self, path: Path, engine, fresh: TrainerState) -> tuple[TrainerState, dict]:
        """Engine state into `engine`; returns the trainer state and this rank's RNG states (set them last).
        `fresh` is this run's own start state: what it must share with the checkpoint to continue it."""
        state = TrainerState(**json.loads((path / TRAINER_STATE).read_text()))
        if state.world_size != self.dist.world_size:
            raise UserError(
                f"{path} was saved by {state.world_size} processes and this run has {self.dist.world_size}. Resume "
                f"on {state.world_size} processes, or export its weights (python launch/export.py --checkpoint {path} "
                "--merge) and start a new run from them: model.sft_model=<the export>, or its merged/ for LoRA (the "
                "optimizer state and the data position do not carry over)"
            )
        if state.global_batch != fresh.global_batch:
            raise UserError(
                f"{path} was trained with global batch {state.global_batch}, this run's is {fresh.global_batch}; "
                "keep batch_size x processes x gradient_accumulation_steps the same to resume exactly"
            )
        # DeepSpeed saves ZeRO-3's optimizer state per sub-group and fails to load it into other sub-groups with
        # "loaded state dict contains a parameter group that doesn't match" (checkpoints from before the field: no check)
        if state.zero3_sub_group_size not in (None, fresh.zero3_sub_group_size):
            raise UserError(
                f"{path} was saved with ZeRO-3 optimizer sub-groups of {state.zero3_sub_group_size} elements and this "
                f"run's are {fresh.zero3_sub_group_size}; DeepSpeed cannot load an optimizer state split otherwise. "
                f"Set \"sub_group_size\": {state.zero3_sub_group_size} under zero_optimization in the DeepSpeed config "
                "to resume it"
            )
        state.zero3_sub_group_size = fresh.zero3_sub_group_size
        # The schedule decays over the planned steps and the optimizer comes back with its last learning rate, so
        # another plan would train a step at the old schedule's rate and then jump (a finished run: at 0). A
        # constant rate without warmup has no length
        scheduled = self.training.lr_scheduler != "constant" or self.training.warmup_ratio > 0
        if scheduled and state.total_steps not in (0, fresh.total_steps):
            raise UserError(
                f"{path} belongs to a run of {state.total_steps} optimizer steps, whose learning-rate schedule "
                f"(training.lr_scheduler={self.training.lr_scheduler}, warmup_ratio={self.training.warmup_ratio}) "
                f"spans them; training.num_epochs / max_steps now give {fresh.total_steps}. Resume with the settings "
                f"it was saved with, or train further in a new run from its weights (python launch/export.py "
                f"--checkpoint {path}, then model.sft_model=<the export>)"
            )
        state.total_steps = fresh.total_steps
        engine.load_state(path, ENGINE_TAG)
        rng = torch.load(path / f"rng_state_rank{self.dist.rank}.pt", weights_only=False)
        return state, rng
