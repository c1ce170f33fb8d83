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
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


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


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and hasattr(module, "weight")


def _is_silu_mlp(module: nn.Module) -> bool:
    names = ("gate_proj", "up_proj", "down_proj", "act_fn")
    # transformers' SiLU is its own class (SiLUActivation), torch's nn.SiLU elsewhere: matched by name
    return all(hasattr(module, name) for name in names) and type(module.act_fn).__name__ in ("SiLU", "SiLUActivation")


def apply_lean_activations(model: nn.Module) -> int:
    """Swap in the lean forward of every RMSNorm and SiLU-gated MLP of `model`; returns how many modules."""
    swapped = 0
    for module in model.modules():
        if _is_rms_norm(module):
            module.forward = types.MethodType(_rms_norm_forward, module)
            swapped += 1
        elif _is_silu_mlp(module):
            module.forward = types.MethodType(_mlp_forward, module)
            swapped += 1
    return swapped
