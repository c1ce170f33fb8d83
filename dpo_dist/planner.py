"""Predict per-device memory of a run from the model's config.json alone, before loading anything.

A training step has three kinds of memory (bytes per device; N parameters, N_t of them trainable, b
bytes per parameter element, W ranks, H hidden, I intermediate, Q = heads x head_dim, K = kv_heads x
head_dim, L layers, V vocabulary; fp32 = 4):

Held through the whole step
- weights: N b, divided over W under ZeRO-3, none on the device with parameter offload (LoRA adds N_t b);
- optimizer: DeepSpeed's fp32 master copy and Adam's two fp32 moments, 12 N_t, divided under ZeRO-1/2/3,
  none on the device with optimizer offload;
- reference: a separate model holds N b (divided under ZeRO-3, none when offloaded); the adapter, a
  precomputed cache and reference-free losses hold nothing;
- gradients: N_t b, divided under ZeRO-3; under ZeRO-2 a rank keeps the whole gradient of every parameter
  that overlaps its 1/W slice, so the plan takes the rank that holds most (`zero2_gradient_elements`: at
  least N_t b / W, all of the embedding's where the embedding is longer than a slice); held only under
  ZeRO-3 (a buffer made at start-up) or with gradient accumulation, else they fill in during backward as
  activations are freed and count with the step;
- buckets: DeepSpeed's gradient bucket buffers, reduce_bucket_size x b, once under ZeRO-1/2/3, twice under
  ZeRO-1/2 with overlap_comm, which the engine turns off on one process ("auto": one decoder layer's parameters,
  or all of N_t when fewer; `reduce_bucket_elements`).

Alive around forward/backward (the "backward" phase, whose peak is when backward starts at the log-prob chunks)
- activations: what autograd saves, per token of the micro-batch (2 x batch_size rows of max_seq_length,
  plus mixed-in SFT rows; packing makes one row of all of them; prefix sharing plans its worst case, no shared
  prompt, which runs as many tokens: one document per pair, attention (except flex's) gathered into the
  unshared sequences, its output scattered back, b Q more) and decoder layer, counted from transformers'
  modeling_qwen3.py (and modeling_qwen2.py for Qwen2.5) and checked with saved-tensor hooks:
    two RMSNorms: input upcast to fp32 (4 H) and output (b H, the next projections' input);
    q_norm / k_norm: their input upcast to fp32, 4 (Q + K) (Qwen3 only: Qwen2.5 has no q/k norms, and
    nothing of q and k is kept before rotary);
    the normalised input before the norm weight, b (2 H [+ Q + K]), only when norm weights train (not LoRA);
    attention: rotated q and the output (under eager with prefix sharing only o_proj's scattered copy of it),
    plus k and v as the kernel gets them: as they are, b (2 Q + 2 K),
    for flash_attention_2, flex_attention and for sdpa on padded rows (right-padded, so SequenceLogps passes no mask and
    sdpa groups the KV heads itself); repeated to every head, b 4 Q, for sdpa on a packed row (its
    block-causal mask rules grouping out) and for eager;
    MLP: gate, up, SiLU(gate) and their product, b 4 I;
    a Qwen3-MoE layer's router and experts instead (E experts of width I, k per token; `_routed_bytes_per_token`):
    4 E + 8 k for the router, and per routed copy b (2 H + 4 I + 1) + 24; with LoRA its frozen router keeps
    no copy of the second norm's output;
    LoRA: each adapted projection's rank-r intermediate, b r (with lora.dropout > 0 also its dropped input
    and mask, (b + 1) x fan-in); on a MoE layer's experts, the weights merged with the adapter, b E x 3 I x H
    per layer whatever the batch (`_merged_expert_bytes`);
  per row and layer, seq^2 x: b for the packed row's mask, which sdpa converts to the model dtype in every
    layer; heads x (4 [+ b]) for eager's fp32 softmax (and its b-byte copy below fp32);
  once, outside the layers: the final norm's fp32 input, its normalised input (when trainable) and the
  gathered hidden states of completion tokens, H (4 + b [+ b]); with prefix sharing under eager, the unshared
  rows' causal mask, seq^2 b (one tensor every layer shares).
  With model.lean_activations (or model.liger_kernels, whose kernels keep the same) each norm keeps its
  input, b per element, and an fp32 scale per row (no fp32 copy, no normalised copy), and the MLP keeps
  3 b I (SiLU's output is recomputed); the final norm likewise. model.recompute_elementwise drops the
  projections' copies of the two norms' outputs (2 b H) and down_proj's input (b I): rebuilt in backward.
  With gradient checkpointing each layer keeps only its input, b H per token, and backward recomputes one
  layer's full set at a time, after the log-prob chunks' backward has freed their buffers: the recomputed layer
  counts only where it is larger than the chunk's `logits` (at 16k tokens the plan was one layer, +34%, high
  without this); with model.checkpointed_layers = K < L, K inputs plus the other L - K layers'
  full sets (the peak at the start of backward: the first K are recomputed after the rest are freed).
  Compiled layers (model.compile) are counted as the lean ops: torch's partitioner keeps about the same bytes
  (within 6% of autograd's saved bytes on Qwen3, Qwen2.5 and Qwen3-MoE, fp32 and bf16, LoRA or not).
- logits: one chunk of `logps_chunk_tokens` x V in fp32, twice (the logits and
  one vocab-wide temporary: the exp pass that serves the normaliser, the metrics and WPO's sum p^2 alike,
  in forward and again when a checkpointed chunk is recomputed in backward; backward turns the saved logits
  into their gradient in place). With model.compile (compiled_head.py) once, in the model's dtype: the
  fused kernels read the logits without an fp32 copy or a temporary. A LoRA adapter on the lm_head makes three
  logit-sized tensors in the model's dtype as PEFT adds its output to the base's, 3 b, where that is more
  (`logps.head_bytes_per_logit`). The default chunk fills 256 MiB with
  these buffers (Qwen's vocabulary: 220 tokens eager, 883 compiled in bf16). When the lm_head trains (full
  fine-tuning) its gradient, V H b, exists full-size before any reduction, twice while a further chunk's
  gradient is added; where ZeRO-3 gathers (below) the lm_head is also gathered whole, V H b.
- gathered: under ZeRO-3 on more than one rank, or with parameter offload (the partitions are copied to the
  device), the decoder layer running and the next one (prefetched: "auto" stage3_prefetch_bucket_size is one
  layer) gathered whole, 2 x one layer's parameters x b. One rank without offload gathers nothing: its
  "gathered" parameter is a view of its partition.

Alive in the optimizer step (the "step" phase)
- gradients (unless held, above) and step: the fp32 copy of the gradient DeepSpeed hands the optimizer, 4 bytes
  for each element it steps at once (`optimizer_step_elements`: everything under ZeRO-0, the largest parameter
  group's 1/W slice under ZeRO-1/2, the largest sub-group under ZeRO-3, one decoder layer with "auto"
  sub_group_size), plus b per element for its flattened copy when b < 4 (`step_bytes`); none on the device with
  optimizer offload. The fused AdamW keeps no temporaries (torch's foreach and per-tensor ones did: 4 and 8
  bytes per element).

Host memory (`host_memory`, per rank; a node's ranks share it): what offload moves off the device. ZeRO-3
parameter offload: the weights' partitions, N b / W (the reference's too with reference.offload); optimizer
offload to CPU: 12 N_t / W of fp32 master weights and Adam moments and 4 N_t / W of fp32 gradients, plus b N_t / W
of gradient partitions (ZeRO-3; not on the device then) or, under ZeRO-1/2, a b-byte copy of the partition, the
largest parameter once in b, and with gradient accumulation the full gradients of the parameters the rank's slice
touches. Each process's libraries, CUDA context and the data are not counted. On CPU, where the host is the device,
device + host plans are within 5% of measured peaks for ZeRO-3 and ZeRO-2 offload (docs/architecture.md).

The peak is held + the larger phase. On a GPU, overhead adds the CUDA context and allocator slack
(1.5 GiB + 10%). Attention scores are not counted for sdpa / flash-attention (they do not materialise them).
Against peaks measured on CPU (fp32, one process, on_gpu=False) for full ZeRO-2/3, gradient-checkpointed
and LoRA runs the plan is within 5% (tests/test_planner.py allows 25%); on 2 ranks (ZeRO-3, ZeRO-2 with
gradient accumulation) within 8% of the busiest rank, 20% above the lighter ZeRO-2 rank; and within 9% of
CUDA max allocated (without `overhead`) for Qwen3-1.7B full ZeRO-3 and Qwen3-4B LoRA runs on an H200; the
tables are in docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from dpo_dist.config import Config, LoRAConfig
from dpo_dist.errors import UserError

GIB = 2**30
FP32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BACKWARD_PARTS = ("activations", "logits", "gathered")  # alive around forward/backward only
STEP_PARTS = ("step",)  # alive in the optimizer step only (and the gradients, unless held)


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
    qk_norm: bool = True  # Qwen3 normalises each head of q and k; Qwen2 / Qwen2.5 do not
    qkv_bias: bool = False  # Qwen2 / Qwen2.5 always; Qwen3 with attention_bias
    o_bias: bool = False  # Qwen3 with attention_bias only
    experts: int = 0  # Qwen3-MoE: experts per layer (then `intermediate` is one expert's width); 0: a dense MLP
    experts_per_token: int = 0

    @classmethod
    def from_hf_config(cls, hf) -> "ModelShape":
        """From a transformers config: Qwen3 (model_type qwen3), Qwen2 / Qwen2.5 (qwen2: q/k/v biases by
        architecture, no config key, and no q/k norms) or Qwen3-MoE (qwen3_moe, every layer sparse as released);
        other dense decoders as Qwen2 without biases. Other mixture-of-experts layouts are refused: a plan
        counting them as dense would be several times too small."""
        model_type = getattr(hf, "model_type", None)
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        bias = bool(getattr(hf, "attention_bias", False))
        experts = getattr(hf, "num_experts", None) or getattr(hf, "n_routed_experts", None) or 0
        intermediate = hf.intermediate_size
        if experts:
            sparse_everywhere = getattr(hf, "decoder_sparse_step", 1) == 1 and not getattr(hf, "mlp_only_layers", None)
            if model_type != "qwen3_moe" or not sparse_everywhere or getattr(hf, "shared_expert_intermediate_size", 0):
                source = f"{hf._name_or_path}/config.json" if getattr(hf, "_name_or_path", "") else "config.json"
                raise UserError(
                    f"{source}: model_type {model_type} with {experts} experts per layer is not a mixture-of-experts "
                    "layout dpo-dist supports (Qwen3-MoE with every layer sparse: decoder_sparse_step 1, no "
                    "mlp_only_layers, no shared expert). Use a Qwen3, Qwen3-MoE or Qwen2.5 checkpoint")
            intermediate = hf.moe_intermediate_size
        return cls(hf.vocab_size, hf.hidden_size, intermediate, hf.num_hidden_layers, hf.num_attention_heads,
                   getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads, head_dim,
                   bool(getattr(hf, "tie_word_embeddings", False)),
                   qk_norm=model_type in ("qwen3", "qwen3_moe"), qkv_bias=model_type == "qwen2" or bias,
                   o_bias=bias and model_type != "qwen2", experts=experts,
                   experts_per_token=getattr(hf, "num_experts_per_tok", 0) if experts else 0)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one decoder layer, by the module names LoRA targets (a MoE layer's
        MLP projections are its experts' 3-d weights: `layer_matrix_sizes`)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv), "o_proj": (q, self.hidden),
            "gate_proj": (self.hidden, self.intermediate), "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }

    def layer_matrix_sizes(self) -> list[int]:
        """Elements of one decoder layer's matrices, in module order: q, k, v, o, then gate, up, down; or, in a
        MoE layer, the experts' fused gate_up (E x 2I x H) and down (E x H x I) weights and the router (E x H)."""
        shapes = self.linear_shapes()
        attention = [i * o for name, (i, o) in shapes.items() if name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if not self.experts:
            return attention + [i * o for name, (i, o) in shapes.items() if name in ("gate_proj", "up_proj", "down_proj")]
        h, i, e = self.hidden, self.intermediate, self.experts
        return attention + [e * 2 * i * h, e * h * i, e * h]

    def layer_vector_sizes(self) -> list[int]:
        """Elements of one decoder layer's vectors, in module order: the q, k, v (and o) biases where the model
        has them, q_norm and k_norm (Qwen3), the two layer norms."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        biases = ([q, kv, kv] if self.qkv_bias else []) + ([self.hidden] if self.o_bias else [])
        norms = [self.head_dim, self.head_dim] if self.qk_norm else []
        return biases + norms + [self.hidden, self.hidden]

    def parameter_sizes(self) -> tuple[list[int], list[int]]:
        """Elements of each matrix and of each vector, in module order (embed_tokens; per layer its matrices and
        vectors, `layer_matrix_sizes` and `layer_vector_sizes`; the final norm; lm_head when untied): the two
        parameter groups of engine._param_groups, in the order DeepSpeed flattens them."""
        matrices, vectors = [self.vocab * self.hidden], []
        for _ in range(self.layers):
            matrices += self.layer_matrix_sizes()
            vectors += self.layer_vector_sizes()
        vectors.append(self.hidden)
        if not self.tied:
            matrices.append(self.vocab * self.hidden)
        return matrices, vectors

    def parameters(self) -> int:
        return sum(map(sum, self.parameter_sizes()))

    def idle_expert_elements(self) -> int:
        """Expert weights a token does not run through: (E - k) experts' gate_up and down in every layer. A MoE
        model's FLOPs per token follow its active parameters, parameters() minus these."""
        if not self.experts:
            return 0
        return self.layers * (self.experts - self.experts_per_token) * 3 * self.intermediate * self.hidden


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device by part; `gradients_held` says whether gradients stay through the step (else they
    belong to the step phase). `fits` against `device_bytes`; `advice` when it does not."""

    parts: dict[str, float]
    gradients_held: bool
    device_bytes: float | None
    advice: tuple[str, ...] = ()

    @property
    def phases(self) -> dict[str, float]:
        """Bytes alive only in the backward phase and only in the optimizer step."""
        step = sum(self.parts[name] for name in STEP_PARTS) + (0.0 if self.gradients_held else self.parts["gradients"])
        return {"backward": sum(self.parts[name] for name in BACKWARD_PARTS), "step": step}

    @property
    def total(self) -> float:
        """The peak: what is held through the step plus the larger phase."""
        phases = self.phases
        return sum(self.parts.values()) - sum(phases.values()) + max(phases.values())

    @property
    def fits(self) -> bool:
        return self.device_bytes is None or self.total <= self.device_bytes

    def describe(self) -> str:
        tags = {**dict.fromkeys(BACKWARD_PARTS, "backward"), **dict.fromkeys(STEP_PARTS, "step")}
        if not self.gradients_held:
            tags["gradients"] = "step"
        lines = [f"  {name:12} {value / GIB:8.2f} GiB  {tags.get(name, 'held')}" for name, value in self.parts.items()]
        phases = self.phases
        lines.append(f"  {'total':12} {self.total / GIB:8.2f} GiB per device (held + the larger of backward "
                     f"{phases['backward'] / GIB:.2f} and step {phases['step'] / GIB:.2f})")
        if self.device_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} in {self.device_bytes / GIB:.1f} GiB")
        lines.extend(f"  try: {item}" for item in self.advice)
        return "\n".join(lines)


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offload_device(ds_config: dict, what: str) -> str:
    """Where zero_optimization's `what` ("offload_param" or "offload_optimizer") sends its tensors: "cpu", "nvme",
    or "none"."""
    return ds_config.get("zero_optimization", {}).get(what, {}).get("device", "none")


def offloads_parameters(ds_config: dict) -> bool:
    """ZeRO-3 parameter offload to CPU: the weights live in host memory; each layer is copied to the device to run."""
    return offload_device(ds_config, "offload_param") == "cpu"


def offloads_optimizer(ds_config: dict) -> bool:
    """ZeRO optimizer offload (to CPU, or NVMe): the fp32 master weights and Adam's states live off the device."""
    return offload_device(ds_config, "offload_optimizer") != "none"


def trainable_groups(shape: ModelShape, lora: LoRAConfig | None) -> list[list[int]]:
    """Elements of each trainable parameter, by optimizer parameter group, in DeepSpeed's flattening order:
    LoRA's A (r x fan-in) and B (fan-out x r) of each adapted projection, all matrices (one group); else the
    model's matrices and vectors."""
    if lora is None:
        return list(shape.parameter_sizes())
    experts = ("gate_proj", "up_proj", "down_proj") if shape.experts else ()  # PEFT's to adapt: `lora_on_experts`
    targets = lora.adapted_projections
    per_layer = [size for name, (fan_in, fan_out) in shape.linear_shapes().items()
                 if name in targets and name not in experts for size in (lora.r * fan_in, fan_out * lora.r)]
    # all-linear also adapts a MoE layer's router, (experts x hidden), after its experts: A then B
    router = [lora.r * shape.hidden, shape.experts * lora.r] if lora.all_linear and shape.experts else []
    # PEFT's embedding adapter, before the layers: A (r x vocabulary) and B (hidden x r), tied or not
    embedding = [lora.r * shape.vocab, shape.hidden * lora.r] if "embed_tokens" in lora.target_modules else []
    head = [lora.r * shape.hidden, shape.vocab * lora.r] if "lm_head" in lora.target_modules else []  # after the layers
    return [embedding + (per_layer + lora_on_experts(shape, lora) + router) * shape.layers + head]


def lora_on_experts(shape: ModelShape, lora: LoRAConfig) -> list[int]:
    """A Qwen3-MoE layer's adapter elements on its experts, as PEFT makes them from target_modules gate_proj +
    up_proj (which it requires together) and down_proj: one adapter per fused 3-d weight, of rank r per expert
    (2 r for gate_up, two projections in one), A then B, gate_up before down."""
    if not shape.experts:
        return []
    gate_up, down = adapted_expert_weights(lora)
    h, i, er = shape.hidden, shape.intermediate, shape.experts * lora.r
    return ([2 * er * h, 2 * i * 2 * er] if gate_up else []) + ([er * i, h * er] if down else [])


def adapted_expert_weights(lora: LoRAConfig) -> tuple[bool, bool]:
    """Which of a MoE layer's fused expert weights PEFT adapts: (gate_up, down). gate_up needs both gate_proj
    and up_proj in target_modules (PEFT refuses one without the other), down needs down_proj."""
    targets = lora.adapted_projections
    return {"gate_proj", "up_proj"} <= targets, "down_proj" in targets


def decoder_layer_elements(shape: ModelShape) -> int:
    """Parameters of one decoder layer: its matrices (seven projections; or attention, experts and router) and
    its vectors (norm weights, biases)."""
    return sum(shape.layer_matrix_sizes()) + sum(shape.layer_vector_sizes())


def reduce_bucket_elements(shape: ModelShape, lora: LoRAConfig | None) -> int:
    """What "auto" means for DeepSpeed's reduce_bucket_size here: one decoder layer's parameters, or all the
    trainable elements where those are fewer (LoRA: one bucket per backward).

    ZeRO-2 and ZeRO-3 reduce gradients bucket by bucket, and each bucket costs host work (and, under ZeRO-2
    with overlap_comm, a device synchronize) whatever its size. transformers' rule, hidden^2, cuts a Qwen3-1.7B
    layer into a dozen buckets and a 4B LoRA policy's 33 M adapter elements into five. A layer is also the
    unit whole-layer ZeRO-3 gathers and whose gradients come ready together. The cost is memory: one buffer of
    this many elements under ZeRO-3 and ZeRO-1/2, two there with overlap_comm (the `buckets` part of the plan):
    ~100 MB for a 1.7B layer in bf16."""
    counted = sum(map(sum, trainable_groups(shape, lora)))
    # Adapters the planner does not count (lora.target_modules naming modules by path, e.g. "layers.0.self_attn.q_proj")
    # would make it 0, which DeepSpeed refuses: a layer's worth then
    return min(decoder_layer_elements(shape), counted) if counted else decoder_layer_elements(shape)


DEEPSPEED_SUB_GROUP_SIZE = 10**9  # DeepSpeed's default zero_optimization.sub_group_size (zero/config.py)


def sub_group_elements(shape: ModelShape, offload_optimizer: bool) -> int:
    """What "auto" means for ZeRO-3's sub_group_size here: one decoder layer's parameters; DeepSpeed's default
    (1e9) with optimizer offload.

    ZeRO-3 steps the optimizer one sub-group at a time (stage3.py: step), and for each it flattens the group's
    gradient partition and copies it to fp32 (`_prepare_fp32_grad_for_sub_group`), freeing both after the update.
    With DeepSpeed's default a Qwen3-1.7B on one GPU steps 1e9 elements at once: a 4 GB fp32 gradient and, for
    a moment, its 2 GB bf16 flat copy, on top of everything held; with gradient checkpointing that is the peak
    of a full fine-tune. Sub-groups of one layer leave the embedding as the largest (a parameter is never
    split): 1.7 GiB for the 1.7B on one GPU, 0.3 GiB per GPU on eight (Qwen3-8B: 6.2 -> 4.4 GiB on one, 5.7 ->
    1.4 GiB per GPU on eight), for a few dozen optimizer calls per step instead of a few. With optimizer offload
    the sub-groups are what DeepSpeed moves to and from the host and updates with its CPU Adam, where larger
    ones use the bandwidth better, so its default stays."""
    return DEEPSPEED_SUB_GROUP_SIZE if offload_optimizer else decoder_layer_elements(shape)


def optimizer_step_elements(groups: list[list[int]], ds_config: dict, world_size: int) -> int:
    """Trainable elements whose fp32 gradient the optimizer takes at once on the busiest rank (the `step` part).

    ZeRO-1/2 step each parameter group's 1/W slice in turn (stage_1_and_2.py), ZeRO-3 each sub-group: the
    parameters of a group in order, each padded to a multiple of W and divided, gathered until their
    partitions reach sub_group_size (stage3.py: `_create_fp16_sub_groups`), so a parameter longer than that
    (the embedding) is a sub-group of its own. Without ZeRO's optimizer (stage 0) every trainable element."""
    stage = zero_stage(ds_config)
    if stage == 0:
        return sum(map(sum, groups))
    if stage < 3:
        return max(math.ceil(sum(sizes) / world_size) for sizes in groups)
    limit = ds_config.get("zero_optimization", {}).get("sub_group_size", DEEPSPEED_SUB_GROUP_SIZE)
    largest = 0
    for sizes in groups:
        running = 0
        for size in sizes:
            running += math.ceil(size / world_size)
            if running >= limit:
                largest, running = max(largest, running), 0
        largest = max(largest, running)
    return largest


def bucket_bytes(ds_config: dict, dtype_bytes: int) -> float:
    """The gradient bucket buffers DeepSpeed allocates on the device: reduce_bucket_size elements of the
    gradient dtype, once under ZeRO-3 (at start-up), once under ZeRO-1 and 2 (each backward,
    stage_1_and_2.py: setup_buckets), twice there with overlap_comm."""
    zero = ds_config.get("zero_optimization", {})
    stage, elements = zero_stage(ds_config), zero.get("reduce_bucket_size", 5e8)
    if stage < 1 or not zero.get("contiguous_gradients", True) or not isinstance(elements, (int, float)):
        return 0.0
    buffers = 1 if stage == 3 else (2 if zero.get("overlap_comm", False) else 1)
    return float(buffers * elements * dtype_bytes)


def zero2_gradient_elements(groups: list[list[int]], world_size: int) -> int:
    """Gradient elements held by the ZeRO-2 rank that holds most. DeepSpeed's stage 2 gives each rank a 1/W
    slice of each flattened parameter group, but keeps the WHOLE gradient of every parameter that overlaps its
    slice (stage_1_and_2.py: get_partition_info, and copy_grads_in_partition's buffer of their full sizes), until
    the step cuts the slice out. So a rank holds its slice plus the rest of up to two straddling parameters, and
    a parameter longer than a slice (Qwen3's embedding, first of the matrices) is held whole by every rank whose
    slice it touches: on 2 ranks of a tied model whose embedding is half its parameters, rank 1 holds every
    gradient, rank 0 only the embedding's (measured in tests/test_planner.py). N_t / W would miss that."""
    held = [0] * world_size
    for sizes in groups:
        slice_elements = math.ceil(sum(sizes) / world_size)
        offset = 0
        for size in sizes:
            first, last = offset // slice_elements, min((offset + size - 1) // slice_elements, world_size - 1)
            for rank in range(first, last + 1):  # the ranks whose slice this parameter overlaps
                held[rank] += size
            offset += size
    return max(held)


def _gathers_attention(config: Config) -> bool:
    """Prefix sharing with a kernel other than flex: each layer's attention runs on the unshared sequences."""
    return config.data.prefix_sharing and config.model.attn_implementation != "flex_attention"


def _keeps_less(config: Config) -> bool:
    """model.lean_activations, or Liger's kernels, which keep the same tensors for backward (recompute_elementwise
    implies the lean ops); or compiled layers, whose partitioner keeps about what the lean ops keep (measured
    against autograd's saved bytes, tests/test_planner.py)."""
    return (config.model.lean_activations or config.model.liger_kernels or config.model.recompute_elementwise
            or config.model.compile)


def _layer_bytes_per_token(config: Config, shape: ModelShape, b: int) -> float:
    """What one decoder layer saves for backward per token (the module docstring lists each term). Gathered
    attention runs on the unshared sequences, as many tokens as the plan's worst case puts on the document."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # q_norm / k_norm (Qwen3) see q and k: without them (Qwen2.5) nothing of q and k is kept before rotary
    qk_normed = q + kv if shape.qk_norm else 0
    # The projections' copies of the two norms' outputs; a MoE layer's second norm feeds a frozen router (with
    # LoRA) and the experts' gather, which keep none; recompute_elementwise rebuilds them in backward
    kept_outputs = 0 if config.model.recompute_elementwise else 1 if shape.experts and config.lora is not None else 2
    if _keeps_less(config):  # each norm keeps its input as it is and one fp32 scale per row
        head_rows = shape.heads + shape.kv_heads if shape.qk_norm else 0
        norms = h * b * (2 + kept_outputs) + b * qk_normed + FP32 * (2 + head_rows)
    else:
        norms = 2 * h * FP32 + h * b * kept_outputs + FP32 * qk_normed
        if config.lora is None:  # the norm weights train: their gradient needs the normalised input
            norms += b * (2 * h + qk_normed)
    if shape.experts:  # the lean ops leave the experts as they are
        mlp = _routed_bytes_per_token(shape, b)
    else:  # lean: SiLU's output recomputed; recompute_elementwise: SiLU(gate) x up (down_proj's input) too
        mlp = (2 if config.model.recompute_elementwise else 3 if _keeps_less(config) else 4) * b * shape.intermediate
    packed_mask = config.data.packing and not config.data.prefix_sharing  # transformers' block-causal mask
    grouped = config.model.attn_implementation in ("flash_attention_2", "flex_attention") or (
        config.model.attn_implementation == "sdpa" and not packed_mask)  # no mask: KV heads as they are
    attention = b * (2 * q + 2 * kv) if grouped else b * 4 * q
    adapters = 0
    if config.lora is not None:
        for name, (fan_in, _) in shape.linear_shapes().items():
            if name in config.lora.adapted_projections:  # (all-linear's router adapter keeps r per token: left out)
                adapters += b * config.lora.r + ((b + 1) * fan_in if config.lora.dropout > 0 else 0)
    # Gathered attention's output is scattered back to the document: o_proj keeps that copy (sdpa and flash also
    # keep the unscattered output for their backward; eager's last matmul does not, so it keeps one copy in all)
    scattered = b * q if _gathers_attention(config) and config.model.attn_implementation != "eager" else 0
    return norms + attention + mlp + adapters + scattered


def _routed_bytes_per_token(shape: ModelShape, b: int) -> float:
    """What a Qwen3-MoE layer's router and experts save per token under transformers' default experts
    implementation (grouped_mm), beyond the norm output they read: the router's fp32 softmax (4 E) and top-k
    indices (8 k); per routed copy (k of them) the expert's input and output (2 b H), gate_up's output,
    SiLU(gate) and the product (4 b I), the routing weight (b) and three int64 token indices (24). The eager
    loop, transformers' fallback where grouped_mm cannot run, keeps one more b H per routed copy."""
    k = shape.experts_per_token
    return k * (2 * b * shape.hidden + 4 * b * shape.intermediate + b + 24) + FP32 * shape.experts + 8 * k


def _merged_expert_bytes(config: Config, shape: ModelShape, b: int) -> float:
    """PEFT's LoRA on a MoE layer's experts adds B A to each adapted 3-d weight in forward and autograd keeps
    that merged copy for backward: b E x 2I x H (gate_up) and b E x I x H (down) per layer, at any batch."""
    if config.lora is None or not shape.experts:
        return 0.0
    gate_up, down = adapted_expert_weights(config.lora)
    return (2 * gate_up + down) * shape.experts * shape.intermediate * shape.hidden * b


def _micro_batch(config: Config) -> tuple[int, int]:
    """(rows, tokens per row) of one padded micro-batch: chosen + rejected, plus mixed-in SFT rows."""
    sft_rows = math.ceil(config.training.batch_size * config.data.sft_ratio) if config.data.sft_files else 0
    return 2 * config.training.batch_size + sft_rows, config.training.max_seq_length


def activation_bytes(config: Config, shape: ModelShape, b: int, chunk_buffers: float = 0.0) -> float:
    """Bytes autograd holds at the start of backward for one micro-batch (the module docstring). With every layer
    checkpointed, the one layer recomputed at a time reuses up to `chunk_buffers` bytes: the log-prob chunks'
    buffers, freed before the first recompute (at 16k tokens the plan was one layer, +34%, high without this)."""
    one_layer, outside = _layer_and_outside_bytes(config, shape, b)
    if config.model.gradient_checkpointing:
        checkpointed = min(config.model.checkpointed_layers or shape.layers, shape.layers)
        rows, seq = _micro_batch(config)
        kept_inputs = rows * seq * checkpointed * shape.hidden * b
        if checkpointed == shape.layers:  # all layers: one layer's recompute at a time on top of the inputs
            return kept_inputs + max(one_layer - chunk_buffers, 0.0) + outside
        # the first K only: the other layers' full sets at the start of backward, gone before the first recompute
        return kept_inputs + (shape.layers - checkpointed) * one_layer + outside
    return shape.layers * one_layer + outside


def _layer_and_outside_bytes(config: Config, shape: ModelShape, b: int) -> tuple[float, float]:
    """What one decoder layer's forward saves for backward, and what is saved outside the layers (final norm,
    gathered hidden states, a shared causal mask), for one micro-batch."""
    rows, seq = _micro_batch(config)  # the rows attention runs on: with prefix sharing, gathered ones
    tokens = rows * seq  # prefix sharing's worst case (no shared prompt) runs as many
    if config.data.packing and not config.data.prefix_sharing:  # one row of all sequences
        rows, seq = 1, tokens
    per_sequence = {  # saved per row and layer, times seq^2 (flex keeps none, so its row layout does not matter)
        "sdpa": b if config.data.packing and not config.data.prefix_sharing else 0,  # the packed row's mask, per layer
        "eager": shape.heads * (FP32 + (b if b < FP32 else 0)),  # the fp32 softmax (and its copy below fp32)
        "flash_attention_2": 0,
        "flex_attention": 0,  # a block mask: a few bytes per 128 x 128 block
    }[config.model.attn_implementation]
    one_layer = tokens * _layer_bytes_per_token(config, shape, b) + rows * seq**2 * per_sequence
    one_layer += _merged_expert_bytes(config, shape, b)
    if _keeps_less(config):  # the final norm keeps its input and a scale; then the gathered states
        outside = tokens * (shape.hidden * 2 * b + FP32)
    else:
        outside = tokens * shape.hidden * (FP32 + b + (b if config.lora is None else 0))
    if _gathers_attention(config) and config.model.attn_implementation == "eager":  # its causal mask, all layers
        outside += seq**2 * b
    return one_layer, outside


def plan_memory(config: Config, shape: ModelShape, ds_config: dict, world_size: int, dtype_name: str,
                device_bytes: float | None, on_gpu: bool = True, with_advice: bool = True) -> MemoryPlan:
    """Per-device bytes of `config` on `world_size` ranks (see the module docstring for each term)."""
    b = DTYPE_BYTES[dtype_name]
    stage = zero_stage(ds_config)
    offload_params = offloads_parameters(ds_config)
    offload_optimizer = offloads_optimizer(ds_config)
    n = shape.parameters()
    groups = trainable_groups(shape, config.lora)
    trainable = sum(map(sum, groups))
    shard = lambda nbytes, divided: nbytes / world_size if divided else nbytes  # noqa: E731

    weights = 0.0 if offload_params else shard(n * b, stage == 3)
    if config.lora is not None:
        weights += trainable * b
    reference = 0.0
    if config.reference_mode == "model" and not config.reference.offload:
        reference = shard(n * b, stage == 3)
    from dpo_dist.logps import default_chunk_tokens, head_bytes_per_logit

    rows, seq = _micro_batch(config)
    tokens = rows * seq
    # compiled_head.py: the logits in the model's dtype, the fused kernels keep no temporary; eager: the fp32 logits
    # and one vocab-wide temporary (logps._chunk_token_stats' exp pass, WPO's sum p^2 included); PEFT's adapted
    # lm_head three logit-sized tensors while it adds
    adapted_head = config.lora is not None and "lm_head" in config.lora.target_modules
    bytes_per_logit = head_bytes_per_logit(config.model.compile, b, adapted_head)
    chunk = min(config.model.logps_chunk_tokens or default_chunk_tokens(shape.vocab, bytes_per_logit), tokens)
    logits = chunk * shape.vocab * bytes_per_logit
    head = shape.vocab * shape.hidden * b
    if config.lora is None:  # the lm_head's full-size gradient (twice while a later chunk's is added)
        logits += head * (2 if tokens > chunk else 1)
    # What ZeRO-3 gathers takes device memory on several ranks, or from offloaded partitions; one rank's gather
    # with its partition on the device is a view of it (DeepSpeed's NoGatherHandle: `.to` the same device)
    gathers = stage == 3 and (world_size > 1 or (offload_params and on_gpu))
    if gathers:  # the lm_head gathered whole for the chunks
        logits += head
    if stage == 2 and not offload_optimizer:  # the busiest rank's; at least N_t / W (W = 1: all of them)
        gradients = zero2_gradient_elements(groups, world_size) * b
    elif stage == 3 and offload_optimizer:  # ZeRO-3 keeps the gradient partitions where the optimizer is: `host_memory`
        gradients = 0.0
    else:
        gradients = shard(trainable * b, stage >= 2)
    parts = {
        "weights": weights,
        "gradients": gradients,
        "buckets": bucket_bytes(ds_config, b),
        "optimizer": 0.0 if offload_optimizer else shard(trainable * 12, stage >= 1),
        "reference": reference,
        "activations": activation_bytes(config, shape, b, chunk_buffers=chunk * shape.vocab * bytes_per_logit),
        # the layer running and the next one, prefetched, gathered whole
        "gathered": 2 * decoder_layer_elements(shape) * b if gathers else 0.0,
        "logits": logits,
        "step": 0.0 if offload_optimizer else step_bytes(groups, ds_config, world_size, b),
    }
    held = stage == 3 or config.training.gradient_accumulation_steps > 1
    if on_gpu:
        parts["overhead"] = 1.5 * GIB + 0.1 * MemoryPlan(parts, held, None).total
    plan = MemoryPlan(parts, held, device_bytes)
    if plan.fits or device_bytes is None or not with_advice:
        return plan
    return dataclasses.replace(plan, advice=tuple(_advice(config, shape, ds_config, world_size, dtype_name, device_bytes)))


def host_memory(config: Config, shape: ModelShape, ds_config: dict, world_size: int, dtype_name: str) -> dict[str, float]:
    """Bytes per rank that offload puts in HOST memory (the module docstring's "Host memory"), by part; empty
    without offload. Read from DeepSpeed 0.19's allocations: ZeRO-3 parameter offload keeps each rank's
    partition of the weights (stage3.py's flat pinned buffers, which the partitions then point into); optimizer
    offload keeps the fp32 master partition and Adam's two moments (12 bytes per trainable element / W) and the
    fp32 gradient partition (4), plus under ZeRO-3 the gradient partitions in the model dtype
    (`grad_partitions_flat_buffer`, there instead of on the device) and under ZeRO-1/2 a model-dtype copy of the
    partition, a buffer the size of the largest parameter, and with gradient accumulation the full gradient of
    every parameter overlapping the rank's slice (`accumulated_grads_in_cpu`, as `zero2_gradient_elements`). NVMe
    offload is not modeled (what it keeps in host memory is its swap buffers)."""
    b = DTYPE_BYTES[dtype_name]
    stage = zero_stage(ds_config)
    groups = trainable_groups(shape, config.lora)
    trainable = sum(map(sum, groups))
    parts = {}
    if offloads_parameters(ds_config):
        parts["weights"] = (shape.parameters() + (trainable if config.lora is not None else 0)) * b / world_size
    if config.reference_mode == "model" and config.reference.offload:
        parts["reference"] = shape.parameters() * b / world_size
    if offload_device(ds_config, "offload_optimizer") == "cpu":
        divided = trainable / world_size
        parts["optimizer"] = 12 * divided
        if stage == 3:
            parts["gradients"] = (FP32 + b) * divided
        else:
            largest = max(size for sizes in groups for size in sizes)
            accumulated = zero2_gradient_elements(groups, world_size) if config.training.gradient_accumulation_steps > 1 else 0
            parts["gradients"] = (FP32 + b) * divided + b * largest + b * accumulated
    return parts


@dataclass
class HostPlan:
    """`host_memory`'s parts (bytes per rank) on a node of `ranks_per_node` ranks, which share its host memory;
    `fits` against `host_bytes` (per node, None: not checked)."""

    parts: dict[str, float]
    ranks_per_node: int
    host_bytes: float | None = None

    @property
    def node_total(self) -> float:
        return sum(self.parts.values()) * self.ranks_per_node

    @property
    def fits(self) -> bool:
        return self.host_bytes is None or self.node_total <= self.host_bytes

    def describe(self) -> str:
        if not self.parts:
            return "  host memory: nothing offloaded"
        lines = ["  host memory (offloaded), per rank:"]
        lines += [f"    {name:10} {value / GIB:8.2f} GiB" for name, value in self.parts.items()]
        lines.append(f"  host total   {self.node_total / GIB:8.2f} GiB per node ({self.ranks_per_node} rank(s); plus each "
                     "process's own libraries and CUDA context, and the data)")
        if self.host_bytes is not None:
            lines.append(f"  {'fits' if self.fits else 'does NOT fit'} in {self.host_bytes / GIB:.1f} GiB of host memory")
        return "\n".join(lines)


def step_bytes(groups: list[list[int]], ds_config: dict, world_size: int, b: int) -> float:
    """The optimizer step's own memory on the device: the fp32 gradient of the elements it takes at once
    (`optimizer_step_elements`); under ZeRO with 2-byte gradients also their flattened copy, alive with it for
    a moment before the fp32 conversion (a 4-byte gradient is flattened straight into the fp32 one). The fused
    AdamW the engine builds (engine.fused_adamw_supported) updates in place and adds nothing; torch's foreach
    one would add 4 bytes per element, its per-tensor one 8."""
    elements = optimizer_step_elements(groups, ds_config, world_size)
    flattened = b if zero_stage(ds_config) >= 1 and b < FP32 else 0
    return float(elements * (FP32 + flattened))


def single_rank_note(ds_config: dict, world_size: int, on_gpu: bool, lora: bool) -> str | None:
    """A line for a ZeRO-2 or ZeRO-3 run on one process without parameter offload, else None.

    One rank shards nothing: it holds every parameter, gradient and optimizer state whatever the stage, and
    this planner puts ZeRO-1, 2 and 3 within 8% of one another there. ZeRO-3 still gathers and releases each
    layer in hooks on every forward and backward: on the 28-layer one-rank CPU bench a step took 0.68-0.77 s
    against 0.38-0.39 s under ZeRO-2, with the same losses and peak memory within 2%; on an H200 (Qwen3-1.7B
    full, compiled layers) ZeRO-2 with overlap_comm ran 1.76x the tokens/s, and ZeRO-1 1.24x that in another
    session's call. ZeRO-2 also copies every backward's gradients through its reduce buckets into an
    accumulation buffer, where ZeRO-1 lets autograd accumulate them in .grad: on the H200 ZeRO-1 took 4% less
    memory (ZeRO-3's) than ZeRO-2 as the engine runs it on one process (no overlap_comm, no synchronizing timer),
    at the same speed (39,214 against 40,092 tokens/s in one call; with DeepSpeed's timer synchronizing both, an
    earlier session measured ZeRO-1 1.06x faster, within the spread). Not so for LoRA, whose adapters' gradients
    are few (the 4B LoRA step took the same time and memory under both), nor on CPU, where the 28-layer bench could
    not tell the two apart in speed and the buffer is host memory among much else: those ZeRO-2 runs get no note.
    The steps are the same (bit for bit on CPU, fp32 and bf16: tests/test_engine.py; on CUDA the same kernels
    on another stream), unless the file sets `data_types.grad_accum_dtype` (ZeRO-2 then accumulates in that
    dtype, bf16 ZeRO-1 becomes DeepSpeed's BF16_Optimizer) or a `gradient_predivide_factor` (applied per
    micro-batch under ZeRO-2, once per step under ZeRO-1): no note then either. Parameter offload is the one
    thing ZeRO-3 adds on one rank, so a run using it gets no note; nor does a ZeRO-2 run with its optimizer
    offloaded (OpenRLHF's --adam_offload), which the suite tests under ZeRO-2 only."""
    stage = zero_stage(ds_config)
    if world_size != 1 or offloads_parameters(ds_config) or stage not in (2, 3):
        return None
    if stage == 3:
        return ("ZeRO-3 on one process shards nothing and still gathers each layer in hooks: "
                "deepspeed.config=ds_configs/zero1.json trains the same steps without them (on an H200, Qwen3-1.7B "
                "full with compiled layers: ZeRO-2 ran 1.76x ZeRO-3's tokens/s, ZeRO-1 1.24x that, in ZeRO-3's "
                "memory)")
    arithmetic_differs = "grad_accum_dtype" in (ds_config.get("data_types") or {}) or \
        ds_config.get("gradient_predivide_factor", 1.0) != 1.0
    if not on_gpu or lora or offloads_optimizer(ds_config) or arithmetic_differs:
        return None
    return ("ZeRO-2 on one process partitions nothing and still copies every backward's gradients through its reduce "
            "buckets into a second buffer: deepspeed.config=ds_configs/zero1.json trains the same steps without it "
            "(on an H200, Qwen3-1.7B full with compiled layers: 4% less memory at the same speed)")


def device_memory_bytes(device: torch.device) -> float | None:
    """Memory free on a CUDA device now (`torch.cuda.mem_get_info`); None elsewhere (a CPU run has no device
    limit to check against). Trainer.setup asks before any tensor of this run is on the GPU, so what is
    missing from the total is what other processes hold (another job, a leftover process), plus the CUDA
    context this process made when it chose its device (a few hundred MB), which the plan's `overhead`
    counts as well: the check errs by that much on the safe side."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return float(free)


def check_memory(config: Config, shape: ModelShape, ds_config: dict, world_size: int, dtype_name: str,
                 device_bytes: float | None) -> MemoryPlan | None:
    """The trainer's check before any weights load: a `UserError` with the planner's advice when the plan
    does not fit `device_bytes` (the GPU memory free to this run, `device_memory_bytes`). Skipped on CPU
    (None) and with training.memory_check=false."""
    if device_bytes is None or not config.training.memory_check:
        return None
    plan = plan_memory(config, shape, ds_config, world_size, dtype_name, device_bytes)
    if plan.fits:
        return plan
    parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in plan.parts.items() if value >= 0.05 * GIB)
    raise UserError(
        f"the memory planner puts this run at {plan.total / GIB:.1f} GiB per device ({parts} GiB), more than the "
        f"{device_bytes / GIB:.1f} GiB free on the device; try: {'; '.join(plan.advice)}. launch/plan.py prints the plan; "
        "training.memory_check=false starts anyway"
    )


def host_available_bytes() -> float | None:
    """The host memory the kernel could give without swapping (/proc/meminfo's MemAvailable); None where unknown."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(config: Config, shape: ModelShape, ds_config: dict, world_size: int, dtype_name: str,
                      ranks_per_node: int, available_bytes: float | None) -> None:
    """The trainer's check of what offload puts in host memory (`host_memory`, times the node's ranks, which share
    it) against `available_bytes` (MemAvailable at start); a `UserError` when it cannot fit. GPU runs only (on CPU
    the device plan is not checked either), skipped with training.memory_check=false. It errs on the permissive
    side: each process's own libraries and CUDA context are not counted."""
    if available_bytes is None or not config.training.memory_check:
        return
    plan = HostPlan(host_memory(config, shape, ds_config, world_size, dtype_name), ranks_per_node, available_bytes)
    if plan.fits:
        return
    listed = ", ".join(f"{name} {value / GIB:.1f}" for name, value in plan.parts.items())
    raise UserError(
        f"offload puts {plan.node_total / GIB:.1f} GiB in host memory on this node ({ranks_per_node} rank(s) x {listed} GiB each), more "
        f"than the {available_bytes / GIB:.1f} GiB available; spread the run over more nodes (each holds 1/W of it), "
        "offload less (offload_param / offload_optimizer in the DeepSpeed config), or use NVMe offload. launch/plan.py "
        "--host-mem prints the plan; training.memory_check=false starts anyway"
    )


def _fewest_checkpointed_layers(config: Config, shape: ModelShape, ds_config: dict, world_size: int, dtype_name: str,
                                device_bytes: float) -> int | None:
    """The fewest checkpointed layers (model.checkpointed_layers), fewer than all and more than now, with which the
    run fits; None if no such number (all layers needed, or none fits)."""
    model = config.model
    if model.gradient_checkpointing and model.checkpointed_layers is None:
        return None  # every layer is checkpointed already
    start = model.checkpointed_layers + 1 if model.gradient_checkpointing else 1
    for count in range(start, shape.layers):
        changed = dataclasses.replace(config, model=dataclasses.replace(model, gradient_checkpointing=True, checkpointed_layers=count))
        if plan_memory(changed, shape, ds_config, world_size, dtype_name, device_bytes, with_advice=False).fits:
            return count
    return None


def _shipped_ds_config(name: str, config: Config, shape: ModelShape, world_size: int, dtype_name: str) -> dict:
    """ds_configs/`name` filled for this run as the trainer would fill it: advice that names a shipped file is
    checked with that file, not with the user's own config edited (which may keep offload or other keys)."""
    from dpo_dist.engine import fill_ds_config, read_ds_config  # engine imports this module

    return fill_ds_config(read_ds_config(f"ds_configs/{name}"), config.training, getattr(torch, dtype_name), shape,
                          world_size, config.lora)


def _advice(config: Config, shape: ModelShape, ds_config: dict, world_size: int, dtype_name: str, device_bytes: float):
    """Single changes that would make the run fit, each checked by re-planning what the user would run."""
    zero = ds_config.get("zero_optimization", {})
    layer_sub_groups = sub_group_elements(shape, offloads_optimizer(ds_config))
    zero3 = _shipped_ds_config("zero3.json", config, shape, world_size, dtype_name)
    offload = _shipped_ds_config("zero3_offload.json", config, shape, world_size, dtype_name)
    training = config.training
    candidates = []
    if zero_stage(ds_config) == 3 and zero.get("sub_group_size", DEEPSPEED_SUB_GROUP_SIZE) > layer_sub_groups:
        candidates.append(('"sub_group_size": "auto" under zero_optimization in the DeepSpeed config (one decoder layer)',
                           config, {**ds_config, "zero_optimization": {**zero, "sub_group_size": layer_sub_groups}}, world_size))
    candidates += [
        ("model.gradient_checkpointing=true", dataclasses.replace(config, model=dataclasses.replace(config.model, gradient_checkpointing=True)), ds_config, world_size),
        ("deepspeed.config=ds_configs/zero3.json", config, zero3, world_size),
        ("reference.mode=precomputed (launch/precompute_ref.py first)", dataclasses.replace(config, reference=dataclasses.replace(config.reference, mode="precomputed")), ds_config, world_size),
        (f"deepspeed.config=ds_configs/zero3_offload.json (then {sum(host_memory(config, shape, offload, world_size, dtype_name).values()) / GIB:.1f} "
         "GiB of host memory per rank)", config, offload, world_size),
        ("twice as many GPUs", config, ds_config, 2 * world_size),
    ]
    if training.batch_size % 2 == 0:  # the same pairs per optimizer step, in micro-batches half the size
        halved = dataclasses.replace(training, batch_size=training.batch_size // 2,
                                     gradient_accumulation_steps=2 * training.gradient_accumulation_steps)
        candidates.insert(-1, (f"training.batch_size={halved.batch_size} "
                               f"training.gradient_accumulation_steps={halved.gradient_accumulation_steps}",
                               dataclasses.replace(config, training=halved), ds_config, world_size))
    fewest = _fewest_checkpointed_layers(config, shape, ds_config, world_size, dtype_name, device_bytes)
    if fewest is not None:
        partial = dataclasses.replace(config.model, gradient_checkpointing=True, checkpointed_layers=fewest)
        candidates.insert(0, (f"model.gradient_checkpointing=true model.checkpointed_layers={fewest} (the fewest of "
                              f"{shape.layers} that fit)", dataclasses.replace(config, model=partial), ds_config, world_size))
    advice = []
    for label, changed, changed_ds, ranks in candidates:
        if config.dpo.reference_free and "reference" in label:
            continue
        if plan_memory(changed, shape, changed_ds, ranks, dtype_name, device_bytes, with_advice=False).fits:
            advice.append(label)
    return advice or ["no single change fits: combine ZeRO-3 offload, gradient checkpointing, a precomputed reference and more GPUs"]
