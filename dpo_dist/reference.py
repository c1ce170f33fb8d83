"""Reference log-probs behind one interface: `reference.logps(batch) -> PairLogps`.

Three strategies (and none at all for reference-free losses):
- `ModelReference`: a separate frozen model: a `SequenceLogps` in eval mode (dropout off), with
  `requires_grad` off and no optimizer, scored under `torch.no_grad()`. Under ZeRO-3 it is sharded
  across ranks like the policy; with `reference.offload` its parameters stay in CPU memory
  (ZeRO-3 param offload) and are streamed in per layer.
- `AdapterReference`: with LoRA, the policy itself with its adapter disabled (`AdapterSwitch`): no
  second model in memory. Scored in eval mode (dropout off, LoRA dropout included) under
  `torch.no_grad()`, then the policy goes back to train mode.
- `PrecomputedReference`: no model at all; the log-probs come from the verified cache written by
  `launch/precompute_ref.py`, looked up by each pair's uid.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dpo_dist import cache as cache_lib
from dpo_dist.config import Config
from dpo_dist.data import PairBatch
from dpo_dist.engine import build_inference_engine, dtype_name, reference_ds_config
from dpo_dist.logps import PairLogps, SequenceLogps, forward_pair
from dpo_dist.models import load_causal_lm
from dpo_dist.replicas import agree_with_main


class ModelReference:
    """A frozen reference model; `scorer` is a `SequenceLogps` or a DeepSpeed inference engine around one."""

    def __init__(self, scorer: nn.Module, model: nn.Module):
        self.scorer = scorer
        self.model = model  # the causal LM inside, for reporting what this rank holds

    @torch.no_grad()
    def logps(self, batch: PairBatch) -> PairLogps:
        return forward_pair(self.scorer, batch)

    def release_gathered_params(self) -> None:
        """Under ZeRO-3, re-partition what prefetching left gathered, so that parameters can be gathered one
        by one (a sync, a checkpoint of the synced reference)."""
        if hasattr(self.scorer, "empty_partition_cache"):  # a DeepSpeed engine: ZeRO-3
            self.scorer.empty_partition_cache()

    def follow(self, policy: nn.Module, alpha: float) -> None:
        """TR-DPO's sync (`reference.sync_steps`): move this reference toward `policy` (the causal LM the
        training engine updates), in place on every rank. Collective under ZeRO-3."""
        self.release_gathered_params()
        move_toward(self.model, policy, alpha)


@torch.no_grad()
def move_toward(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO's soft update (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment",
    Eq. 5, as TRL's SyncRefModelCallback): every reference parameter becomes
    alpha x the policy's + (1 - alpha) x its own, in the reference's dtype.

    Under ZeRO-3 both models are partitioned: each pair of parameters is gathered whole, one pair at a time
    (the policy's read only; the reference's result written back from rank 0's copy, which every rank
    computed alike). Elsewhere the gathering is a no-op and every rank updates its whole copy alike."""
    import deepspeed

    policy_params = dict(policy.named_parameters())
    for name, ref_param in reference.named_parameters():
        policy_param = policy_params[name]
        with deepspeed.zero.GatheredParameters([policy_param], modifier_rank=None):
            with deepspeed.zero.GatheredParameters([ref_param], modifier_rank=0):
                ref_param.data.mul_(1 - alpha).add_(policy_param.data.to(ref_param.device, ref_param.dtype), alpha=alpha)


def layout_mismatch(reference: nn.Module, policy: nn.Module) -> str | None:
    """Why `move_toward` cannot mix these two models (parameter names or full shapes differ), or None."""
    def shapes(model: nn.Module) -> dict[str, tuple]:
        return {name: tuple(getattr(param, "ds_shape", param.shape)) for name, param in model.named_parameters()}

    reference_shapes, policy_shapes = shapes(reference), shapes(policy)
    if reference_shapes == policy_shapes:
        return None
    for name in sorted(set(reference_shapes) | set(policy_shapes)):
        if reference_shapes.get(name) != policy_shapes.get(name):
            return f"{name} is {reference_shapes.get(name, 'absent')} in the reference, {policy_shapes.get(name, 'absent')} in the policy"
    return None


def build_model_reference(config: Config, dtype: torch.dtype, train_ds_config: dict, device, logger,
                          path: str | None = None) -> ModelReference:
    """The separate reference model, from `path` (a checkpoint's synced reference on resume) or model.ref_model."""
    path = path or config.model.reference_path
    ref_ds = reference_ds_config(train_ds_config, config.reference.offload)
    model = load_causal_lm(path, config.model, dtype, ref_ds)
    scorer = SequenceLogps(model, config.model.logps_chunk_tokens, compiled_head=config.model.compile)
    scorer = build_inference_engine(scorer, ref_ds, device, config.deepspeed.zero3_whole_layers)
    # No engine broadcasts a whole (ZeRO 0-2) reference: without this each rank would score its own node's copy
    stale_copies = agree_with_main(model, f"reference model {path}", device)
    if stale_copies:
        logger.info(stale_copies)
    return ModelReference(scorer, model)


