"""One rank of TRL's DPOTrainer for bench/vs_trl.py (launched by it under torchrun; not a user tool).

    torchrun --nproc_per_node 2 bench/trl_runner.py --model DIR --data pairs.jsonl --record-dir DIR ...

Trains with `trl.DPOTrainer` on CPU (fp32, `use_cpu=True`) or one GPU (`--device cuda`, bf16),
`report_to="none"`, a separate frozen reference loaded from the same checkpoint (or, with `--lora-r`,
a PEFT LoRA adapter and TRL's adapter-disabled reference), and either TRL's DeepSpeed integration (`--backend deepspeed`:
the DeepSpeed JSON goes to `DPOConfig.deepspeed`, so the policy runs under the same ZeRO stage as
dpo-dist and TRL wraps the reference in a stage-0 inference engine, as it does for ZeRO-1/2) or plain
DDP (`--backend ddp`). Nothing of TRL is changed: a subclass only counts the non-padding tokens of
each micro-batch it trains on (chosen + rejected, `attention_mask.sum()`), and a callback records,
after each optimizer step, the wall time and this process's peak memory (`ru_maxrss` on CPU, CUDA
max allocated on a GPU). Each rank writes
`<record-dir>/trl_rank<r>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--record-dir", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--backend", choices=["deepspeed", "ddp"], default="deepspeed")
    parser.add_argument("--ds-config", default="ds_configs/zero2.json")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (alpha 2r, all linear layers); 0 = full")
    return parser.parse_args()


def peak_memory_mb() -> float:
    """Peak memory of this rank: CUDA max allocated on a GPU, else peak RSS (Linux reports KiB)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    args = parse_args()
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rank = int(os.environ.get("RANK", "0"))
    steps: list[dict] = []
    pending_tokens = [0]
    train_begin = [None]
    before_first_step = [None]

    class CountingDPOTrainer(DPOTrainer):
        """DPOTrainer as is; only counts the non-padding tokens of every micro-batch it trains on."""

        def training_step(self, model, inputs, *rest, **kwargs):
            pending_tokens[0] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *rest, **kwargs)

    class StepRecorder(TrainerCallback):
        def on_train_begin(self, *_, **__):
            train_begin[0] = time.perf_counter()
            before_first_step[0] = peak_memory_mb()

        def on_step_end(self, *_, **__):
            steps.append({"end": time.perf_counter(), "tokens": pending_tokens[0], "peak_memory_mb": peak_memory_mb()})
            pending_tokens[0] = 0

    config_kwargs = dict(
        output_dir=args.output_dir,
        use_cpu=args.device == "cpu",
        bf16=args.dtype == "bfloat16",
        fp16=False,
        report_to="none",
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",  # TRL's default, and the fused torch AdamW dpo-dist builds
        beta=args.beta,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        truncation_mode="keep_start",
        max_steps=args.max_steps,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        seed=args.seed,
        dataloader_num_workers=0,
        disable_dropout=True,
        precompute_ref_log_probs=False,
    )
    # TRL turns gradient (activation) checkpointing on by default; the bench sets both tools alike.
    config_kwargs["gradient_checkpointing"] = args.gradient_checkpointing
    if args.backend == "deepspeed":
        ds_config = json.loads(Path(args.ds_config).read_text())
        # transformers fills the "auto"s it knows; sub_group_size is dpo-dist's, so TRL gets DeepSpeed's default,
        # what its users run with
        if ds_config.get("zero_optimization", {}).get("sub_group_size") == "auto":
            del ds_config["zero_optimization"]["sub_group_size"]
        config_kwargs["deepspeed"] = ds_config
    else:
        config_kwargs["ddp_backend"] = "gloo"
    dpo_config = DPOConfig(**config_kwargs)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = getattr(torch, args.dtype)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
    peft_config = None
    if args.lora_r:  # TRL then scores the reference with the adapter disabled: no second model
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        reference = None
    else:
        reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
    dataset = load_dataset("json", data_files=args.data, split="train")
    trainer = CountingDPOTrainer(
        model=policy,
        ref_model=reference,
        peft_config=peft_config,
        args=dpo_config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepRecorder()],
    )
    after_setup_memory = peak_memory_mb()
    trainer.train()

    distributed_type = getattr(trainer.accelerator.distributed_type, "value", str(trainer.accelerator.distributed_type))
    record = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": distributed_type,
        "zero_stage": (
            trainer.accelerator.state.deepspeed_plugin.zero_stage
            if trainer.accelerator.state.deepspeed_plugin is not None else None
        ),
        "torch_threads": torch.get_num_threads(),
        # What actually ran: the policy's engine and optimizer, and the reference's wrapper.
        "policy_engine": type(trainer.model_wrapped).__name__,
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        "reference_engine": type(trainer.ref_model).__name__ if trainer.ref_model is not None else "adapter disabled",
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "train_begin": train_begin[0],
        "setup_peak_memory_mb": after_setup_memory,
        "peak_memory_mb_before_first_step": before_first_step[0],
        "steps": steps,
        "log_history": trainer.state.log_history,
    }
    out = Path(args.record_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"trl_rank{rank}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
