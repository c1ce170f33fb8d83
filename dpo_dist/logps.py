"""Sequence log-probs of completions from a causal LM, without a [batch, seq, vocab] logits tensor.

Qwen's vocabulary is 151,936 tokens: full fp32 logits for a 2 x 2 x 2048 batch are 5 GB, and a
log-softmax over them doubles it. Instead the decoder runs once, the hidden states of the positions
that predict completion tokens are gathered (prompt and padding are never projected), and the
lm_head + logsumexp run over chunks of `chunk_tokens` of them. With gradients on, each chunk is
checkpointed: only its hidden states are kept and its logits are recomputed in backward, so peak
logits memory is one chunk's vocabulary-wide buffers (`default_chunk_tokens`: fp32 logits and a temporary
eager, the logits alone in the model's dtype compiled), in forward and backward alike.

`SequenceLogps` is an `nn.Module` around the causal LM so that DeepSpeed sees one root module
(its ZeRO-3 hooks gather the lm_head on every chunk call, including the recomputation). Chosen and
rejected go through it in ONE forward: the batch is [chosen rows; rejected rows].
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpo_dist import compiled_head as compiled_head_lib
from dpo_dist import prefix_sharing
from dpo_dist.data import PairBatch
from dpo_dist.lean_ops import RECOMPUTE
from dpo_dist.losses import router_balance_loss
from dpo_dist.models import has_compiled_layers


@dataclass
class PairLogps:
    """Per-pair outputs of one concatenated forward; every tensor is (B,)."""

    chosen_logps: torch.Tensor  # sum of log p(token) over the chosen completion
    rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor  # completion token counts
    rejected_tokens: torch.Tensor
    sft_logps: torch.Tensor | None = None  # (S,) for the SFT rows mixed into the batch, if any
    sft_tokens: torch.Tensor | None = None
    router_loss: torch.Tensor | None = None  # () a MoE policy's load-balancing loss, when asked for (SequenceLogps.router_top_k)
    # WPO (dpo.use_weighting, SequenceLogps.probability_weights): log of each completion's weight, the mean over
    # its tokens of log p(token) - log sum_v p_v^2; detached
    chosen_log_weights: torch.Tensor | None = None
    rejected_log_weights: torch.Tensor | None = None
    # The policy's per-token metrics (forward_pair's token_metrics), detached sums over completion tokens; None for a
    # reference, which no metric reads
    chosen_logits_sum: torch.Tensor | None = None  # of the mean-over-vocab logit (TRL's logits/*)
    rejected_logits_sum: torch.Tensor | None = None
    chosen_entropy_sum: torch.Tensor | None = None  # of the next-token distribution's entropy, in nats (TRL's entropy)
    rejected_entropy_sum: torch.Tensor | None = None
    chosen_top1_tokens: torch.Tensor | None = None  # chosen tokens that are the argmax (TRL's mean_token_accuracy)


class TargetLogProb(torch.autograd.Function):
    """(n, V) fp32 logits, (n,) targets, (n,) logsumexp of the logits -> (n,) log softmax(logits)[target], with ONE
    vocab-wide buffer.

    Autograd's own graph for `gather(logits) - logsumexp(logits)` allocates the softmax, a zero-filled
    gather gradient and their sum in backward: three more (n, V) fp32 buffers on top of the logits.
    Here backward turns the saved logits themselves into the gradient, in place:
    d log p(t) / d logit_v = 1[v = t] - softmax(logits)_v. The logits must not be needed by anything
    else afterwards (true for a fresh `lm_head(h).float()`), and backward may run only once.
    The normaliser comes in (computed without gradient) so that one pass over the vocabulary can also serve
    the metrics (`_chunk_token_stats`).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, log_normalizer: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, targets, log_normalizer)
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_normalizer

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, log_normalizer = ctx.saved_tensors
        grad_logits = logits.sub_(log_normalizer.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))  # -g * softmax
        grad_logits.scatter_add_(-1, targets.unsqueeze(-1), grad.unsqueeze(-1).to(grad_logits.dtype))  # + g at t
        return grad_logits, None, None