class AdapterSwitch:
    """`with switch.off():` runs a PEFT model's LoRA layers without their adapters, for a no-grad forward.

    It sets the one flag those layers' forward reads (`disable_adapters`) and puts it back. PEFT's own
    `disable_adapter()` does that too, but first builds a status report of every module (their reprs
    included) and switches `requires_grad` off and on for every adapter weight: 40 ms of host time per
    call for a 36-layer model on a CPU, once per micro-batch, for what a no-grad forward does not need.
    Models whose tuner layers are not all LoRA-style layers with that flag (e.g. `modules_to_save`
    wrappers) keep PEFT's context manager."""

    def __init__(self, peft_model: nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.peft_model = peft_model
        tuners = [module for module in peft_model.modules() if _is_peft_wrapper(module)]
        flagged = [module for module in tuners if isinstance(module, BaseTunerLayer) and hasattr(module, "_disable_adapters")]
        self.layers = flagged if tuners and len(flagged) == len(tuners) else None  # None: PEFT's own switch

    @contextlib.contextmanager
    def off(self):
        if self.layers is None:
            with self.peft_model.disable_adapter():
                yield
            return
        if torch.is_grad_enabled():
            raise RuntimeError("AdapterSwitch.off() leaves the adapters' requires_grad as it is: use it under no_grad")
        previous = [layer._disable_adapters for layer in self.layers]
        try:
            for layer in self.layers:
                layer._disable_adapters = True
            yield
        finally:
            for layer, value in zip(self.layers, previous):
                layer._disable_adapters = value


def _is_peft_wrapper(module: nn.Module) -> bool:
    """A module PEFT put inside the model (a tuner layer, a modules_to_save wrapper), not the PeftModel or tuner
    around it (those hold the `peft_config`)."""
    return type(module).__module__.startswith("peft.") and hasattr(module, "enable_adapters") and not hasattr(module, "peft_config")


class AdapterReference:
    """The LoRA policy with its adapter disabled; `policy` is its (DeepSpeed) scorer, `peft_model` the PeftModel."""

    model = None  # nothing beyond the policy is held

    def __init__(self, policy, peft_model):
        self.policy = policy
        self.peft_model = peft_model
        self.adapters = AdapterSwitch(peft_model)

    @torch.no_grad()
    def logps(self, batch: PairBatch) -> PairLogps:
        was_training = self.peft_model.training
        self.policy.eval()
        try:
            with self.adapters.off():
                return forward_pair(self.policy, batch)
        finally:
            if was_training:
                self.policy.train()


class PrecomputedReference:
    """Reference log-probs read from the cache; `rows` maps uid -> `CachedRow` (checked at load)."""

    model = None

    def __init__(self, rows: dict[str, cache_lib.CachedRow]):
        self.rows = rows

    def logps(self, batch: PairBatch) -> PairLogps:
        device = batch.input_ids.device
        cached = [self.rows[uid] for uid in batch.uids]

        def on_device(values: list, dtype: torch.dtype) -> torch.Tensor:  # built on the host, copied without a stream sync
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        return PairLogps(
            chosen_logps=on_device([row.ref_chosen_logps for row in cached], torch.float32),
            rejected_logps=on_device([row.ref_rejected_logps for row in cached], torch.float32),
            chosen_tokens=on_device([row.chosen_tokens for row in cached], torch.long),
            rejected_tokens=on_device([row.rejected_tokens for row in cached], torch.long),
        )


def open_fitting_cache(config: Config, tokenizer, dtype: torch.dtype, completion_lengths, verify: bool = False):
    """The cache's rows for the pairs of `completion_lengths` ((uid, chosen tokens, rejected tokens) each, as
    `ExampleStore.completion_lengths` gives them), or `CacheError` saying what differs from this config.

    Without `verify`, weight files whose size and mtime match the manifest are not re-read."""
    cache_dir = config.reference_cache_dir
    manifest = cache_lib.read_manifest(cache_dir)
    known = None if verify else manifest["fingerprint"]["reference"]["weights"]
    current = cache_lib.fingerprint(
        config.model.reference_path, tokenizer, config.training.max_seq_length, config.data.truncation_mode,
        dtype_name(dtype), [], known_weights=known, verify=verify, ld_alpha=config.dpo.ld_alpha,
    )
    differences = cache_lib.fingerprint_differences(manifest["fingerprint"], current)
    if differences:
        raise cache_lib.CacheError(f"the reference cache at {cache_dir} does not fit this config: " + "; ".join(differences))
    rows = cache_lib.read_rows(cache_dir, manifest)
    cache_lib.check_coverage(rows, completion_lengths, cache_dir)
    return manifest, rows


def load_precomputed_reference(config: Config, tokenizer, dtype: torch.dtype, completion_lengths, logger) -> PrecomputedReference:
    """Open the cache and refuse it, saying what differs, unless it fits this run's pairs exactly."""
    cache_dir = config.reference_cache_dir
    manifest, rows = open_fitting_cache(config, tokenizer, dtype, completion_lengths)
    logger.info(f"reference: precomputed cache {cache_dir} ({manifest['total_rows']} rows, fingerprint verified); no reference model loaded")
    return PrecomputedReference(rows)
