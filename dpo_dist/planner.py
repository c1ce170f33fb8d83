"""Predict per-device memory of a run from the model's config.json alone, before loading anything.

The estimate adds up what a rank holds at its peak (bytes, per device):
- weights: N x dtype bytes, divided over all ranks under ZeRO-3, none on the device when offloaded;
- gradients: trainable N_t x dtype bytes, divided under ZeRO-2/3;
- optimizer: Adam's two fp32 moments plus DeepSpeed's fp32 master copy, 12 bytes x N_t, divided
  under ZeRO-1/2/3, none on the device with optimizer offload;
- reference: a separate model holds N_ref x dtype bytes (divided under ZeRO-3, none when
  offloaded); the adapter, a precomputed cache and reference-free losses hold nothing;
- activations: per token of the micro-batch (chosen + rejected, 2 x batch x max_seq_length) and
  layer, dtype bytes x (8 H + 4 I) without gradient checkpointing, dtype bytes x H with it
  (plus one layer's full set, recomputed in backward);
- logits: one chunk of `logps_chunk_tokens` (default: 128 MiB worth) x vocab in fp32, three times (logits, softmax, grad);
- overhead: the CUDA context and allocator slack (1.5 GiB + 10%) on a GPU.
Attention scores are not counted (sdpa / flash-attention do not materialise them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dpo_dist.config import Config

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_hf_config(cls, hf) -> "ModelShape":
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        return cls(hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers, hf.num_attention_heads,
                   getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads, head_dim,
                   bool(getattr(hf, "tie_word_embeddings", False)))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one decoder layer, by the module names LoRA targets."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv), "o_proj": (q, self.hidden),
            "gate_proj": (self.hidden, self.intermediate), "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }

    def parameters(self) -> int:
        per_layer = sum(i * o for i, o in self.linear_shapes().values()) + 2 * self.hidden + 2 * self.head_dim
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * per_layer + embeddings + self.hidden


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device by part; `fits` against `device_bytes`; `advice` when it does not."""

    parts: dict[str, float]
    device_bytes: float | None
    advice: tuple[str, ...] = ()

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.device_bytes is None or self.total <= self.device_bytes

    def describe(self) -> str:
        lines = [f"  {name:12} {value / GIB:8.2f} GiB" for name, value in self.parts.items()]
        lines.append(f"  {'total':12} {self.total / GIB:8.2f} GiB per device")
        if self.device_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} in {self.device_bytes / GIB:.1f} GiB")
        lines.extend(f"  try: {item}" for item in self.advice)
        return "\n".join(lines)


def _lora_trainable(shape: ModelShape, config: Config) -> int:
    shapes = shape.linear_shapes()
    per_layer = sum(config.lora.r * (i + o) for name, (i, o) in shapes.items() if name in config.lora.target_modules)
    return shape.layers * per_layer


def plan_memory(config: Config, shape: ModelShape, ds_config: dict, world_size: int, dtype_name: str,
                device_bytes: float | None, on_gpu: bool = True, with_advice: bool = True) -> MemoryPlan:
    """Per-device bytes of `config` on `world_size` ranks (see the module docstring for each term)."""
    b = DTYPE_BYTES[dtype_name]
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offload_params = zero.get("offload_param", {}).get("device") == "cpu"
    offload_optimizer = zero.get("offload_optimizer", {}).get("device") == "cpu"
    n = shape.parameters()
    trainable = _lora_trainable(shape, config) if config.lora is not None else n
    shard = lambda nbytes, divided: nbytes / world_size if divided else nbytes  # noqa: E731

    weights = 0.0 if offload_params else shard(n * b, stage == 3)
    if config.lora is not None:
        weights += trainable * b
    mode = config.reference_mode
    reference = 0.0
    if mode == "model" and not config.reference.offload:
        reference = shard(n * b, stage == 3)
    tokens = 2 * config.training.batch_size * config.training.max_seq_length
    if config.model.gradient_checkpointing:
        activations = tokens * b * (shape.layers * shape.hidden + 8 * shape.hidden + 4 * shape.intermediate)
    else:
        activations = tokens * b * shape.layers * (8 * shape.hidden + 4 * shape.intermediate)
    from dpo_dist.logps import default_chunk_tokens

    chunk = min(config.model.logps_chunk_tokens or default_chunk_tokens(shape.vocab), tokens)
    parts = {
        "weights": weights,
        "gradients": shard(trainable * b, stage >= 2),
        "optimizer": 0.0 if offload_optimizer else shard(trainable * 12, stage >= 1),
        "reference": reference,
        "activations": activations,
        "logits": 3 * chunk * shape.vocab * 4,
    }
    if on_gpu:
        parts["overhead"] = 1.5 * GIB + 0.1 * sum(parts.values())
    plan = MemoryPlan(parts, device_bytes)
    if plan.fits or device_bytes is None or not with_advice:
        return plan
    return dataclasses.replace(plan, advice=tuple(_advice(config, shape, ds_config, world_size, dtype_name, device_bytes)))


def _advice(config: Config, shape: ModelShape, ds_config: dict, world_size: int, dtype_name: str, device_bytes: float):
    """Single changes that would make the run fit, each checked by re-planning."""
    zero3 = {**ds_config, "zero_optimization": {**ds_config.get("zero_optimization", {}), "stage": 3}}
    offload = {**zero3, "zero_optimization": {**zero3["zero_optimization"], "offload_optimizer": {"device": "cpu"}}}
    half_batch = max(1, config.training.batch_size // 2)
    candidates = [
        ("model.gradient_checkpointing=true", dataclasses.replace(config, model=dataclasses.replace(config.model, gradient_checkpointing=True)), ds_config, world_size),
        ("deepspeed.config=ds_configs/zero3.json", config, zero3, world_size),
        ("reference.mode=precomputed (launch/precompute_ref.py first)", dataclasses.replace(config, reference=dataclasses.replace(config.reference, mode="precomputed")), ds_config, world_size),
        ("deepspeed.config=ds_configs/zero3_offload.json", config, offload, world_size),
        (f"training.batch_size={half_batch} with twice the gradient_accumulation_steps",
         dataclasses.replace(config, training=dataclasses.replace(config.training, batch_size=half_batch)), ds_config, world_size),
        ("twice as many GPUs", config, ds_config, 2 * world_size),
    ]
    advice = []
    for label, changed, changed_ds, ranks in candidates:
        if config.dpo.loss_type in ("simpo", "orpo") and "reference" in label:
            continue
        if plan_memory(changed, shape, changed_ds, ranks, dtype_name, device_bytes, with_advice=False).fits:
            advice.append(label)
    return advice or ["no single change fits: combine ZeRO-3 offload, gradient checkpointing, a precomputed reference and more GPUs"]
