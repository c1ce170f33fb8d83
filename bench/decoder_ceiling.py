"""How fast does this machine run one DPO micro-batch of a Qwen3 shape with no training engine around it?

The GPU table in bench/RESULTS.md has dpo-dist and TRL within a few percent of each other at MFU 0.13-0.22.
This separates what the decoder costs from what the engine adds: one random Qwen3-shaped model, the
policy's forward through `SequenceLogps` (grad on), its backward, and the reference's forward (LoRA: the
same model with the adapter disabled; full: the same weights under no_grad), timed per phase with CUDA
events, in plain PyTorch. Per variant (each on a freshly built model):
- eager: transformers' modules as they are (sdpa attention);
- lean: `model.lean_activations` (dpo_dist/lean_ops.py);
- liger: Liger-Kernel's Triton RMSNorm, SiLU gate and rotary embedding (`model.liger_kernels`, if installed);
- compile: each decoder layer compiled (`model.compile`), eager modules otherwise;
- recompute: lean activations + `model.recompute_elementwise` (norm outputs and SiLU(gate) x up rebuilt in
  backward);
- fused: `lora.fused` (each adapted projection one autograd function instead of PEFT's module calls);
variants combine with '+', e.g. `liger+fused`.

    python bench/decoder_ceiling.py --preset qwen3-4b --lora-r 16 --variants eager,lean,liger
    python bench/decoder_ceiling.py --preset qwen3-1.7b --lora-r 0            # full-parameter

Prints per variant: ms per micro-batch for each phase, the host's time to issue the work (on a GPU this
includes waiting whenever the launch queue is full, so it reads close to the device time once the device is
the bound; `--device cpu` measures the host's own cost), peak memory above the weights, MFU against both the
datasheet peak and a measured bf16 GEMM of the layer's MLP shape, and how far the variant's sequence
log-probs are from the first variant's (the same random weights and batch).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from workload import PRESETS, apply_preset, hf_config, model_flops_per_token

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # dpo_dist, also when not installed

PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16, the datasheet number dpo_dist.metrics uses


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-4b")
    parser.add_argument("--lora-r", type=int, default=16, help="0 = full-parameter")
    parser.add_argument("--rows", type=int, default=4, help="sequences per micro-batch (2 pairs = 4)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=3, help="timed micro-batches per variant, after one warm-up")
    parser.add_argument("--variants", default="eager,lean,liger")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: the preset's depth at a tiny width (hidden 64, 128 tokens a row): the host's own cost")
    args = parser.parse_args()
    args.vocab_size, args.untied, args.dtype = 151936, False, "bfloat16"
    layers = PRESETS[args.preset][2]
    apply_preset(args)
    if args.device == "cpu":  # every module call and kernel launch of the real depth, almost no arithmetic
        args.hidden, args.intermediate, args.heads, args.kv_heads, args.head_dim = 64, 192, 4, 2, 16
        args.vocab_size, args.layers, args.seq_len = 8192, layers, min(args.seq_len, 128)
        args.dtype = "float32"  # CPUs without bf16 matmul units would spend the time converting
        args.preset = f"{args.preset} depth ({layers} layers), tiny width"
    return args


class Clock:
    """Device time between marks: CUDA events on a GPU (asynchronous), the host clock on a CPU."""

    def __init__(self, device: str):
        import torch

        self.cuda = device == "cuda"
        self.torch = torch

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def wait(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


def build_model(args, variant: str):
    import torch
    from transformers import Qwen3ForCausalLM

    from dpo_dist.config import LoRAConfig, ModelConfig
    from dpo_dist.lean_ops import apply_lean_activations, apply_liger_kernels
    from dpo_dist.models import EAGER_ROUNDING, compile_decoder_layers, prepare_policy

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from make_tiny_qwen3 import build_tokenizer

    config = hf_config(args, build_tokenizer())
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.dtype))
    try:
        with torch.device(args.device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    parts = set(variant.split("+"))
    if "liger" in parts:
        apply_liger_kernels(model)
    elif parts & {"lean", "recompute"}:
        apply_lean_activations(model)
    if "compile" in parts:
        # nodet (bench/compile_parity.py): inductor's deterministic mode off, as before 2026-11-28
        compile_decoder_layers(model, dict(EAGER_ROUNDING) if "nodet" in parts else None)
    lora = LoRAConfig(r=args.lora_r, fused="fused" in parts) if args.lora_r else None
    # compile as the trainer does (since 2026-11-28): with it prepare_policy marks the embeddings' output as requiring
    # grad, so a compiled LoRA policy's layer 0 runs the same graph as the others (earlier compiled timings: without)
    return prepare_policy(model, ModelConfig(base_model="random", compile="compile" in parts), lora).train()


def gemm_tflops(args) -> float:
    """bf16 GEMM rate of the MLP's up projection at one micro-batch's token count: the ceiling that matters here."""
    import torch

    a = torch.randn(args.rows * args.seq_len, args.hidden, device=args.device, dtype=getattr(torch, args.dtype))
    b = torch.randn(args.hidden, args.intermediate, device=args.device, dtype=getattr(torch, args.dtype))
    for _ in range(3):
        a @ b
    clock = Clock(args.device)
    start = clock.mark()
    for _ in range(20):
        a @ b
    end = clock.mark()
    clock.wait()
    return 2 * a.shape[0] * args.hidden * args.intermediate * 20 / (clock.ms(start, end) / 1e3) / 1e12


def run_variant(args, variant: str) -> dict:
    import contextlib

    import torch

    from dpo_dist.logps import SequenceLogps
    from dpo_dist.reference import AdapterSwitch

    on_gpu = args.device == "cuda"
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(args, variant)
    weights = torch.cuda.memory_allocated() if on_gpu else 0
    parts = variant.split("+")
    scorer = SequenceLogps(model, recompute_elementwise="recompute" in parts, compiled_head="compile" in parts)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 5000, (args.rows, args.seq_len), generator=generator).to(args.device)
    half = args.seq_len // 2  # the benchmark's pairs: prompt and completion about half each
    positions = torch.cat([torch.arange(half - 1, args.seq_len - 1) + row * args.seq_len for row in range(args.rows)]).to(args.device)
    targets = input_ids.reshape(-1)[positions + 1]
    owners = torch.arange(args.rows).repeat_interleave(args.seq_len - half).to(args.device)
    reference = AdapterSwitch(model).off if args.lora_r else contextlib.nullcontext  # as the adapter reference does

    phases = ("policy_forward", "backward", "reference_forward")
    device_ms = {phase: [] for phase in phases}
    host_ms = {phase: [] for phase in phases}
    clock = Clock(args.device)
    for iteration in range(args.iters + 1):
        host, events = [], [clock.mark()]
        began = time.perf_counter()
        logps = scorer(input_ids, positions, targets, owners, args.rows)[0]  # (logps, logits_sum, counts, ...)
        host.append(time.perf_counter() - began)
        events.append(clock.mark())
        began = time.perf_counter()
        logps.sum().backward()
        host.append(time.perf_counter() - began)
        events.append(clock.mark())
        began = time.perf_counter()
        with torch.no_grad(), reference():
            scorer(input_ids, positions, targets, owners, args.rows)
        host.append(time.perf_counter() - began)
        events.append(clock.mark())
        clock.wait()
        model.zero_grad(set_to_none=True)
        if iteration == 0:
            continue  # warm-up: allocator, kernel choice, compilation
        for index, phase in enumerate(phases):
            device_ms[phase].append(clock.ms(events[index], events[index + 1]))
            host_ms[phase].append(host[index] * 1e3)
    peak = torch.cuda.max_memory_allocated() - weights if on_gpu else 0
    del model, scorer
    if on_gpu:
        torch.cuda.empty_cache()
    return {
        "device_ms": {phase: sorted(values)[len(values) // 2] for phase, values in device_ms.items()},
        "host_ms": {phase: sorted(values)[len(values) // 2] for phase, values in host_ms.items()},
        "peak_above_weights_gb": peak / 1e9,
        "logps": logps.detach().double().cpu(),  # the last policy forward's sequence log-probs
    }


def main() -> None:
    import torch

    args = parse_args()
    flops_per_token, counts = model_flops_per_token(args)
    gemm = gemm_tflops(args)
    tokens = args.rows * args.seq_len
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{device_name}: {args.preset}, {'LoRA r%d' % args.lora_r if args.lora_r else 'full'}, "
          f"{args.rows} x {args.seq_len} tokens, {flops_per_token / 1e9:.1f} GFLOP/token; "
          f"bf16 GEMM {tokens}x{args.hidden}x{args.intermediate}: {gemm:.0f} TFLOP/s")
    width = max(9, *(len(variant) for variant in args.variants.split(",")))  # 'liger+recompute' is 15
    print(f"{'variant':<{width}} {'policy fwd':>10} {'backward':>9} {'ref fwd':>8} {'total ms':>9} {'host ms':>8} "
          f"{'peak GB':>8} {'MFU':>6} {'of GEMM':>8} {'max |dlogp|':>12}")
    first_logps = None  # the first variant's log-probs: the others are compared with them
    from transformers.models.qwen3 import modeling_qwen3

    patched_by_liger = ("apply_rotary_pos_emb",)  # the module global model.liger_kernels replaces
    originals = {name: getattr(modeling_qwen3, name) for name in patched_by_liger}
    failed = []
    for variant in args.variants.split(","):
        try:
            result = run_variant(args, variant)
        except Exception as err:  # a variant that cannot run here (package missing, kernel error): say so, go on
            print(f"{variant:<{width}} cannot run: {type(err).__name__}: {str(err).splitlines()[0][:150] if str(err) else ''}")
            failed.append(variant)
            continue
        finally:
            for name, value in originals.items():  # the next variant gets transformers' own rotary embedding
                setattr(modeling_qwen3, name, value)
        device, host = result["device_ms"], result["host_ms"]
        if first_logps is None:
            first_logps, difference = result["logps"], "(baseline)"
        else:  # bf16 sums of ~1,000 token log-probs of ~12 each: differences of a few units are rounding
            difference = f"{(result['logps'] - first_logps).abs().max().item():12.3g}"
        total = sum(device.values())
        achieved = flops_per_token * tokens / (total / 1e3) / 1e12
        print(f"{variant:<{width}} {device['policy_forward']:10.1f} {device['backward']:9.1f} {device['reference_forward']:8.1f} "
              f"{total:9.1f} {sum(host.values()):8.1f} {result['peak_above_weights_gb']:8.1f} "
              f"{achieved / PEAK_TFLOPS:6.3f} {achieved / gemm:8.3f} {difference}")
    print(f"(parameters {counts['parameters'] / 1e9:.2f} B, trainable {counts['trainable'] / 1e6:.1f} M)")
    if failed:  # the table says which; the status makes a script or a test notice
        sys.exit(f"{len(failed)} variant(s) could not run: {', '.join(failed)}")


if __name__ == "__main__":
    main()
