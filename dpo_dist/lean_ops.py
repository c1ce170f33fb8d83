"""Decoder ops that keep less for backward (`model.lean_activations`): the same forward, bit for bit.

Without gradient checkpointing, what autograd saves in each decoder layer is most of a step's memory.
Two ops of the Qwen2/Qwen3 decoder save more than their backward needs:
- RMSNorm upcasts its input to fp32 and autograd keeps that fp32 copy (4 bytes per element; with a
  trainable weight also the normalised bf16 copy). `RMSNormFunction` keeps the input in its own dtype
  and one fp32 scale per row, and recomputes the normalised input in backward.
- The MLP's SiLU keeps its input, and the product SiLU(gate) x up keeps SiLU's output as well as `up`.
  `SiluMulFunction` keeps gate and up only and recomputes SiLU in backward (with autograd's own kernel).
In bf16 that is 2 bytes less per element of each norm's input, 2 per q/k element (their head norms),
and one intermediate-size tensor per MLP: about a quarter of a Qwen3-4B layer's saved activations.
In fp32 the norms save nothing (their input already is fp32); the MLP still saves its quarter.

`apply_lean_activations` swaps the forward of those modules in place; hooks on them (ZeRO-3's gathers,
PEFT's adapters on the projections) are untouched.

`model.recompute_elementwise` goes one step further: two tensors the projections keep for their own
backward are cheap elementwise functions of tensors the lean ops keep anyway: each norm's output (the
input of q/k/v or gate/up, from the norm's input) and SiLU(gate) x up (the input of down_proj, from gate
and up). Inside `ElementwiseRecompute.hooks()` (entered around the policy's decoder forward) autograd
stores a recipe for them instead of the tensor, and backward rebuilds them: about another quarter of a
layer's saved activations, for a few elementwise passes per layer in backward.

`apply_liger_kernels` (`model.liger_kernels`, CUDA) swaps the same modules to Liger-Kernel's Triton
kernels instead, which keep the same tensors for backward (input + fp32 scale per row for the norm; gate
and up for the MLP) and also fuse each op's elementwise passes into one kernel; plus Liger's rotary
embedding. On an H200, one micro-batch of 2 x 2 x 2,048 tokens in plain PyTorch (bench/decoder_ceiling.py)
took 672 ms instead of 898 (Qwen3-4B, LoRA) and 241 instead of 366 (Qwen3-1.7B, full-parameter).
"""

from __future__ import annotations

import sys
import types
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dpo_dist.errors import UserError


