"""The typed run config: YAML plus `section.key=value` overrides -> frozen, validated dataclasses.

One dataclass per section; each field carries its help text in `metadata["help"]` (what
`launch/train.py --help` prints) and, where the value is one of a fixed set, `metadata["choices"]`.
Loading is strict: an unknown key, a wrong type or a value outside its choices raises `UserError`
naming the full key path (`training.learning_rate`) and what is accepted. Nothing outside this
module reads a key with a default; every default lives here.

The standard seed config (sections model/dpo/lora/training) loads unchanged. Note that PyYAML
reads `1e-6` (no dot) as a string; float fields accept such strings on purpose.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpo_dist.errors import UserError


def _opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A dataclass field with help text (and allowed values) kept next to its default."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    base_model: str = _opt("", "HF model id or local directory of the base model (e.g. Qwen/Qwen3-4B).")
    sft_model: str | None = _opt(None, "Checkpoint the policy starts from (the SFT model); defaults to base_model.")
    ref_model: str | None = _opt(None, "Reference checkpoint; defaults to the policy's starting checkpoint.")
    dtype: str = _opt(
        "auto",
        "Parameter dtype. auto = bfloat16 on a GPU that supports it, else float32.",
        ("auto", "float32", "bfloat16", "float16"),
    )
    attn_implementation: str = _opt(
        "sdpa",
        "Attention kernel passed to transformers. With data.packing, flash_attention_2 and flex_attention keep "
        "attention inside each packed sequence without a dense mask (varlen / block-sparse); flex_attention "
        "trains on CUDA only (torch has no CPU backward for it).",
        ("eager", "sdpa", "flash_attention_2", "flex_attention"),
    )
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward to save memory.")
    checkpointed_layers: int | None = _opt(
        None,
        "With model.gradient_checkpointing: how many decoder layers recompute in backward, the first ones (null: all). "
        "Fewer: less recompute (about 1/4 of a layer's training FLOPs each), more activation memory; "
        "launch/plan.py names the fewest that fit.",
    )
    compile: bool = _opt(
        False,
        "torch.compile each decoder layer of the policy and the reference model (fused norms, activations and "
        "rotary embeddings, rounding bf16 where eager does, reductions tuned by rule rather than timing so the "
        "policy's and the reference's graphs agree), and the log-prob head's vocabulary-wide math (three fused "
        "kernels per chunk, logits kept in the model's dtype); the first steps pay the compile time. Under ZeRO-3 "
        "only where layers are gathered whole (deepspeed.zero3_whole_layers).",
    )
    lean_activations: bool = _opt(
        False,
        "RMSNorm and the MLP's SiLU gate keep less for backward (the norms' input in its own dtype instead of an "
        "fp32 copy; SiLU recomputed): the same forward bit for bit, about a quarter less activation memory per "
        "layer in bf16 without gradient checkpointing.",
    )
    liger_kernels: bool = _opt(
        False,
        "Liger-Kernel's Triton RMSNorm, SiLU gate and rotary embedding in the decoder (CUDA; pip install liger-kernel). "
        "Fewer, fused kernels for the memory-bound ops between the matmuls, and the activation savings of "
        "model.lean_activations (it replaces them). Not with model.compile, which fuses the same ops itself.",
    )
    recompute_elementwise: bool = _opt(
        False,
        "Keep neither the norms' outputs nor the MLP's SiLU(gate) x up for backward: rebuild them there from "
        "tensors kept anyway (implies model.lean_activations unless model.liger_kernels): about another quarter "
        "less activation memory per layer, for a few elementwise passes in backward. No effect in checkpointed "
        "layers; not with model.compile, whose compiler chooses what to recompute itself.",
    )
    logps_chunk_tokens: int | None = _opt(
        None,
        "Completion tokens per chunk when computing log-probs; bounds the [chunk, vocab] logits in memory. "
        "Default: as many as fit 256 MiB of the chunk's vocabulary-wide buffers: 220 tokens for Qwen's 151,936 "
        "vocabulary (fp32 logits and a temporary), 883 with model.compile in bf16 (the logits alone, in bf16).",
    )

    def __post_init__(self) -> None:
        if self.logps_chunk_tokens is not None and self.logps_chunk_tokens < 1:
            raise UserError("model.logps_chunk_tokens must be >= 1")
        if self.checkpointed_layers is not None:
            if self.checkpointed_layers < 1:
                raise UserError(f"model.checkpointed_layers must be >= 1 (or null: all layers), got {self.checkpointed_layers}")
            if not self.gradient_checkpointing:
                raise UserError(
                    f"model.checkpointed_layers={self.checkpointed_layers} without model.gradient_checkpointing=true: "
                    "set gradient_checkpointing too, or drop checkpointed_layers"
                )
        if self.recompute_elementwise and self.compile:
            raise UserError(
                "model.recompute_elementwise=true with model.compile=true: the compiled layers already choose what to "
                "keep and what to recompute. Choose one"
            )
        if self.liger_kernels and self.compile:
            raise UserError(
                "model.liger_kernels=true with model.compile=true: the compiled layers fuse the norms, SiLU gate and "
                "rotary embedding themselves, and Liger's hand-written kernels would split them apart. Choose one"
            )

    @property
    def policy_path(self) -> str:
        """The checkpoint the policy is initialised from."""
        return self.sft_model or self.base_model

    @property
    def reference_path(self) -> str:
        """The frozen reference checkpoint: by default the policy's own starting point."""
        return self.ref_model or self.policy_path


LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
              "apo_down", "discopop", "sigmoid_norm", "aot", "aot_unpaired", "sft", "simpo", "orpo")  # dpo_dist.losses.LOSSES, checked by a test
REFERENCE_FREE_LOSSES = ("simpo", "orpo")
LABEL_SMOOTHING_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")  # the losses that read dpo.label_smoothing
# Losses that sort a micro-batch's pairs (AOT): WPO's per-pair weights no longer belong to their pairs there.
SORTING_LOSSES = ("aot", "aot_unpaired")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")  # losses.divergence_scores
# Losses whose margin is a difference of chosen and rejected scores, where f-DPO's partition term cancels;
# TRL 1.16 refuses another divergence for the rest, and so do we.
F_DIVERGENCE_LOSSES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "discopop", "sigmoid_norm", "sft")


@dataclass(frozen=True, kw_only=True)
class DPOConfig:
    beta: float = _opt(0.1, "Strength of the KL penalty toward the reference (DPO's beta; IPO's tau; ORPO's lambda).")
    loss_type: list[str] = _opt(
        ["sigmoid"],
        "Preference loss, or a list of them summed per pair with dpo.loss_weights (as TRL's; e.g. MPO: "
        "[sigmoid, bco_pair, sft]); simpo and orpo are reference-free (no reference is loaded) and used alone.",
        LOSS_TYPES,
    )
    loss_weights: list[float] | None = _opt(None, "Weight of each dpo.loss_type entry (null: 1.0 each).")
    label_smoothing: float = _opt(
        0.0, "loss_type robust: the assumed label-flip rate; exo_pair: EXO's epsilon (> 0; the paper uses 1e-3); aot, "
        "aot_unpaired: the weight of the flipped label in their logistic loss (as TRL's). In [0, 0.5)."
    )
    discopop_tau: float = _opt(0.05, "DiscoPOP's temperature tau (the paper's and TRL's default 0.05).")
    f_divergence_type: str = _opt(
        "reverse_kl",
        "f-DPO: the divergence to the reference whose f'(pi/pi_ref) replaces the log-ratio in the margin (TRL's "
        "f_divergence_type); reverse_kl is DPO. Only with " + ", ".join(F_DIVERGENCE_LOSSES) + ".",
        F_DIVERGENCES,
    )
    f_alpha_divergence_coef: float = _opt(0.5, "f-DPO's alpha for f_divergence_type=alpha_divergence (TRL's f_alpha_divergence_coef).")
    use_weighting: bool = _opt(
        False,
        "WPO (TRL's use_weighting): each pair's loss times the policy's probabilities of its two completions, each "
        "the exp of the mean over its tokens of log p(token) - log sum_v p_v^2 (detached), to weigh off-policy "
        "pairs down. Costs one more logsumexp over the vocabulary per completion token.",
    )
    ld_alpha: float | None = _opt(
        None,
        "LD-DPO (TRL's ld_alpha): in each pair, completion tokens past the shorter answer's length weigh ld_alpha in "
        "the policy's and the reference's log-prob sums (1: plain DPO; 0: only the common length counts); null: off. "
        "In [0, 1].",
    )
    simpo_gamma: float = _opt(0.5, "SimPO's target reward margin gamma.")
    sft_weight: float = _opt(
        0.0, "Weight of the per-token NLL of the chosen completion, each pair's own, added to the loss (RPO; earlier TRL's "
        "rpo_alpha). sft in dpo.loss_type is TRL 1.16's: the NLL over all chosen tokens of the micro-batch."
    )
    router_aux_loss_coef: float | None = _opt(
        None, "Mixture-of-experts policies: weight of the routers' load-balancing loss added to the loss (TRL's "
        "aux_loss); null: as TRL, the model's router_aux_loss_coef where its config.json sets output_router_logits, else off.")

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise UserError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not self.loss_type:
            raise UserError("dpo.loss_type is an empty list: name at least one loss (sigmoid is DPO's)")
        alone = [name for name in self.loss_type if name in REFERENCE_FREE_LOSSES]
        if alone and len(self.loss_type) > 1:
            raise UserError(f"dpo.loss_type: {alone[0]} is reference-free and is used alone, not in a list with "
                            f"{', '.join(name for name in self.loss_type if name != alone[0]) or alone[0]}")
        if self.loss_weights is not None and any(weight <= 0 for weight in self.loss_weights):
            raise UserError(f"dpo.loss_weights must all be > 0 (a negative weight maximises that loss), got {self.loss_weights}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise UserError(f"dpo.loss_weights has {len(self.loss_weights)} entries for the {len(self.loss_type)} of "
                            f"dpo.loss_type ({', '.join(self.loss_type)}): give one weight per loss, or none (1.0 each)")
        if "exo_pair" in self.loss_type and self.label_smoothing == 0:
            raise UserError("dpo.loss_type exo_pair needs dpo.label_smoothing > 0: EXO's epsilon, the weight of the "
                            "flipped label (log 0 is infinite); the paper uses 1e-3")
        if self.discopop_tau <= 0:
            raise UserError(f"dpo.discopop_tau must be > 0, got {self.discopop_tau}")
        other = [name for name in self.loss_type if name not in F_DIVERGENCE_LOSSES]
        if self.f_divergence_type != "reverse_kl" and other:
            raise UserError(f"dpo.f_divergence_type={self.f_divergence_type} with dpo.loss_type {', '.join(other)}: f-DPO "
                            "holds only where the loss compares chosen and rejected scores (" + ", ".join(F_DIVERGENCE_LOSSES)
                            + "); use reverse_kl with the others")
        sorted_losses = [name for name in self.loss_type if name in SORTING_LOSSES]
        if self.use_weighting and sorted_losses:
            raise UserError(f"dpo.use_weighting (WPO) with dpo.loss_type {', '.join(sorted_losses)}: these losses sort a "
                            "micro-batch's pairs, so a per-pair weight no longer belongs to the pair it was computed "
                            "for; turn one of them off")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise UserError(f"dpo.ld_alpha must be in [0, 1] (1: plain DPO; 0: only the common length counts), got {self.ld_alpha}")
        if self.sft_weight < 0:
            raise UserError(f"dpo.sft_weight must be >= 0, got {self.sft_weight}")
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise UserError(f"dpo.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")

    @property
    def reference_free(self) -> bool:
        """No reference log-probs needed (simpo, orpo: used alone)."""
        return self.loss_type[0] in REFERENCE_FREE_LOSSES

    @property
    def weighted_losses(self) -> list[tuple[str, float]]:
        """(loss name, weight) for each dpo.loss_type entry."""
        return list(zip(self.loss_type, self.loss_weights or [1.0] * len(self.loss_type)))