def _log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """(n, V) -> (n,) logsumexp: where nothing else needs a pass over the vocabulary."""
    return torch.logsumexp(logits, dim=-1)


class _CheckpointedChunk:
    """`_chunk_token_stats` for one checkpointed chunk. The first call is the forward and computes the extras asked
    for; a later call can only be the checkpoint's recomputation in backward, which needs nothing but what
    TargetLogProb saves, so it takes the plain normaliser: no argmax, and no exp pass kept for the extras. ATen
    computes logsumexp by the same steps (amax, exp, sum, log, + max), so for finite logits the two normalisers,
    and the gradients, agree bit for bit (checked on CPU by `bench/logps_chunk.py`, which also times the settings);
    only the recompute's normaliser reaches the gradient in any case."""

    def __init__(self, head, token_metrics: bool, probability_weights: bool):
        self.head = head  # _chunk_token_stats, or compiled_head.chunk_token_stats
        self.extras = (token_metrics, probability_weights)

    def __call__(self, lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor):
        extras, self.extras = self.extras, (False, False)
        return self.head(lm_head, hidden, targets, *extras)


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, V), (n, V) -> (n,) sum_v a_v b_v, as n batched dot products: no (n, V) product buffer."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


TOKEN_STATS = 3  # columns of `_chunk_token_stats`' per-token metrics: mean logit, entropy, target is the argmax


def _chunk_token_stats(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, token_metrics: bool = False,
                       probability_weights: bool = False):
    """(n, H) hidden states and (n,) next tokens -> (n,) log p(target) in fp32, with `token_metrics` (n, TOKEN_STATS)
    per-token metrics (mean-over-vocab logit, entropy in nats, 1.0 where the target is the argmax, first maximum
    winning a tie as in TRL), and with `probability_weights` (n,) log sum_v p_v^2 (WPO's normaliser); else None.
    The extras are detached.

    Without extras the normaliser is one fused logsumexp. With them, one exp pass over the vocabulary gives the
    normaliser, the entropy (logsumexp - E_p[logit]) and sum p^2 alike, and the max that stabilises it gives the
    argmax. What reads only the extras comes after TargetLogProb: when the chunk's checkpoint recomputes it in
    backward, non-reentrant checkpointing stops once TargetLogProb has saved its tensors again, so none of it
    runs twice."""
    logits = lm_head(hidden).float()  # (n, V)
    detached = logits.detach()
    if not (token_metrics or probability_weights):
        return TargetLogProb.apply(logits, targets, _log_normalizer(detached)), None, None
    max_logits, argmax = detached.max(dim=-1)
    scaled_probs = (detached - max_logits.unsqueeze(-1)).exp_()  # p_v x partition, (n, V)
    partition = scaled_probs.sum(dim=-1)
    log_normalizer = max_logits + partition.log()
    target_logps = TargetLogProb.apply(logits, targets, log_normalizer)
    stats = log_sum_squares = None
    if token_metrics:
        entropy = log_normalizer - _rowwise_dot(scaled_probs, detached) / partition
        stats = torch.stack([detached.mean(dim=-1), entropy, (argmax == targets).float()], dim=-1)
    if probability_weights:
        log_sum_squares = _rowwise_dot(scaled_probs, scaled_probs).log() - 2 * partition.log()
    return target_logps, stats, log_sum_squares


CHUNK_BUDGET_BYTES = 256 * 2**20  # a chunk's vocabulary-wide buffers together
EAGER_BYTES_PER_LOGIT = 8  # the eager head's fp32 logits and its fp32 exp pass (or softmax gradient) beside them


