"""One autograd function per LoRA projection (`lora.fused`): base + adapter in two GEMMs and one epilogue.

PEFT computes a LoRA linear as `base(x) + lora_B(lora_A(dropout(x))) * scaling`: three module calls, a
scaling pass over the output and an add that writes a second output-sized tensor, and as many elementwise
passes again in backward, for each of the 7 projections of each layer. On an H200 the LoRA policy's
forward of a Qwen3-4B micro-batch took 300 ms against 175 ms for the same model with the adapter off
(bench/RESULTS.md, decoder ceiling).
`LoRALinearFunction` computes the same function as `x W^T + b`, then adds `scaling * (x A^T) B^T`
into that output inside the second GEMM (`addmm_`'s epilogue); backward is written out likewise. It
keeps what PEFT's graph keeps (x, and the rank-r `x A^T`), for frozen base weights only (LoRA's case).

Swapped into each PEFT `lora.Linear`'s forward: a layer falls back to PEFT's own forward whenever the
fused form does not apply (adapter disabled or merged, several active adapters, DoRA or another
variant, adapter bias, dropout, per-call adapter names), so the adapter reference and exports are
untouched. The swap bypasses the calls into `base_layer`, `lora_A` and `lora_B`, so it must not be used
where hooks on those submodules matter: ZeRO-3 with per-submodule gathering (refused there); with
whole-layer gathering the decoder layer's hook has gathered every weight it reads.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinearFunction(torch.autograd.Function):
    """(x, W, b, A, B, scaling) -> x W^T + b + scaling (x A^T) B^T, with W and b frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        down = flat @ lora_a.t()  # (N, r)
        out = F.linear(flat, weight, bias)
        out.addmm_(down, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, down)
        ctx.scaling = scaling
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, weight, lora_a, lora_b, down = ctx.saved_tensors
        scaling = ctx.scaling
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_down = grad @ lora_b  # (N, r): the gradient reaching x A^T, before scaling
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight
            grad_x.addmm_(grad_down, lora_a, alpha=scaling)
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[3]:
            grad_a = torch.mm(grad_down.t(), x.reshape(-1, x.shape[-1])).mul_(scaling)
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(grad.t(), down).mul_(scaling)
        return grad_x, None, None, grad_a, grad_b, None


def _fused_form(layer: nn.Module, kwargs: dict) -> tuple | None:
    """(A, B, scaling) of the one active plain adapter, or None where PEFT's own forward must run."""
    if kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if getattr(layer, "lora_bias", {}).get(name, False) or not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    base = layer.get_base_layer()
    if not isinstance(base, nn.Linear) or getattr(layer, "fan_in_fan_out", False) or base.weight.requires_grad:
        return None
    return layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    form = None if args else _fused_form(self, kwargs)
    if form is None:
        return self._peft_forward(x, *args, **kwargs)
    lora_a, lora_b, scaling = form
    base = self.get_base_layer()
    if not x.dtype == base.weight.dtype == lora_a.dtype == lora_b.dtype:  # PEFT casts between them; we do not
        return self._peft_forward(x, *args, **kwargs)
    return LoRALinearFunction.apply(x, base.weight, base.bias, lora_a, lora_b, scaling)


def fused_lora_layers(model: nn.Module) -> int:
    """How many LoRA layers of `model` carry the fused forward (`fuse_lora_layers` keeps PEFT's as `_peft_forward`)."""
    return sum(1 for module in model.modules() if hasattr(module, "_peft_forward"))


def fuse_lora_layers(model: nn.Module) -> int:
    """Swap the fused forward into every PEFT LoRA linear layer of `model`; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    fused = 0
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
    return fused
