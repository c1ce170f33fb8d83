"""The log-prob head's vocabulary-wide math as compiled kernels, for `model.compile`.

Each chunk of the head (`logps._chunk_token_stats`) passes over a (n, 151,936) logits buffer several times. In
eager PyTorch every op is a pass of its own, in fp32: the bf16 matmul output's fp32 copy, the max, the exp, the
sum, the mean, the entropy's row-wise dot, and in backward the recompute's logsumexp and the softmax gradient's
sub, exp and mul. On an H200 two of them alone, the entropy's dot (37 ms for ~20 GB: a ninth of the bandwidth)
and the softmax gradient's sub and exp (42 ms), were ~8.5% of a compiled 1.7B ZeRO-2 step's kernel time
(bench/RESULTS.md, fifth GPU session).
Compiled, the same math is three kernels, each reading the logits once in the model's dtype:

- `log_normalizer`: the logsumexp (the only one that reaches the gradient);
- `token_metric_stats`: the per-token metrics (mean logit, entropy, argmax) from one read; WPO's sum p^2
  (`log_sum_squares`) from another where asked for;
- `softmax_gradient_`: d log p(t) / d logit, written over the logits in place, in their dtype.

No fp32 copy of the logits is made and no vocabulary-wide temporary: a bf16 chunk holds 2 bytes per logit against
the eager head's 8 (fp32 logits and an fp32 exp pass), so the default chunk (`logps.default_chunk_tokens`) is 4x
as many tokens in the same memory. The policy, its
recompute and the reference all take the normaliser from the same compiled graph, so a policy and a reference
that produce the same logits get the same log-probs, bit for bit (a chunk of exactly one token has a graph of its
own, whose sums may round differently in the last bit: where the policy's and the reference's chunks are cut
differently, e.g. with SFT rows mixed in, such a token can differ by an fp32 ulp). Pure functions of tensors,
compiled with the decoder layers' inductor options (deterministic reductions), dynamic in the number of tokens:
one graph each for every chunk size of two or more (`compiled`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from dpo_dist.models import inductor_options


def log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """(n, V) logits of any float dtype -> (n,) fp32 logsumexp."""
    return torch.logsumexp(logits.float(), dim=-1)


def _probabilities(logits: torch.Tensor, log_normalizer: torch.Tensor) -> torch.Tensor:
    """(n, V) logits of any float dtype and their (n,) normaliser -> (n, V) softmax in fp32 (fused into the caller's
    kernel when compiled)."""
    return (logits.float() - log_normalizer.unsqueeze(-1)).exp()


def token_metric_stats(logits: torch.Tensor, targets: torch.Tensor, log_normalizer: torch.Tensor) -> torch.Tensor:
    """(n, V) logits, (n,) targets and their normaliser -> the (n, 3) per-token metrics of `logps._chunk_token_stats`:
    mean logit, entropy in nats, 1.0 where the target is the first maximum."""
    logits = logits.float()
    probs = _probabilities(logits, log_normalizer)
    entropy = log_normalizer - (probs * logits).sum(dim=-1)
    return torch.stack([logits.mean(dim=-1), entropy, (logits.argmax(dim=-1) == targets).float()], dim=-1)


def log_sum_squares(logits: torch.Tensor, log_normalizer: torch.Tensor) -> torch.Tensor:
    """(n, V) logits and their normaliser -> (n,) log sum_v p_v^2 (WPO's)."""
    probs = _probabilities(logits, log_normalizer)
    return (probs * probs).sum(dim=-1).log()


def softmax_gradient_(logits: torch.Tensor, targets: torch.Tensor, log_normalizer: torch.Tensor,
                      grad: torch.Tensor) -> None:
    """Overwrite (n, V) logits with grad * d log softmax(logits)[target] / d logits = grad * (1[v = t] - p_v),
    computed in fp32 and stored in the logits' dtype (as autograd's cast back through `.float()` would)."""
    upstream = grad.unsqueeze(-1)
    gradient = -_probabilities(logits, log_normalizer) * upstream
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    gradient = torch.where(vocab == targets.unsqueeze(-1), gradient + upstream, gradient)
    logits.copy_(gradient)


@functools.cache
def compiled(function):
    """`function` compiled once per process: static in the vocabulary, dynamic in the token count (dim 0 of every
    tensor argument). Under `dynamic=True` dynamo would make the vocabulary size symbolic too. A dynamic dim also
    makes the tensor's storage offset symbolic, and dynamo specializes offsets 0 and 1 like sizes: callers pass
    fresh tensors. Call it without grad: grad mode is part of what a graph is specialized on, and the policy's
    forward, its recompute in backward and the reference's forward all call `log_normalizer`. Each function
    compiles one graph per logits dtype, and one more for a chunk of exactly 1 token (dynamo specializes sizes 0
    and 1): within dynamo's limit of 8 per function, past which it would run the function eagerly, unfused."""
    graph = torch.compile(function, dynamic=False, options=inductor_options())

    @functools.wraps(function)
    def call(*tensors: torch.Tensor):
        for tensor in tensors:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return graph(*tensors)

    return call


class CompiledTargetLogProb(torch.autograd.Function):
    """`logps.TargetLogProb` for logits of any float dtype, its backward one compiled kernel over the saved logits
    (which nothing else may need afterwards, as there; backward runs once)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, log_normalizer: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, targets, log_normalizer)
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float() - log_normalizer

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, log_normalizer = ctx.saved_tensors
        # A fresh copy: the upstream gradient can arrive as a slice or an expanded scalar (strides 0)
        compiled(softmax_gradient_)(logits, targets, log_normalizer, grad.clone(memory_format=torch.contiguous_format))
        return logits, None, None


def chunk_token_stats(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, token_metrics: bool = False,
                      probability_weights: bool = False):
    """`logps._chunk_token_stats` with the vocabulary-wide math compiled; the same outputs. The extras come after
    the log-probs, so a checkpoint's recomputation stops before them (see there)."""
    logits = lm_head(hidden)  # (n, V) in the model's dtype: no fp32 copy
    detached = logits.detach()
    targets = targets.clone()  # a chunk's are a slice of the batch's, at an offset
    with torch.no_grad():
        normalizer = compiled(log_normalizer)(detached)
    target_logps = CompiledTargetLogProb.apply(logits, targets, normalizer)
    stats = sum_squares = None
    with torch.no_grad():
        if token_metrics:
            stats = compiled(token_metric_stats)(detached, targets, normalizer)
        if probability_weights:
            sum_squares = compiled(log_sum_squares)(detached, normalizer)
    return target_logps, stats, sum_squares
