"""The DPO loop: setup() -> train() / evaluate() -> cleanup().

One optimizer step (`train_step`): for each micro-batch, policy log-probs of chosen and rejected
in one forward, reference log-probs, the preference loss, backward; DeepSpeed steps at the
accumulation boundary. Logging, eval and export are calls around it, not branches inside it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from dpo_dist import data as data_lib
from dpo_dist import tokenization
from dpo_dist.checkpoint import SYNCED_REFERENCE, Checkpointer, TrainerState, export_hf, set_rng_state
from dpo_dist.config import Config, save_config, yaml_text
from dpo_dist.engine import (
    DistInfo,
    LaggedVote,
    TrainEngine,
    build_inference_engine,
    dtype_name,
    param_elements,
    ranks_on_this_node,
    reference_ds_config,
    tokenize_shards,
    training_ds_config,
)
from dpo_dist.errors import UserError
from dpo_dist.examples import ExampleStore
from dpo_dist.logps import SequenceLogps, forward_pair
from dpo_dist.lora_ops import fused_lora_layers
from dpo_dist.losses import LOSSES, PreferenceInputs, chosen_nll, combine
from dpo_dist.metrics import (
    MetricWindow,
    PreemptionFlag,
    RunTotals,
    TrainClock,
    batch_sums,
    device_peak_tflops,
    flops_per_token,
    make_logger,
    peak_memory_mb,
)
from dpo_dist.models import load_causal_lm, load_tokenizer, prepare_policy, read_model_config
from dpo_dist.planner import (
    ModelShape, check_host_memory, check_memory, device_memory_bytes, host_available_bytes, single_rank_note, zero_stage,
)
from dpo_dist.records import validate, validate_sft
from dpo_dist.reference import AdapterReference, build_model_reference, layout_mismatch, load_precomputed_reference
from dpo_dist.replicas import agree_with_main


def phase(name: str):
    """A named range ("dpo:<name>") in torch.profiler's trace while a profiler runs, else nothing (~0.7 us per use
    on this repo's 2-core CPU, where an always-on range took 12-16 us). bench/profile_step.py sums the host's time
    by phase and charges each device idle gap to the phase whose launch ended it."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(f"dpo:{name}")
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def router_aux_coef(configured: float | None, hf_config, shape: ModelShape) -> float:
    """The weight of a MoE policy's load-balancing loss: dpo.router_aux_loss_coef, or as TRL decides it, the
    model's router_aux_loss_coef where its config sets output_router_logits (0 otherwise). A weight for a
    model without routers is a mistake in the config, not something to ignore."""
    if configured is None:
        if not getattr(hf_config, "output_router_logits", False):
            return 0.0
        return float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0)
    if configured and not shape.experts:
        raise UserError(f"dpo.router_aux_loss_coef={configured}: {hf_config._name_or_path} is not a mixture-of-experts "
                        "model (no routers to balance); remove the key")
    return configured


def positions_note(hf_config, max_seq_length: int) -> str | None:
    """A max_seq_length past the model's trained positions (max_position_embeddings) with no RoPE extension in its
    config: it trains, but on positions the model never saw, which long-context users should hear of."""
    positions = getattr(hf_config, "max_position_embeddings", None)
    rope = getattr(hf_config, "rope_scaling", None) or getattr(hf_config, "rope_parameters", None) or {}
    extended = isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default"
    if not positions or max_seq_length <= positions or extended:
        return None
    return (f"training.max_seq_length={max_seq_length} is past the model's max_position_embeddings={positions}, and "
            f"its config.json sets no RoPE extension (rope_scaling): positions beyond {positions} are ones it was not "
            "trained on")