def check_label_smoothing(dpo: DPOConfig) -> None:
    """dpo.label_smoothing with no loss that reads it would change nothing, silently. OpenRLHF's and older TRL's
    sigmoid loss smoothed the label (conservative DPO); TRL 1.16's, like dpo-dist's, does not. Checked by the
    training scripts before any work, not when a config loads: export and evaluation still read a saved config
    that has it (the numbers are the same with or without it)."""
    if dpo.label_smoothing and not any(name in LABEL_SMOOTHING_LOSSES for name in dpo.loss_type):
        raise UserError(
            f"dpo.label_smoothing={dpo.label_smoothing} changes nothing with dpo.loss_type {', '.join(dpo.loss_type)}: "
            f"only {', '.join(LABEL_SMOOTHING_LOSSES)} read it (TRL 1.16's sigmoid ignores it too; OpenRLHF's "
            "label_smoothing, conservative DPO, has no loss here). Remove it, or use dpo.loss_type: robust (DPO "
            "unbiased for that rate of flipped labels)"
        )


ALL_LINEAR = "all-linear"  # PEFT's wildcard for target_modules
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # a Qwen decoder layer's


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    r: int = _opt(16, "LoRA rank.")
    alpha: int = _opt(32, "LoRA alpha (scaling = alpha / r).")
    dropout: float = _opt(0.0, "Dropout on the LoRA branch (TRL's default disable_dropout zeroes PEFT's lora_dropout; "
                               "0 matches a TRL run).")
    target_modules: list[str] = _opt(
        list(PROJECTIONS),
        f"Module names that get an adapter, or {ALL_LINEAR} alone (PEFT's: every linear layer but the output layer; "
        "on Qwen3 and Qwen2.5 the seven projections, on Qwen3-MoE also the experts and the routers).",
    )

    fused: bool = _opt(
        False,
        "Compute each adapted projection as one autograd function (base GEMM, then the adapter added inside a "
        "second GEMM) instead of PEFT's three module calls and two elementwise passes. Needs lora.dropout=0, and "
        "under ZeRO-3 deepspeed.zero3_whole_layers (the default).",
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise UserError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise UserError(f"lora.alpha must be > 0 (the adapter's scale is alpha / r), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.fused and self.dropout > 0:
            raise UserError(f"lora.fused=true with lora.dropout={self.dropout}: the fused projection has no dropout. "
                            "Set lora.dropout=0 or lora.fused=false")
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise UserError(f"lora.target_modules: {ALL_LINEAR} stands alone (it already names every linear layer but "
                            f"the output layer), got {self.target_modules}")

    @property
    def all_linear(self) -> bool:
        return self.target_modules == [ALL_LINEAR]

    @property
    def peft_target_modules(self) -> str | list[str]:
        """What PEFT's LoraConfig takes: its wildcard as the string it recognises, else the names."""
        return ALL_LINEAR if self.all_linear else list(self.target_modules)

    @property
    def adapted_projections(self) -> set[str]:
        """The decoder layers' projections that get an adapter (for the memory planner)."""
        return set(PROJECTIONS) if self.all_linear else set(self.target_modules)


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    num_epochs: int = _opt(1, "Passes over the training data.")
    batch_size: int = _opt(1, "Preference pairs per micro-batch per process.")
    eval_batch_size: int | None = _opt(None, "Pairs per eval micro-batch per process; defaults to batch_size.")
    gradient_accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.")
    learning_rate: float = _opt(1e-6, "Peak learning rate (AdamW).")
    weight_decay: float = _opt(0.0, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 disables).")
    warmup_ratio: float = _opt(0.0, "Fraction of optimizer steps with linear warmup.")
    lr_scheduler: str = _opt("linear", "Decay after warmup.", ("linear", "cosine", "constant"))
    min_lr_ratio: float = _opt(0.0, "Where the linear and cosine decays end, as a fraction of learning_rate (OpenRLHF's "
                                    "min_lr_ratio, whose default is 0.1; transformers' cosine_with_min_lr). In [0, 1).")
    max_seq_length: int = _opt(1024, "Tokens per prompt+completion sequence; longer ones are truncated.")
    max_steps: int = _opt(-1, "Stop after this many optimizer steps (-1: run num_epochs).")
    output_dir: str = _opt("output", "Where metrics, the resolved config and the final export go.")
    seed: int = _opt(42, "Seed for model init, dropout and data order.")
    logging_steps: int = _opt(10, "Log train metrics every N optimizer steps.")
    eval_steps: int = _opt(0, "Evaluate every N optimizer steps (0: only before and after training).")
    peak_tflops: float | None = _opt(None, "Peak TFLOP/s of one device for the mfu metric (default: known GPUs by name).")
    token_metrics: bool = _opt(
        True, "Log TRL's per-token metrics (logits/chosen, logits/rejected, entropy, mean_token_accuracy), train and eval; "
        "false leaves them out and spares each lm_head chunk the passes over the vocabulary that only they need.")
    save_steps: int = _opt(500, "Write output_dir/checkpoint-<step>/ every N optimizer steps (and at the end; 0: only at the end).")
    save_total_limit: int | None = _opt(3, "Keep the newest N checkpoints (null: keep all).")
    keep_best_checkpoint: bool = _opt(False, "Also keep the checkpoint with the lowest eval loss, beyond save_total_limit.")
    resume_from: str | None = _opt(None, "Resume from a checkpoint: auto (the newest complete one in output_dir) or a path.")
    overwrite_output_dir: bool = _opt(
        False, "Start fresh in an output_dir that holds another run's checkpoints (deletes them once this run has loaded "
        "its data and models).")
    memory_check: bool = _opt(True, "On a GPU, refuse before loading weights a run the memory planner (launch/plan.py) says cannot fit.")

    def __post_init__(self) -> None:
        positive = ("num_epochs", "batch_size", "gradient_accumulation_steps", "max_seq_length", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_seq_length < 2:  # a scored token is predicted from the one before it, in the same sequence
            raise UserError("training.max_seq_length must be >= 2: a sequence of one token has no token to score")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise UserError(f"training.eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"training.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio < 1.0:
            raise UserError(f"training.min_lr_ratio must be in [0, 1) (a fraction of learning_rate), got {self.min_lr_ratio}")
        if self.min_lr_ratio and self.lr_scheduler == "constant":
            raise UserError(f"training.min_lr_ratio={self.min_lr_ratio} is where a decay ends, and "
                            "training.lr_scheduler=constant has none: remove it, or use linear or cosine")
        if self.learning_rate <= 0:
            raise UserError(f"training.learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise UserError(f"training.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"training.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_epsilon <= 0:
            raise UserError(f"training.adam_epsilon must be > 0, got {self.adam_epsilon}")
        if self.max_grad_norm < 0:
            raise UserError(f"training.max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        if self.max_steps != -1 and self.max_steps < 1:
            raise UserError(f"training.max_steps must be >= 1, or -1 to run training.num_epochs, got {self.max_steps}")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"training.seed must be in [0, 2^32), got {self.seed}")
        if self.peak_tflops is not None and not (math.isfinite(self.peak_tflops) and self.peak_tflops > 0):
            raise UserError(f"training.peak_tflops must be a positive number of TFLOP/s (or null: known GPUs by name), "
                            f"got {self.peak_tflops}")
        if self.eval_steps < 0:
            raise UserError(f"training.eval_steps must be >= 0, got {self.eval_steps}")
        if self.save_steps < 0:
            raise UserError(f"training.save_steps must be >= 0, got {self.save_steps}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise UserError(f"training.save_total_limit must be >= 1 or null, got {self.save_total_limit}")

    @property
    def micro_eval_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train_files: list[str] = _opt([], "Training preference files (JSONL, JSON, Parquet, or a saved HF dataset dir).")
    eval_files: list[str] = _opt([], "Held-out preference files, same formats.")
    skip_invalid: bool = _opt(False, "Skip and count invalid records instead of failing on the first.")
    truncation_mode: str = _opt(
        "keep_start", "Which end of an over-long sequence survives (as TRL).", ("keep_start", "keep_end")
    )
    shuffle: bool = _opt(True, "Shuffle the training pairs every epoch (seeded).")
    packing: bool = _opt(False, "Pack each micro-batch's sequences into one row without padding (no FLOPs on padding).")
    prefix_sharing: bool = _opt(
        False,
        "Run each pair's prompt through the model once: chosen and rejected become one sequence that shares the "
        "prompt's tokens, so the projections and MLP run on prompt + both completions instead of twice the prompt. "
        "Same log-probs. Attention still sees each sequence alone: sdpa, eager and flash_attention_2 run it on the "
        "unshared sequences (gathered per layer); flex_attention runs it on the shared one with a block mask.",
    )
    group_by_length: bool = _opt(False, "Order each window of 50 global batches by length so micro-batches pad less.")
    chat_template_kwargs: dict[str, Any] = _opt(
        {}, "The chat template's arguments for every chat record without its own chat_template_kwargs (TRL's "
        "per-record column), e.g. {enable_thinking: false} to train Qwen3's non-thinking mode.")
    cache_tokenized: bool = _opt(
        True, "Keep each tokenized split in <training.output_dir>/tokenized/ (rank 0 writes it, ~4 bytes a token) so a "
        "restart with the same data, tokenizer and settings maps it instead of tokenizing again.")
    sft_files: list[str] = _opt([], "SFT data mixed into training against forgetting: {prompt, completion} or {messages} records.")
    sft_ratio: float = _opt(0.0, "SFT examples mixed in per preference pair (e.g. 0.25: one per four pairs).")
    sft_loss_weight: float = _opt(1.0, "Weight of the SFT examples' per-token NLL in the loss.")

    def __post_init__(self) -> None:
        if self.sft_ratio < 0 or (self.sft_ratio > 0) != bool(self.sft_files):
            raise UserError("data.sft_files and data.sft_ratio go together: give both (ratio > 0) or neither")
        if self.sft_loss_weight < 0:
            raise UserError(f"data.sft_loss_weight must be >= 0, got {self.sft_loss_weight}")


@dataclass(frozen=True, kw_only=True)
class DeepSpeedConfig:
    config: str = _opt("ds_configs/zero2.json", "DeepSpeed JSON; 'auto' fields are filled from this config.")
    timeout_minutes: float = _opt(30.0, "Collective timeout in minutes (fractions allowed): a hung rank ends the job after this long.")
    zero3_whole_layers: bool = _opt(
        True,
        "Under ZeRO-3, gather and release each decoder layer's parameters as one unit (DeepSpeed's z3 leaf "
        "modules) instead of in hooks on each of its 11 submodules with parameters: far fewer hook calls per step, at the cost "
        "of one whole layer gathered at a time.",
    )

    def __post_init__(self) -> None:
        if self.timeout_minutes <= 0:
            raise UserError(f"deepspeed.timeout_minutes must be > 0, got {self.timeout_minutes}")


@dataclass(frozen=True, kw_only=True)
class ReferenceConfig:
    mode: str = _opt(
        "auto",
        "Where reference log-probs come from: model (a separate frozen model), adapter (the LoRA policy with its "
        "adapter disabled), precomputed (the cache written by launch/precompute_ref.py), none (reference-free losses). "
        "auto = none for simpo/orpo, adapter with LoRA and no model.ref_model, else model.",
        ("auto", "model", "adapter", "precomputed", "none"),
    )
    offload: bool = _opt(False, "Keep the reference's parameters on CPU (ZeRO-3 param offload).")
    cache_dir: str | None = _opt(None, "Reference log-prob cache directory; defaults to <training.output_dir>/reference_cache.")
    rows_per_shard: int = _opt(2048, "Pairs per cache shard (the unit precompute resumes at).")
    sync_steps: int = _opt(
        0,
        "TR-DPO (TRL's sync_ref_model / ref_model_sync_steps): every this many optimizer steps the reference "
        "moves toward the policy, ref = mixup_alpha x policy + (1 - mixup_alpha) x ref. 0: never. Needs a separate "
        "reference model (reference.mode=model) and full-parameter training; checkpoints then keep the reference.",
    )
    mixup_alpha: float = _opt(0.6, "TR-DPO's alpha (TRL's ref_model_mixup_alpha): the policy's share in each sync, in (0, 1].")

    def __post_init__(self) -> None:
        if self.rows_per_shard < 1:
            raise UserError(f"reference.rows_per_shard must be >= 1, got {self.rows_per_shard}")
        if self.sync_steps < 0:
            raise UserError(f"reference.sync_steps must be >= 0 (0: never), got {self.sync_steps}")
        if not 0.0 < self.mixup_alpha <= 1.0:
            raise UserError(f"reference.mixup_alpha must be in (0, 1], got {self.mixup_alpha}")


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    merge: bool = _opt(False, "With LoRA: also write the adapter merged into the base weights (a full model).")
    max_shard_size: str = _opt("5GB", "Largest safetensors file of a full-model export (bigger models get an index).")

    def __post_init__(self) -> None:
        from transformers.utils.hub import convert_file_size_to_int  # what save_pretrained reads it with

        try:
            convert_file_size_to_int(self.max_shard_size)
        except ValueError:  # found at load time, not after training when the export needs it
            raise UserError(f"export.max_shard_size: {self.max_shard_size!r} is not a size; give e.g. 5GB, 500MB or 2GiB") from None


@dataclass(frozen=True, kw_only=True)
class RoundsConfig:
    train_files: list[str] = _opt([], "Iterative DPO (launch/multi_round.py): one training file per round, in order.")
    precompute_reference: bool = _opt(False, "Precompute each round's reference cache before training it.")


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoRAConfig | None = None
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    rounds: RoundsConfig | None = None

    def __post_init__(self) -> None:
        if not self.model.base_model and not self.model.sft_model:
            raise UserError("model.base_model is required (an HF model id or a local checkpoint directory)")
        mode, loss = self.reference.mode, ",".join(self.dpo.loss_type)
        if self.dpo.reference_free and mode not in ("auto", "none"):
            raise UserError(f"dpo.loss_type={loss} is reference-free; reference.mode={mode} does not apply (use auto or none)")
        if not self.dpo.reference_free and mode == "none":
            raise UserError(f"dpo.loss_type={loss} needs reference log-probs; reference.mode=none gives none")
        if mode == "adapter" and self.lora is None:
            raise UserError("reference.mode=adapter needs a lora: section (the reference is the policy without its adapter)")
        if self.reference.sync_steps and self.lora is not None:
            raise UserError("reference.sync_steps (TR-DPO) with a lora: section: the reference would have to follow the "
                            "base weights plus the adapter. Train full-parameter, or set reference.sync_steps=0")
        if self.reference.sync_steps and self.reference_mode != "model":
            raise UserError(f"reference.sync_steps (TR-DPO) needs a separate reference model that can move; "
                            f"reference.mode={self.reference_mode} has none. Use reference.mode=model, or reference.sync_steps=0")

    @property
    def reference_mode(self) -> str:
        """reference.mode with auto resolved: none for reference-free losses; adapter with LoRA and no
        explicit model.ref_model; else a separate model."""
        if self.reference.mode != "auto":
            return self.reference.mode
        if self.dpo.reference_free:
            return "none"
        return "adapter" if self.lora is not None and self.model.ref_model is None else "model"

    @property
    def reference_cache_dir(self) -> Path:
        return Path(self.reference.cache_dir or Path(self.training.output_dir) / "reference_cache")

    @property
    def tokenized_cache_dir(self) -> Path | None:
        """Where tokenized splits are kept (data.cache_tokenized), or None."""
        return Path(self.training.output_dir) / "tokenized" if self.data.cache_tokenized else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Section name -> its dataclass: what load_config accepts and `launch/train.py --help` lists (dpo_dist.cli).
SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "dpo": DPOConfig,
    "lora": LoRAConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "deepspeed": DeepSpeedConfig,
    "reference": ReferenceConfig,
    "export": ExportConfig,
    "rounds": RoundsConfig,
}


def _coerce(value: Any, annotation: Any, key: str, choices: tuple | None) -> Any:
    """Check (and gently convert) one value against its field annotation; `key` names it in errors."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, choices)
    if origin is dict:  # dict[str, Any]: names to YAML values, passed on as they are
        if not isinstance(value, dict) or not all(isinstance(name, str) for name in value):
            raise UserError(f"{key}: expected a mapping of names to values, e.g. {{enable_thinking: false}}, "
                            f"got {value!r}")
        return dict(value)
    if origin is list:
        if value is None:
            raise UserError(f"{key}: expected a list (or one value), got null: write [] for none")
        items = value if isinstance(value, list) else [value]  # a single path is a one-item list
        return [_coerce(item, args[0], f"{key}[{i}]", choices) for i, item in enumerate(items)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = value
        if isinstance(value, str):  # a quoted number, '42' (or '1e3')
            try:
                return int(value)
            except ValueError:
                pass
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, float) and number.is_integer():  # 3.0, as TRL's float num_train_epochs is written
            return int(number)
        raise UserError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads 1e-6 as a string (YAML 1.1 wants a dot)
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise UserError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # no setting means nan or inf; they would train to nan weights
            raise UserError(f"{key}: expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {value!r}")
        if choices and value not in choices:
            raise UserError(f"{key}: {value!r} is not one of {', '.join(choices)}")
        return value
    raise TypeError(f"unsupported annotation {annotation} for {key}")


# Names users bring from TRL's DPOConfig, transformers' TrainingArguments, PEFT's LoraConfig and OpenRLHF's train_dpo,
# and what they are here (a key or a section, or why there is none): an unknown-key error says so instead of guessing
# a look-alike. A "section.name" entry answers for that section only.
FOREIGN_NAMES = {
    "per_device_train_batch_size": "training.batch_size",
    "per_device_eval_batch_size": "training.eval_batch_size",
    "num_train_epochs": "training.num_epochs",
    "lr_scheduler_type": "training.lr_scheduler",
    "max_length": "training.max_seq_length",
    "max_prompt_length": "training.max_seq_length, which bounds prompt + completion together (as TRL 1.x's max_length)",
    "max_completion_length": "training.max_seq_length, which bounds prompt + completion together (as TRL 1.x's max_length)",
    "bf16": "model.dtype: bfloat16",
    "fp16": "model.dtype: float16",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "model_name_or_path": "model.base_model (with model.sft_model for the checkpoint training starts from)",
    "sync_ref_model": "reference.sync_steps (> 0 turns TR-DPO on)",
    "ref_model_sync_steps": "reference.sync_steps",
    "ref_model_mixup_alpha": "reference.mixup_alpha",
    "precompute_ref_log_probs": "reference.mode: precomputed (launch/precompute_ref.py first)",
    "rpo_alpha": "dpo.sft_weight",
    "padding_free": "data.packing",
    "use_liger_kernel": "model.liger_kernels",
    "torch_compile": "model.compile",
    "deepspeed": "deepspeed.config (the path of a DeepSpeed JSON config)",
    "report_to": "no setting: metrics go to <training.output_dir>/metrics.jsonl and its tensorboard/ directory",
    "disable_dropout": "no setting: Qwen's decoder has no dropout modules, and lora.dropout is applied as set "
                       "(TRL's default disable_dropout also zeroes PEFT's lora_dropout: lora.dropout 0 matches it)",
    "warmup_steps": "training.warmup_ratio (the fraction of the optimizer steps that warm up)",
    "eval_strategy": "training.eval_steps (every N optimizer steps; 0: before and after training only)",
    "save_strategy": "training.save_steps (every N optimizer steps; 0: at the end only)",
    "logging_strategy": "training.logging_steps",
    "load_best_model_at_end": "training.keep_best_checkpoint (the best checkpoint is kept; the export is the last step's)",
    "task_type": "no setting: the adapter is always for a causal LM (PEFT's CAUSAL_LM)",
    "bias": "no setting: biases stay frozen (PEFT's bias: none)",
    "modules_to_save": "no setting: only adapters train (lora.target_modules may name lm_head)",
    "precompute_ref_batch_size": "training.eval_batch_size (launch/precompute_ref.py scores in eval micro-batches)",
    "pad_to_multiple_of": "no setting: a padded micro-batch pads to its longest row (data.packing pads none)",
    "activation_offloading": "model.gradient_checkpointing (with model.checkpointed_layers) or "
                             "model.lean_activations: activations are recomputed or kept smaller, not offloaded",
    "dataset_num_proc": "no setting: the ranks tokenize a split together, each with all its CPU threads",
    "model_init_kwargs": "model.dtype and model.attn_implementation",
    "use_dora": "no setting: the adapter is plain LoRA",
    "use_rslora": "no setting: the adapter is plain LoRA, scaled by lora.alpha / lora.r",
    # OpenRLHF's train_dpo flags (flat, and the last part of its nested ones), as YAML keys
    "train": "training (OpenRLHF's train.batch_size is the global batch; training.batch_size is per process and "
             "micro-batch: the global batch is batch_size x processes x training.gradient_accumulation_steps)",
    "train_batch_size": "training.batch_size x processes x training.gradient_accumulation_steps, the global batch "
                        "(training.batch_size is pairs per process per micro-batch): set those two",
    "micro_train_batch_size": "training.batch_size (pairs per process per micro-batch)",
    "micro_batch_size": "training.batch_size (pairs per process per micro-batch)",
    "max_len": "training.max_seq_length",
    "max_epochs": "training.num_epochs",
    "max_norm": "training.max_grad_norm",
    "lr_warmup_ratio": "training.warmup_ratio",
    "l2": "training.weight_decay",
    "packing_samples": "data.packing",
    "nll_loss_coef": "dpo.sft_weight (the chosen completion's per-token NLL, as OpenRLHF's)",
    "aux_loss_coef": "dpo.router_aux_loss_coef",
    "ipo": "dpo.loss_type: ipo (as TRL's, on per-token mean log-ratios: OpenRLHF's sums them, so the same beta "
           "regularises differently)",
    "pretrain": "model.base_model (with model.sft_model for the checkpoint training starts from)",
    "ref_pretrain": "model.ref_model",
    "reference.model_name_or_path": "model.ref_model",
    "reference.pretrain": "model.ref_model",
    "flash_attn": "model.attn_implementation: flash_attention_2",
    "ref_offload": "reference.offload",
    "adam_offload": "deepspeed.config with offload_optimizer in its zero_optimization (ds_configs/zero3_offload.json)",
    "zero_stage": "deepspeed.config: a DeepSpeed JSON with that zero_optimization.stage (ds_configs/zero2.json, "
                  "zero3.json, zero3_offload.json)",
    "ds": "deepspeed (its config key names a DeepSpeed JSON)",
    "lora_rank": "lora.r",
    "save_path": "training.output_dir (the exported model goes to its final/)",
    "ckpt_path": "training.output_dir (checkpoints go to its checkpoint-<step>/)",
    "load_checkpoint": "training.resume_from (auto: the newest checkpoint in training.output_dir)",
    "max_ckpt_num": "training.save_total_limit",
    "use_wandb": "no setting: metrics go to <training.output_dir>/metrics.jsonl and its tensorboard/ directory",
    "use_tensorboard": "no setting: TensorBoard files are always written to <training.output_dir>/tensorboard",
    "prompt_key": "no setting: records hold prompt, chosen and rejected (or chosen and rejected conversations); "
                  "rename other columns first, e.g. with datasets' rename_column and save_to_disk",
    "chosen_key": "no setting: records hold prompt, chosen and rejected; rename other columns first",
    "rejected_key": "no setting: records hold prompt, chosen and rejected; rename other columns first",
    "input_template": "no setting: chat-message records go through the tokenizer's chat template; plain strings "
                      "are joined as they are",
    "apply_chat_template": "no setting: chat-message records always go through the tokenizer's chat template",
    "max_samples": "no setting: give the files the pairs to train on (training.max_steps bounds the steps)",
    "adam_betas": "training.adam_beta1 and training.adam_beta2 (OpenRLHF's default is 0.9, 0.95)",
    "dataset": "data.train_files (JSONL, JSON or parquet files, or datasets saved with save_to_disk)",
    "eval_dataset": "data.eval_files",
}


def key_homes(name: str) -> list[str]:
    """The section.key spellings of a key name, in the sections that have it."""
    return [f"{section}.{name}" for section, cls in SECTIONS.items() if name in {f.name for f in dataclasses.fields(cls)}]


def foreign_answer(name: str) -> str | None:
    """What another tool's name is here, as a phrase ("here it is dpo.sft_weight", "no setting: ..."), or None."""
    answer = FOREIGN_NAMES.get(name)
    if answer is None:
        return None
    return answer if answer.startswith("no setting") else f"here it is {answer}"


def _unknown_key_error(key: str, known: list[str], where: str) -> UserError:
    name = key.rsplit(".", 1)[-1]
    for foreign in (key, name):  # a name a section's own entry answers (reference.pretrain) before the bare name
        if foreign in FOREIGN_NAMES:
            return UserError(f"unknown key '{key}' in {where}: '{foreign}' is a TRL, transformers, PEFT or OpenRLHF "
                             f"name; {foreign_answer(foreign)}")
    homes = [home for home in key_homes(name) if home != key]
    if homes:
        return UserError(f"unknown key '{key}' in {where}: it is {' or '.join(homes)}; put it in that section")
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown key '{key}' in {where}.{hint} Accepted: {', '.join(sorted(known))}")


def _build_section(cls: type, raw: Any, section: str, where: str, overridden: set[str]) -> Any:
    if section == "deepspeed" and isinstance(raw, str):  # TRL's TrainingArguments: deepspeed=<the JSON's path>
        raise UserError(f"deepspeed: {raw!r} in {where}: the DeepSpeed JSON goes under deepspeed.config "
                        f"(deepspeed: {{config: {raw}}})")
    if not isinstance(raw, dict):
        raise UserError(f"{section}: expected a mapping of keys in {where}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            origin = "the overrides" if f"{section}.{key}" in overridden else where
            raise _unknown_key_error(f"{section}.{key}", list(fields), origin)
        choices = fields[key].metadata.get("choices")
        values[key] = _coerce(value, hints[key], f"{section}.{key}", choices)
    return cls(**values)


def parse_override(word: str) -> tuple[list[str], Any]:
    """`training.learning_rate=2e-6` -> (["training", "learning_rate"], 2e-06); values are YAML."""
    if "=" not in word:
        raise UserError(f"override '{word}' must look like section.key=value (e.g. training.num_epochs=1)")
    key, text = word.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        homes = key_homes(path[-1]) if len(path) == 1 else []
        example = f"{homes[0]}={text}" if homes else "training.num_epochs=1"
        raise UserError(f"override '{word}': the key must be section.key, e.g. {example}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise UserError(f"override '{word}': the value is not valid YAML ({err})") from None
    return path, value


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `section.key=value` overrides, and validate everything."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections ({', '.join(SECTIONS)})")
    overridden: set[str] = set()
    for word in overrides:
        (section, key), value = parse_override(word)
        overridden.add(f"{section}.{key}")
        if section not in SECTIONS:
            raise _unknown_key_error(section, list(SECTIONS), "the overrides")
        current = raw.get(section) or {}
        if not isinstance(current, dict):
            raise UserError(f"{section}: expected a mapping in {path}")
        raw[section] = {**current, key: value}
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise _unknown_key_error(name, list(SECTIONS), str(path))
        # An empty section (or `lora: null`) keeps the defaults / disables LoRA (the trainer's first lines say
        # which: "policy: trains every parameter (no lora: section)"; `lora: {}` is the default adapter)
        if value is None:
            continue
        sections[name] = _build_section(SECTIONS[name], value, name, str(path), overridden)
    return Config(**sections)


def yaml_text(config: Config) -> str:
    """The resolved config as YAML; `load_config` reads it back to the same config."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (temp file + rename, so a reader never sees half of it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml_text(config))
    os.replace(tmp, path)