class RMSNormFunction(torch.autograd.Function):
    """weight * (x / rms(x)), computed as transformers' Qwen RMSNorm computes it, saving x and 1/rms(x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.float32)
        inverse_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, inverse_rms)
        return weight * (x32 * inverse_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, weight, inverse_rms = ctx.saved_tensors
        normalised = x.to(torch.float32) * inverse_rms
        grad_weight = None
        if ctx.needs_input_grad[1]:  # d/dweight of weight * normalised, summed over every token
            grad_weight = (grad_output * normalised.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_normalised = (grad_output * weight).to(torch.float32)
        # d/dx of x * r(x) with r = 1/rms: r * (g - x_hat * mean(g * x_hat)), x_hat = x * r
        grad_x = inverse_rms * (grad_normalised - normalised * (grad_normalised * normalised).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class SiluMulFunction(torch.autograd.Function):
    """SiLU(gate) * up, saving gate and up only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_up = grad_output * F.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad_output * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def rms_norm_rebuild(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNormFunction's forward as plain ops: the same result bit for bit."""
    x32 = x.to(torch.float32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def silu_mul_rebuild(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class ElementwiseRecompute:
    """Saved-tensor hooks that store a recipe instead of a tensor for outputs the swapped forwards
    registered (`remember`), and rebuild them when backward unpacks them (`model.recompute_elementwise`).

    The projections save a view of the registered output (a linear layer flattens its input to 2-D), so
    a saved tensor is matched by its storage, and the rebuilt output is viewed the same way. A recipe
    holds tensors autograd keeps anyway (the norm's input, gate and up) plus a copy of the norm's weight
    (hidden-size elements, copied at forward time so that backward needs no ZeRO-3 gather of it).
    Registration happens only inside `hooks()` with gradients on; everything else passes through."""

    def __init__(self):
        self.recording = False
        self._recipes: dict[int, tuple] = {}  # storage address -> (the output, weakly; rebuild; its inputs)

    def remember(self, output: torch.Tensor, rebuild, *inputs) -> torch.Tensor:
        if self.recording and output.requires_grad:
            self._recipes[output.untyped_storage().data_ptr()] = (weakref.ref(output), rebuild, inputs)
        return output

    def pack(self, tensor: torch.Tensor):
        entry = self._recipes.get(tensor.untyped_storage().data_ptr())
        if entry is None or entry[0]() is None:  # not registered, or a dead output's address reused
            return tensor
        _, rebuild, inputs = entry
        return rebuild, inputs, tensor.size(), tensor.stride(), tensor.storage_offset()

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        rebuild, inputs, size, stride, offset = packed
        return rebuild(*inputs).as_strided(size, stride, offset)

    @contextmanager
    def hooks(self):
        self.recording = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            self.recording = False
            self._recipes = {}


RECOMPUTE = ElementwiseRecompute()  # the swapped forwards register with this one; SequenceLogps enters its hooks


def _remember_norm(module: nn.Module, hidden_states: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    if not RECOMPUTE.recording:
        return output
    return RECOMPUTE.remember(output, rms_norm_rebuild, hidden_states, module.weight.detach().clone(), module.variance_epsilon)


def _swapped_forwards(rms_norm, silu_mul):
    """The RMSNorm and MLP forwards around kernels `rms_norm(x, weight, eps)` and `silu_mul(gate, up)`, registering
    their outputs for `model.recompute_elementwise` (rebuilt there with the plain-op formulas)."""

    def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _remember_norm(self, hidden_states, rms_norm(hidden_states, self.weight, self.variance_epsilon))

    def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(RECOMPUTE.remember(silu_mul(gate, up), silu_mul_rebuild, gate, up))

    return rms_norm_forward, mlp_forward


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and hasattr(module, "weight")


def _is_silu_mlp(module: nn.Module) -> bool:
    names = ("gate_proj", "up_proj", "down_proj", "act_fn")
    # transformers' SiLU is its own class (SiLUActivation), torch's nn.SiLU elsewhere: matched by name
    return all(hasattr(module, name) for name in names) and type(module.act_fn).__name__ in ("SiLU", "SiLUActivation")


def _swap_forwards(model: nn.Module, rms_norm_forward, mlp_forward) -> int:
    swapped = 0
    for module in model.modules():
        if _is_rms_norm(module):
            module.forward = types.MethodType(rms_norm_forward, module)
            swapped += 1
        elif _is_silu_mlp(module):
            module.forward = types.MethodType(mlp_forward, module)
            swapped += 1
    return swapped


def apply_lean_activations(model: nn.Module) -> int:
    """Swap in the lean forward of every RMSNorm and SiLU-gated MLP of `model`; returns how many modules."""
    return _swap_forwards(model, *_swapped_forwards(RMSNormFunction.apply, SiluMulFunction.apply))


def _liger_functions():
    """Liger-Kernel's autograd functions, or one clear error saying what is missing."""
    if not torch.cuda.is_available():
        raise UserError("model.liger_kernels=true needs a CUDA GPU: Liger-Kernel's kernels are written in Triton. "
                        "Use model.lean_activations=true on this machine")
    try:
        from liger_kernel.ops import LigerRMSNormFunction, LigerSiLUMulFunction
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError as err:
        raise UserError(f"model.liger_kernels=true: Liger-Kernel is not importable ({err}). "
                        "Install it (pip install liger-kernel) or set model.liger_kernels=false") from None
    return LigerRMSNormFunction, LigerSiLUMulFunction, liger_rotary_pos_emb


def apply_liger_kernels(model: nn.Module) -> int:
    """Swap every RMSNorm and SiLU-gated MLP of `model` to Liger's kernels, and the rotary embedding of its
    attention modules' transformers module; returns how many modules were swapped.

    Norm settings are those Liger itself uses for Qwen2/Qwen3 (no weight offset, Llama casting: fp32 math,
    output cast back before the weight). The rotary embedding is a module-level function in transformers
    (each attention forward looks it up by name), so it is replaced for that model family in this process:
    every model of the family built in this process afterwards uses it too, which in a training process
    means the policy and its reference, both configured alike."""
    rms_norm, silu_mul, rotary = _liger_functions()
    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            family = sys.modules[type(module).__module__]
            if hasattr(family, "apply_rotary_pos_emb"):
                family.apply_rotary_pos_emb = rotary
    # With model.recompute_elementwise the rebuilds are the plain-op formulas: equal to Liger's outputs up
    # to bf16 rounding, and used only for the projections' weight gradients.
    forwards = _swapped_forwards(lambda x, weight, eps: rms_norm.apply(x, weight, eps, 0.0, "llama", True, None),
                                 silu_mul.apply)
    return _swap_forwards(model, *forwards)