def default_chunk_tokens(vocab_size: int, bytes_per_logit: int = EAGER_BYTES_PER_LOGIT) -> int:
    """Tokens per chunk so that the chunk's vocabulary-wide buffers, `bytes_per_logit` per (token, vocabulary entry),
    take ~256 MiB. The eager head holds fp32 logits and an fp32 temporary (8 bytes: 220 tokens at Qwen's 151,936);
    the compiled head (`model.compile`, compiled_head.py) only the logits in the model's dtype (2 bytes in bf16: 883
    tokens in the same memory). Chunks bound memory, but each costs the host ~1-2 ms of Python (checkpoint,
    autograd function, kernel launches; measured on CPU with a tiny vocabulary, bench/RESULTS.md), about what a GPU spends on one
    220-token chunk's arithmetic: fewer, larger chunks where memory allows. Measured on the CPU proxy (vocab
    151,936, 1,006 completion tokens per rank, eager): one 1,024-token chunk peaked at 0.99x TRL's memory,
    256-token chunks at 0.55x, for 8% of the speed (bench/RESULTS.md)."""
    return max(1, CHUNK_BUDGET_BYTES // (bytes_per_logit * vocab_size))


ADAPTED_HEAD_LOGITS = 3  # PEFT's adapted lm_head: base output, the adapter's scaled output and their sum at once


def head_bytes_per_logit(compiled_head: bool, model_dtype_bytes: int, adapted_head: bool = False) -> int:
    """What a chunk's vocabulary-wide buffers hold per (token, vocabulary entry): the compiled head only its logits
    in the model's dtype, the eager head fp32 logits and an fp32 temporary. A LoRA adapter on the lm_head
    (`base(x) + lora_B(lora_A(x)) * scaling`) makes three logit-sized tensors in the model's dtype while it adds,
    which is the peak where that is more (compiled; eager in fp32). One rule for `SequenceLogps` and the memory
    planner, so that the planner counts the chunk a run will take (the planner passes the model's dtype, the run
    its lm_head weight's: the same for Qwen, whose checkpoints keep no module in fp32)."""
    held = model_dtype_bytes if compiled_head else EAGER_BYTES_PER_LOGIT
    return max(held, ADAPTED_HEAD_LOGITS * model_dtype_bytes) if adapted_head else held


def causal_only_masks(hf_config) -> dict | None:
    """The decoder's per-layer-type masks for rows that need nothing beyond causality, or None to let it build them.

    Given no masks, transformers derives them from position_ids, and its check for packed sequences
    reads a device tensor on the host (`.all()`): a sync in every forward. With every layer full-attention
    and a kernel for which "no mask" means causal (sdpa's is_causal, flash-attention's causal flag),
    handing over `{"full_attention": None}` is the mask it would have built, without the sync. Eager and
    flex attention read a missing mask as no masking at all, and sliding-window layers need theirs."""
    if prefix_sharing.base_implementation(hf_config._attn_implementation) not in ("sdpa", "flash_attention_2"):
        return None
    layer_types = getattr(hf_config, "layer_types", None)
    if not layer_types or any(layer_type != "full_attention" for layer_type in layer_types):
        return None
    return {"full_attention": None}


class SequenceLogps(nn.Module):
    """Wraps a causal LM; `forward` maps a concatenated pair batch to per-sequence sums."""

    def __init__(self, causal_lm: nn.Module, chunk_tokens: int | None = None, recompute_elementwise: bool = False,
                 router_top_k: int = 0, probability_weights: bool = False, compiled_head: bool = False):
        super().__init__()
        # model.compile: the head's vocabulary-wide math in compiled kernels (compiled_head.py), else eager ops
        self.head = compiled_head_lib.chunk_token_stats if compiled_head else _chunk_token_stats
        # WPO (dpo.use_weighting): also each sequence's mean over its tokens of log p(token) - log sum_v p_v^2
        self.probability_weights = probability_weights
        self.causal_lm = causal_lm
        if not chunk_tokens:
            lm_head = causal_lm.get_output_embeddings()
            adapted_head = hasattr(lm_head, "lora_A")  # PEFT's LoRA layer wraps the lm_head (lora.target_modules)
            bytes_per_logit = head_bytes_per_logit(compiled_head, lm_head.weight.element_size(), adapted_head)
            chunk_tokens = default_chunk_tokens(causal_lm.config.vocab_size, bytes_per_logit)
        self.chunk_tokens = chunk_tokens
        self.recompute_elementwise = recompute_elementwise  # model.recompute_elementwise: lean_ops.ElementwiseRecompute
        # A MoE policy trained with dpo.router_aux_loss_coef: its routers' logits (k experts per token) give the
        # load-balancing loss in grad mode
        self.router_top_k = router_top_k

    def forward(
        self,
        input_ids: torch.Tensor,
        scored_positions: torch.Tensor,
        scored_targets: torch.Tensor,
        scored_owners: torch.Tensor,
        num_sequences: int,
        position_ids: torch.Tensor | None = None,
        sequence_index: torch.Tensor | None = None,
        branch: torch.Tensor | None = None,
        attention_gather: torch.Tensor | None = None,
        attention_scatter: torch.Tensor | None = None,
        real_tokens: torch.Tensor | None = None,
        scored_weights: torch.Tensor | None = None,
        token_metrics: bool = False,
    ):
        """Returns (logps, token_stats, token_counts, router_loss, log_weights): one entry per sequence, sums over its
        completion tokens; with `token_metrics` (the policy's, for its metrics) a (sequences, TOKEN_STATS) of sums of
        `_chunk_token_stats`' per-token metrics, else None; with `router_top_k` in grad mode the routers'
        load-balancing loss over `real_tokens` (the batch's attention_mask), else None; with `probability_weights`
        WPO's log weight per sequence, else None.

        `scored_positions` / `scored_targets` / `scored_owners` say which positions predict a completion
        token, which token, and for which sequence (built with the batch, `data.scoring_layout`). Padded
        batch: one sequence per row, right-padded (no attention mask needed, see below). Packed batch:
        several sequences in a row, `position_ids` restarting at 0 for each (transformers then keeps
        attention inside each sequence). Prefix-shared batch (`branch` given): one document per pair, attention
        as `prefix_sharing.attention_masks` arranges it, `sequence_index` the documents of a packed row.
        `scored_weights` (LD-DPO, `data.length_desensitized_weights`) weighs each scored token in its sequence's
        log-prob sum; the token metrics and the counts stay unweighted.
        """
        lm_head = self.causal_lm.get_output_embeddings()
        recompute = self.recompute_elementwise and torch.is_grad_enabled()
        routed = bool(self.router_top_k) and torch.is_grad_enabled()
        with RECOMPUTE.hooks() if recompute else contextlib.nullcontext():
            decoded = self._decode(input_ids, position_ids, sequence_index, branch, attention_gather, attention_scatter,
                                   routed)
        hidden = decoded.last_hidden_state
        router_loss = router_balance_loss(decoded.router_logits, self.router_top_k, real_tokens) if routed else None
        # Only completion-predicting positions are projected: prompt and padding never reach the lm_head.
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored_positions)  # (N, H)

        token_logps, token_stats, token_aligned = [], [], []
        for start in range(0, hidden.shape[0], self.chunk_tokens):
            chunk = (hidden[start : start + self.chunk_tokens], scored_targets[start : start + self.chunk_tokens])
            if torch.is_grad_enabled() and hidden.requires_grad:
                logps, stats, log_sum_squares = checkpoint(
                    _CheckpointedChunk(self.head, token_metrics, self.probability_weights), lm_head, *chunk,
                    use_reentrant=False)
            else:
                logps, stats, log_sum_squares = self.head(lm_head, *chunk, token_metrics, self.probability_weights)
            token_logps.append(logps)
            if stats is not None:
                token_stats.append(stats)
            if log_sum_squares is not None:
                token_aligned.append(logps.detach() - log_sum_squares)

        zeros = hidden.new_zeros(num_sequences, dtype=torch.float32)
        counts = torch.zeros(num_sequences, dtype=torch.long, device=input_ids.device).index_add(0, scored_owners, torch.ones_like(scored_owners))
        if token_logps:
            all_logps = torch.cat(token_logps)
            logps = zeros.index_add(0, scored_owners, all_logps if scored_weights is None else all_logps * scored_weights)
        else:  # no completion tokens at all: keep the graph connected so backward still runs
            logps = zeros + 0.0 * hidden.sum()
        stat_sums = None
        if token_metrics:
            stat_sums = zeros.new_zeros(num_sequences, TOKEN_STATS)
            if token_stats:
                stat_sums = stat_sums.index_add(0, scored_owners, torch.cat(token_stats))
        log_weights = None
        if self.probability_weights:
            aligned = torch.cat(token_aligned) if token_aligned else zeros.new_zeros(0)
            log_weights = zeros.detach().index_add(0, scored_owners, aligned) / counts.clamp(min=1)
        return logps, stat_sums, counts, router_loss, log_weights

    def _decode(self, input_ids, position_ids, sequence_index, branch, attention_gather, attention_scatter, routed: bool):
        """The decoder's output for the batch's layout (see `forward`): its last hidden states, and with `routed`
        the routers' logits."""
        decoder = self.causal_lm.get_decoder()
        extra = {"output_router_logits": True} if routed else {}
        if branch is not None:
            masks = prefix_sharing.attention_masks(self.causal_lm, branch, sequence_index, position_ids, attention_gather,
                                                   attention_scatter, has_compiled_layers(self.causal_lm))
            return decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=masks, use_cache=False, **extra)
        if position_ids is not None:
            return decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra)
        # Rows are right-padded (data.collate), so under the causal mask no real token ever sees a pad;
        # only the pads' own outputs differ, and they are never scored. Leaving the padding mask out
        # lets sdpa run its causal flash kernel (with grouped KV heads as they are) instead of a
        # masked kernel on repeated KV heads: the same function, less time and memory.
        return decoder(input_ids=input_ids, attention_mask=causal_only_masks(self.causal_lm.config), use_cache=False, **extra)