class Trainer:
    def __init__(self, config: Config, dist_info: DistInfo):
        self.config = config
        self.dist = dist_info
        self.logger = make_logger(dist_info.rank, config.training.output_dir)
        self.loss_fns = [(LOSSES[name].fn, weight) for name, weight in config.dpo.weighted_losses]
        dpo = config.dpo  # each loss takes the hyper-parameters it uses from these
        self.loss_settings = dict(beta=dpo.beta, label_smoothing=dpo.label_smoothing, simpo_gamma=dpo.simpo_gamma,
                                  discopop_tau=dpo.discopop_tau)
        self._order, self._order_epoch = [], None  # the shuffled order of the epoch in progress
        self.collate = data_lib.collate_for(config.data.packing, config.data.prefix_sharing, config.dpo.ld_alpha)

    # ---------------------------------------------------------------- setup
    def setup(self, train: bool = True) -> None:
        """Tokenizer, data, DeepSpeed configs, reference, policy, resume. `train=False` builds no optimizer."""
        seed_everything(self.config.training.seed)
        self.tokenizer = load_tokenizer(self.config.model.policy_path)
        self.dtype, self.ds_config = training_ds_config(self.config, self.dist.world_size)
        if train and self.config.model.attn_implementation == "flex_attention" and self.dist.device.type != "cuda":
            raise UserError(f"model.attn_implementation=flex_attention cannot train on {self.dist.device.type}: torch's "
                            "FlexAttention has no backward there. Use sdpa (data.packing works with it), or train on a GPU")
        hf_config = read_model_config(self.config.model.policy_path)
        self.shape = ModelShape.from_hf_config(hf_config)
        self.router_aux_coef = router_aux_coef(self.config.dpo.router_aux_loss_coef, hf_config, self.shape)
        note = positions_note(hf_config, self.config.training.max_seq_length)
        if note:
            self.logger.info(f"note: {note}")
        if train:  # refuse a run that cannot fit the GPU before tokenizing data or loading weights
            check_memory(self.config, self.shape, self.ds_config, self.dist.world_size, dtype_name(self.dtype),
                         device_memory_bytes(self.dist.device))
            if self.dist.device.type == "cuda":  # the ranks on this node share its host memory
                check_host_memory(self.config, self.shape, self.ds_config, self.dist.world_size, dtype_name(self.dtype),
                                  ranks_on_this_node(), host_available_bytes())
            note = single_rank_note(self.ds_config, self.dist.world_size, self.dist.device.type == "cuda",
                                    self.config.lora is not None)
            if note:
                self.logger.info(f"note: {note}")
        self._setup_data(train)
        self.checkpointer = Checkpointer(self.config.training, self.dist)
        # refuse early, before loading models; an old run overwrite_output_dir replaces goes once they have loaded
        resume_path = self.checkpointer.resume_path() if train else None
        self._setup_models(train, resume_path)
        sub_group = self.ds_config["zero_optimization"]["sub_group_size"] if zero_stage(self.ds_config) == 3 else None
        self.state = TrainerState(world_size=self.dist.world_size, global_batch=self.global_batch,
                                  zero3_sub_group_size=None if sub_group is None else int(sub_group),
                                  total_steps=self.total_steps)
        self.resume_rng = None
        if resume_path is not None:
            self.state, self.resume_rng = self.checkpointer.load(resume_path, self.policy, self.state)
            self.logger.truncate_after(self.state.step)  # drop what the interrupted run logged past its checkpoint
            self.logger.info(f"resumed from {resume_path} at step {self.state.step} (epoch {self.state.epoch}, "
                             f"{self.state.epoch_step} steps into it, {self.state.consumed_pairs} pairs consumed)")
        elif train and self.config.training.resume_from == "auto":  # no checkpoint yet: this run starts over, and
            self.logger.truncate_after(-1)  # what an attempt killed before its first checkpoint logged goes
        if train:
            self.checkpointer.clear_replaced_run()
        if self.dist.is_main:
            Path(self.config.training.output_dir).mkdir(parents=True, exist_ok=True)
            save_config(self.config, Path(self.config.training.output_dir) / "config.yaml")

    def _setup_data(self, train: bool) -> None:
        config, training = self.config, self.config.training
        if train and not config.data.train_files:
            raise UserError("data.train_files is empty: set it in the config or pass data.train_files=[path.jsonl]")
        self.train_examples = self._load_split(config.data.train_files, "train") if train else ExampleStore()
        self.sft_examples = (
            self._load_split(config.data.sft_files, "sft", validate_sft) if train and config.data.sft_files else []
        )
        self.eval_examples = self._load_split(config.data.eval_files, "eval") if config.data.eval_files else ExampleStore()
        self.global_batch = training.batch_size * self.dist.world_size * training.gradient_accumulation_steps
        self.steps_per_epoch = data_lib.steps_per_epoch(len(self.train_examples), self.global_batch)
        if train and self.steps_per_epoch == 0:
            raise UserError(
                f"{len(self.train_examples)} training pairs are fewer than one global batch of {self.global_batch} "
                "(batch_size x processes x gradient_accumulation_steps); lower one of them or add data"
            )
        total = self.steps_per_epoch * training.num_epochs
        self.total_steps = min(total, training.max_steps) if training.max_steps > 0 else total

    def _setup_models(self, train: bool, resume_path: Path | None) -> None:
        """The reference (a model, a verified cache, the adapter-less policy, or none) and the policy engine."""
        config, mode = self.config, self.config.reference_mode
        self.reference = None  # reference-free losses (mode none) have none
        if mode == "precomputed":  # checked before the policy loads: a bad cache fails fast
            self.reference = load_precomputed_reference(
                config, self.tokenizer, self.dtype,
                itertools.chain(self.train_examples.completion_lengths(), self.eval_examples.completion_lengths()), self.logger
            )
        elif mode == "model":
            self.reference = build_model_reference(config, self.dtype, self.ds_config, self.dist.device, self.logger,
                                                   self._synced_reference_path(resume_path))
        causal_lm = load_causal_lm(config.model.policy_path, config.model, self.dtype, self.ds_config)
        stale_copies = agree_with_main(causal_lm, f"policy {config.model.policy_path}", self.dist.device)
        if stale_copies:
            self.logger.info(stale_copies)
        policy = prepare_policy(causal_lm, config.model, config.lora)
        self.causal_lm = policy
        scorer = SequenceLogps(policy, config.model.logps_chunk_tokens, config.model.recompute_elementwise,
                               router_top_k=self.shape.experts_per_token if self.router_aux_coef else 0,
                               probability_weights=config.dpo.use_weighting, compiled_head=config.model.compile)
        if train:
            self.policy = TrainEngine(scorer, self.ds_config, config.training, max(self.total_steps, 1),
                                      config.deepspeed.zero3_whole_layers)
        else:
            self.policy = build_inference_engine(scorer, reference_ds_config(self.ds_config, offload=False), self.dist.device,
                                                 config.deepspeed.zero3_whole_layers)
        if mode == "adapter":
            self.reference = AdapterReference(self.policy, policy)
        if config.reference.sync_steps and train:
            mismatch = layout_mismatch(self.reference.model, policy)
            if mismatch:
                raise UserError(f"reference.sync_steps (TR-DPO) mixes the policy's weights into the reference's, so both "
                                f"must be one architecture: {mismatch}. Give model.ref_model of the policy's shape")
        # For mfu: parameter counts of what runs per token (the reference's forward only in model/adapter mode; a
        # MoE token runs through k of each layer's E experts, so the idle experts' weights are left out).
        idle = self.shape.idle_expert_elements()
        policy_params = param_elements(policy)[1] - idle
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in policy.parameters() if p.requires_grad)
        active_trainable = trainable - idle if config.lora is None else trainable
        self.flops_per_token = flops_per_token(policy_params, active_trainable,
                                               policy_params if mode in ("model", "adapter") else 0)
        self.peak_tflops = device_peak_tflops(config.training.peak_tflops)
        if train:
            trained = "every parameter (no lora: section)" if config.lora is None else (
                f"a LoRA adapter (r {config.lora.r}, alpha {config.lora.alpha}, on {', '.join(config.lora.target_modules)})")
            self.logger.info(f"policy: trains {trained}: {trainable:,} trainable elements")
        elif config.lora is not None:  # evaluate.py
            self.logger.info(f"policy: the lora: section adds a new adapter, which changes nothing: these are the scores "
                             f"of {config.model.policy_path}. For a trained adapter's, give its merged model as "
                             "model.sft_model and leave the lora: section out")
        offloaded = ", its parameters offloaded to CPU (reference.offload)" if mode == "model" and config.reference.offload else ""
        self.logger.info(f"reference: {mode}{offloaded}")
        # OpenRLHF's --ref_offload beside LoRA: nothing to offload (a precomputed cache's pass did use it)
        if config.reference.offload and mode in ("adapter", "none"):
            self.logger.info(f"reference.offload: no reference model to offload (reference: {mode}); the setting does nothing")
        if config.lora is not None and config.lora.fused:
            self.logger.info(f"lora.fused: {fused_lora_layers(policy)} LoRA projections run as one autograd function each")
        for name, model in (("policy", policy), ("reference", getattr(self.reference, "model", None))):
            if model is not None:
                local, total = param_elements(model)
                self.logger.info(f"{name}: rank 0 holds {local:,} of {total:,} parameter elements")

    def _synced_reference_path(self, resume_path: Path | None) -> str | None:
        """With TR-DPO, a resumed run's reference is the one its checkpoint kept (it has moved since the start)."""
        if not self.config.reference.sync_steps or resume_path is None:
            return None
        kept = resume_path / SYNCED_REFERENCE
        if kept.is_dir():
            self.logger.info(f"reference: the synced reference kept in {kept}")
            return str(kept)
        self.logger.info(f"reference: {resume_path} keeps no synced reference (that run did not sync); "
                         f"syncing starts from {self.config.model.reference_path}")
        return None

    def _load_split(self, files: list[str], split: str, validator=validate):
        config = self.config
        return tokenization.load_examples(
            files, self.tokenizer, config.training.max_seq_length, config.data.truncation_mode,
            config.data.skip_invalid, self.logger, split, validator, config.tokenized_cache_dir, self.dist.is_main,
            tokenize_shards(self.dist), config.data.chat_template_kwargs,
        )

    # ---------------------------------------------------------------- the step
    def _pair_loss(self, batch: data_lib.PairBatch):
        """Per-pair loss (the weighted preference losses, WPO-weighted with dpo.use_weighting, + sft_weight x chosen
        NLL), and what the metrics need."""
        with phase("reference"):
            ref_logps = self.reference.logps(batch.pairs_only()) if self.reference is not None else None
        with phase("policy_forward"):
            policy_logps = forward_pair(self.policy, batch, token_metrics=self.config.training.token_metrics)
        with phase("loss"):
            return self._combine_losses(batch, ref_logps, policy_logps)

    def _combine_losses(self, batch: data_lib.PairBatch, ref_logps, policy_logps):
        """_pair_loss's result from the two models' log-probs (the reference's None under reference-free losses)."""
        dpo = self.config.dpo
        inputs = PreferenceInputs(
            policy_chosen_logps=policy_logps.chosen_logps,
            policy_rejected_logps=policy_logps.rejected_logps,
            chosen_tokens=policy_logps.chosen_tokens,
            rejected_tokens=policy_logps.rejected_tokens,
            ref_chosen_logps=ref_logps.chosen_logps if ref_logps is not None else None,
            ref_rejected_logps=ref_logps.rejected_logps if ref_logps is not None else None,
            f_divergence=dpo.f_divergence_type,
            f_alpha=dpo.f_alpha_divergence_coef,
            real_pairs=batch.pair_weight > 0,
        )
        loss = combine([(loss_fn(inputs, **self.loss_settings), weight) for loss_fn, weight in self.loss_fns])
        if dpo.use_weighting:  # WPO: each pair weighted by how likely the policy finds both its completions
            loss.losses = loss.losses * torch.exp(policy_logps.chosen_log_weights + policy_logps.rejected_log_weights)
        nll = chosen_nll(inputs)
        if dpo.sft_weight:
            loss.losses = loss.losses + dpo.sft_weight * nll
        if policy_logps.router_loss is not None:  # TRL adds it to every pair's loss alike: the same mean
            loss.losses = loss.losses + self.router_aux_coef * policy_logps.router_loss
        return loss, policy_logps, nll

    def train_step(self, micro_batches: Iterable[data_lib.PairBatch], window: MetricWindow) -> None:
        """One optimizer step over this rank's micro-batches."""
        upcoming = iter(micro_batches)
        batch = next(upcoming, None)
        while batch is not None:
            with phase("to_device"):
                batch = batch.to(self.dist.device)
            loss, policy_logps, nll = self._pair_loss(batch)
            with phase("objective"):
                # Mean over this micro-batch; DeepSpeed averages over ranks and accumulation steps.
                objective = loss.losses.mean()
                sft_nll = None
                if batch.num_sft:  # SFT rows mixed in against forgetting: their per-token NLL
                    sft_nll = -policy_logps.sft_logps / policy_logps.sft_tokens.clamp(min=1)
                    objective = objective + self.config.data.sft_loss_weight * sft_nll.mean()
            # The next micro-batch is collated here, while the device works through this one's queued forward:
            # after the backward, DeepSpeed's ZeRO-2 with overlap_comm (several processes) waits for the device,
            # which would then idle through the collation. Nothing may stop between here and the backward: the
            # engine holds this forward
            with phase("collate"):
                following = next(upcoming, None)
            with phase("backward"):
                self.policy.backward(objective)
            with phase("step"):  # DeepSpeed's optimizer step at the accumulation boundary, else bookkeeping
                self.policy.step()
            with phase("metrics"):
                window.add(batch_sums(loss, policy_logps, nll, batch.pair_weight, batch.num_tokens,
                                      batch.attention_mask.sum(), sft_nll, policy_logps.router_loss))
            batch = following

    # ---------------------------------------------------------------- the loop
    def train(self) -> str:
        """Run to the end ("completed"), or to a checkpoint after SIGTERM/SIGUSR1 ("preempted")."""
        training, state = self.config.training, self.state
        self.logger.info(
            f"training {self.total_steps} optimizer steps: {self.steps_per_epoch} per epoch of "
            f"{self.global_batch} pairs ({len(self.train_examples) - self.steps_per_epoch * self.global_batch} "
            f"pairs of each epoch's last partial batch left out; shuffling varies which)"
        )
        if not len(self.eval_examples):
            if training.eval_steps:
                self.logger.info(f"training.eval_steps={training.eval_steps}, but data.eval_files gives no pairs: no evaluation")
            if training.keep_best_checkpoint:
                self.logger.info("training.keep_best_checkpoint: no eval pairs (data.eval_files) to pick the best by; "
                                 "only the newest checkpoints are kept")
        if state.step == 0:
            self.maybe_evaluate(step=0)
        if self.resume_rng is not None:
            set_rng_state(self.resume_rng)  # last, so nothing between here and the next step draws from it
        window, clock, preemption = MetricWindow(self.config.training.token_metrics), TrainClock(), PreemptionFlag()
        self._run_totals = RunTotals(state)
        stop_vote = LaggedVote(self.dist.device)  # a signal may reach only some ranks: all stop together
        self._window_first_step = state.step
        progress = self.logger.progress(total=self.total_steps, initial=state.step)
        self.policy.train()
        while state.step < self.total_steps:
            self.train_step(self._micro_batches(state.epoch, state.epoch_step), window)
            state.advance(self.steps_per_epoch)
            sync_steps = self.config.reference.sync_steps
            if sync_steps and state.step % sync_steps == 0:  # TR-DPO: the reference follows the policy
                self.policy.release_gathered_params()
                self.reference.follow(self.causal_lm, self.config.reference.mixup_alpha)
            epoch_progress = self._epoch_progress()
            progress.update(1)
            last = state.step == self.total_steps
            stopping = stop_vote(preemption.requested, wait=last)
            saving = self.checkpointer.should_save(state.step, last) or stopping
            if state.step % training.logging_steps == 0 or last or saving:  # a checkpoint closes the log window
                metrics = self._log_window(window, clock, state.step, epoch_progress)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
            if (training.eval_steps and state.step % training.eval_steps == 0) or last:
                clock.pause()  # eval time is not train throughput
                self.maybe_evaluate(state.step)
                self.policy.train()
                clock.resume()
            if saving:
                path = self.checkpointer.save(state.step, self.policy, state, yaml_text(self.config), self._keep_synced_reference)
                self.logger.info(f"saved {path}")
            if stopping:
                stop_vote.drain()
                progress.close()
                self.logger.info(f"stopped on a signal at step {state.step}; resume with training.resume_from=auto")
                return "preempted"
        progress.close()
        summary = self._run_totals.summary(state, self._epoch_progress())
        self.logger.write_results("train_results.json", summary)
        self.logger.info(f"train_results.json: {json.dumps(summary)}")
        self.policy.release_gathered_params()
        export = self.config.export
        export_hf(self.causal_lm, self.tokenizer, Path(training.output_dir) / "final", self.dist, export.merge, export.max_shard_size)
        self.logger.info(f"exported the policy to {Path(training.output_dir) / 'final'}")
        return "completed"

    def _epoch_progress(self) -> float:
        """Epochs trained, fractional (a finished epoch reads as epoch + 1)."""
        return self.state.epoch + self.state.epoch_step / self.steps_per_epoch

    def _keep_synced_reference(self, checkpoint_dir: Path) -> None:
        """With TR-DPO the reference is part of the run's state: a checkpoint keeps it (in HF layout) to resume from."""
        if self.config.reference.sync_steps:
            self.reference.release_gathered_params()
            export_hf(self.reference.model, self.tokenizer, checkpoint_dir / SYNCED_REFERENCE, self.dist)

    def _micro_batches(self, epoch: int, epoch_step: int) -> Iterator[data_lib.PairBatch]:
        """This rank's micro-batches of the step at (epoch, epoch_step), each collated when it is asked for: what
        goes in is chosen now; `train_step` asks for micro-batch k + 1 once k's forward is queued, so that it overlaps
        the device's work on k (after k's backward DeepSpeed's ZeRO-2 with overlap_comm, on several processes, waits
        for the device)."""
        training = self.config.training
        if self._order_epoch != epoch:
            self._order = data_lib.epoch_order(len(self.train_examples), epoch, training.seed, self.config.data.shuffle)
            if self.config.data.group_by_length:
                lengths = self.train_examples.token_counts  # without building every example
                trained = data_lib.steps_per_epoch(len(self._order), self.global_batch) * self.global_batch
                self._order = data_lib.length_grouped_order(self._order, lengths, 50 * self.global_batch, trained)
            self._order_epoch = epoch
        order = self._order
        indices = data_lib.rank_step_indices(
            order, epoch_step, self.dist.rank, self.dist.world_size, training.batch_size, training.gradient_accumulation_steps
        )
        contents = []
        for micro_step, chunk in enumerate(indices):
            sft_positions = []
            if self.sft_examples:
                sft_positions = data_lib.sft_indices(
                    self.state.step, micro_step, self.dist.rank, self.dist.world_size, training.gradient_accumulation_steps,
                    training.batch_size, self.config.data.sft_ratio, len(self.sft_examples), training.seed,
                )
            contents.append((chunk, sft_positions))
        return (self.collate([self.train_examples[i] for i in chunk], self.tokenizer.pad_token_id, None,
                             [self.sft_examples[i] for i in sft_positions])
                for chunk, sft_positions in contents)

    def _log_window(self, window: MetricWindow, clock: TrainClock, step: int, epoch: float) -> dict[str, float]:
        """Reduce the window's sums (one all-reduce), add the step-level numbers, log, restart the window."""
        metrics = window.reduce()
        seconds = clock.seconds()
        metrics.update(
            grad_norm=self.policy.grad_norm(),
            learning_rate=self.policy.learning_rate(),
            epoch=epoch,
            tokens_per_second=metrics["num_tokens"] / seconds,
            step_seconds=seconds / (step - self._window_first_step),
            peak_memory_mb=peak_memory_mb(),
        )
        if self.peak_tflops:  # achieved model FLOP/s per device over the device's peak, on the tokens the decoder ran
            achieved = self.flops_per_token * metrics["num_processed_tokens"] / seconds / self.dist.world_size
            metrics["mfu"] = achieved / (self.peak_tflops * 1e12)
        self._run_totals.add_window(metrics["loss"], step - self._window_first_step)
        self.state.consumed_tokens += int(metrics["num_tokens"])
        metrics["num_tokens"] = float(self.state.consumed_tokens)  # TRL's num_tokens: trained on so far, not this window
        self.logger.log(step, metrics)
        clock.reset()
        self._window_first_step = step
        return metrics

    # ---------------------------------------------------------------- eval
    def maybe_evaluate(self, step: int) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        metrics = self.evaluate()
        self.logger.log(step, metrics)
        if (self.state.best_eval_loss is None or metrics["eval_loss"] < self.state.best_eval_loss):
            self.state.best_eval_loss, self.state.best_step = metrics["eval_loss"], step
        self.logger.info(
            f"eval @ step {step}: loss {metrics['eval_loss']:.4f}, "
            f"reward accuracy {metrics['eval_rewards/accuracies']:.3f}, margin {metrics['eval_rewards/margins']:.4f}"
        )
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics of the policy vs the reference on every eval pair exactly once, averaged over all ranks."""
        self.policy.eval()
        window = MetricWindow(self.config.training.token_metrics)
        batches = data_lib.eval_batches(
            self.eval_examples, self.dist.rank, self.dist.world_size,
            self.config.training.micro_eval_batch_size, self.tokenizer.pad_token_id, self.collate,
        )
        for batch in batches:
            batch = batch.to(self.dist.device)
            loss, policy_logps, nll = self._pair_loss(batch)
            window.add(batch_sums(loss, policy_logps, nll, batch.pair_weight, batch.num_tokens, batch.attention_mask.sum()))
        metrics = window.reduce()
        return {f"eval_{name}": value for name, value in metrics.items()}

    def cleanup(self) -> None:
        self.logger.close()