def forward_pair(model: nn.Module, batch: PairBatch, token_metrics: bool = False) -> PairLogps:
    """Run a `SequenceLogps` (or a DeepSpeed engine around one) on a pair batch; split chosen/rejected.
    `token_metrics`: also the per-token metrics (the policy's; a reference's are never read)."""
    logps, stat_sums, tokens, router_loss, log_weights = model(
        batch.input_ids, batch.scored_positions, batch.scored_targets, batch.scored_owners, batch.num_sequences,
        batch.position_ids, batch.sequence_index, batch.branch, batch.attention_gather, batch.attention_scatter,
        batch.attention_mask, batch.scored_weights, token_metrics,
    )
    num_pairs = batch.num_pairs
    chosen, rejected = slice(0, num_pairs), slice(num_pairs, 2 * num_pairs)
    pair = PairLogps(
        chosen_logps=logps[chosen],
        rejected_logps=logps[rejected],
        chosen_tokens=tokens[chosen],
        rejected_tokens=tokens[rejected],
        sft_logps=logps[2 * num_pairs :] if batch.num_sft else None,
        sft_tokens=tokens[2 * num_pairs :] if batch.num_sft else None,
        router_loss=router_loss,
        chosen_log_weights=log_weights[chosen] if log_weights is not None else None,
        rejected_log_weights=log_weights[rejected] if log_weights is not None else None,
    )
    if stat_sums is not None:
        mean_logit, entropy, top1 = stat_sums.unbind(dim=-1)
        pair.chosen_logits_sum, pair.rejected_logits_sum = mean_logit[chosen], mean_logit[rejected]
        pair.chosen_entropy_sum, pair.rejected_entropy_sum = entropy[chosen], entropy[rejected]
        pair.chosen_top1_tokens = top1[chosen]
    return pair
