#!/usr/bin/env bash
# The GPU cases of issue 8 on a one-GPU machine (what bench/RESULTS.md's GPU tables came from):
#   full       Qwen3-1.7B-shaped, full-parameter, ZeRO-3, bf16: TRL, dpo-dist, dpo-dist packed, dpo-dist + checkpointing
#   lora       Qwen3-4B-shaped, LoRA r16 on all linear layers (the seed recipe), ZeRO-2, bf16: TRL, dpo-dist,
#              dpo-dist + checkpointing
#   full-ckpt, lora-ckpt   the same with gradient checkpointing on in BOTH tools (TRL's default)
#   lora-ours  the lora case, dpo-dist alone
#   full-ckpt-ours   the full-ckpt case, dpo-dist alone
#   lora-compile     the lora case, dpo-dist alone: eager vs model.compile=true (compiled decoder layers)
#   full-z2    Qwen3-1.7B-shaped full-parameter under ZeRO-2 (whole parameters, so layers compile cleanly): TRL,
#              dpo-dist, dpo-dist compiled, dpo-dist packed with flex_attention (block-sparse, no dense mask)
#   lora-shared  the lora case: TRL, dpo-dist, data.prefix_sharing (sdpa, attention gathered per sequence) with
#              model.lean_activations; the prompt is half of each sequence, so prefix sharing runs the
#              projections and MLP on 3/4 of the tokens
#   lora-shared-flex  the lora case, dpo-dist alone: padded vs prefix sharing with flex_attention (block mask),
#              eager and compiled
#   full-lean  the full case (1.7B, ZeRO-3, no checkpointing): TRL, dpo-dist, + lean_activations, + prefix sharing
#   full-z2-shared  the full-z2 shape, dpo-dist alone: padded vs prefix sharing with flex_attention, eager and compiled
#   lora-fast  the lora case: TRL, then dpo-dist with prefix sharing + lean activations + compiled layers (no default
#              dpo-dist run: the lora case has it). Needs CASE_SECONDS=420: compiling the 4B layers did not fit in 185
#   lora-next  the lora case: TRL, then dpo-dist with prefix sharing + Liger + fused LoRA projections, and prefix
#              sharing + lean + compiled layers (one compile fewer since the first GPU try). CASE_SECONDS=420
#   full-next  the full case without checkpointing: TRL, then dpo-dist with prefix sharing + Liger, and with
#              model.recompute_elementwise too (the memory goal), and with the first 6 of 28 layers checkpointed on
#              top (model.checkpointed_layers: the planner's margin for the memory goal, ~5% more compute), and
#              prefix sharing + lean + compiled layers (ZeRO-3, whole layers). CASE_SECONDS=330
#   full-z2-next  the full case's model and data under ZeRO-2 (one GPU: nothing to shard, no per-layer hooks): TRL, then
#              dpo-dist with prefix sharing + Liger; what the trainer's one-process ZeRO-3 note claims, on a GPU
#   full-precomputed  the full case: TRL, then dpo-dist with prefix sharing + Liger + recompute and the reference's
#              log-probs precomputed (launch/precompute_ref.py first, its rate reported and spread over 1 and 3 epochs)
#   full-mem   full-next without its first variant (prefix sharing + Liger, measured by full-fast): TRL, + recompute,
#              + the first 6 layers checkpointed, + lean + compiled layers (cut by the case's time if it runs long)
#   full-compiled  the full case: TRL, then dpo-dist with prefix sharing + lean + compiled layers (all 28 since ZeRO-3 runs
#              keep torch's F.linear), and the same with the first 10 layers checkpointed (the planner's margin for the
#              memory goal)
#   lora-compiled  the lora case: TRL, then dpo-dist with prefix sharing + lean + compiled layers (its compile did not fit
#              in the ~95 s lora-next had left for it)
#   lora-compiled-ours  lora-compiled without TRL (whose first loss is ln 2 exactly; its speed: lora-compiled)
#   lora-zero1  lora-compiled-ours under ds_configs/zero1.json (no reduce buckets, no overlap_comm synchronize)
#   full-z2-compiled  the full case's model and data under ZeRO-2: TRL, then dpo-dist with prefix sharing + lean + compiled
#              layers (the fourth GPU session ran these two by hand: ZeRO-2 against ZeRO-3 on one GPU, both tools)
#   full-z1-compiled  full-z2-compiled under ds_configs/zero1.json for both tools (ZeRO-1 takes 4% less memory than
#              ZeRO-2 on one process), and dpo-dist with the first 8 of 28 layers checkpointed (the memory goal)
#   full-z1-ckpt  full-z1-compiled with dpo-dist's first 18 layers checkpointed instead of 8, and no unchecked run (8
#              left it at 0.73x TRL's memory in the seventh GPU session, ~1,980 MB above the 0.7x goal, each layer
#              checkpointed saving ~236 MB)
#   full-z2-overlap  the full-z2-compiled shape, dpo-dist alone: prefix sharing + lean + compiled layers under zero2.json
#              and ds_configs/zero1.json. The sixth GPU session ran it with zero2.json's overlap_comm on and a third
#              variant without it (bench/configs/zero2_no_overlap.json, since removed): on one process the engine
#              now turns overlap_comm off itself, so that variant would repeat the first. ZeRO-2 still copies every
#              backward's gradients through its reduce buckets into accumulation tensors where ZeRO-1 lets autograd
#              accumulate them in .grad and reduces once per step (stage_1_and_2.py: process_gradients)
#   full-z2-metrics  the full-z2-compiled shape, dpo-dist alone: prefix sharing + lean + compiled layers with TRL's
#              per-token metrics (the default) and without them (training.token_metrics=false): what they cost a GPU step
#   compile-parity  bench/compile_parity.py on the 4B LoRA shape: do the policy's and the reference's forwards score alike,
#              eager, compiled, and compiled without inductor's deterministic mode (~3 min)
#   head       bench/logps_chunk.py on the GPU, bf16, hidden 2048 (the 1.7B model's): the lm_head's forward +
#              backward over one micro-batch's 4,096 completion tokens, eager against model.compile's head
#              (compiled_head.py), in the eager default's chunks (220 tokens) and the compiled default's (883);
#              time and peak memory per setting (~1 min with the compiles)
#   head-frozen  the same with the lm_head frozen (a LoRA run's head): the head case's peaks were all the lm_head
#              gradient's accumulation (V x H > n x V for n < H); without it each chunk's own peak shows, to check
#              logps.head_bytes_per_logit on the GPU (eager 8 bytes per logit, compiled bf16 ~2.17)
#   liger-tests  tests/test_lean_ops.py -k liger: Liger-Kernel's model against the plain one (CUDA only; skipped in CI)
#   full-fast  the full case without checkpointing (whole-layer ZeRO-3 gathering, the default): TRL, then dpo-dist
#              with prefix sharing + Liger-Kernel
#   ceiling    bench/decoder_ceiling.py: one micro-batch of the 4B LoRA and 1.7B full shapes in plain PyTorch (no
#              engine), per phase, eager / lean activations / Liger-Kernel / compiled layers: what the decoder costs
#   grad-parity  bench/grad_vs_nograd.py on the 1.7B shape: does a grad-enabled forward score like a no-grad one,
#              per sdpa backend (why bf16's first loss was 3e-4 off ln 2 on the H200)
#   ceiling-full  bench/decoder_ceiling.py on the 1.7B full shape, Liger-Kernel and compiled layers only: the decoder's
#              own MFU with the kernels the full case trains with (compiled was measured for 4B only)
#   profile-lora, profile-full   bench/profile_step.py (2 warm-up steps, 1 profiled) on dpo-dist's config of an
#              earlier lora* / full* case (eager); profile.json (top ops, host syncs) to OUT_DIR
#   profile-full-compiled  bench/profile_step.py (3 warm-up steps, 1 profiled) on the resolved config of full-compiled's
#              first variant (prefix sharing + lean + compiled layers, ZeRO-3): how busy the device is in a compiled
#              step ("device busy" against wall time) and the host syncs left, i.e. whether that step waits on the host
#   sample-full-compiled  the same config under profile_step.py --sample-host 2 (3 warm-up steps, 2 sampled): the
#              host's time by Python function in a compiled ZeRO-3 step (DeepSpeed's hooks, compiled layers, ours)
#   profile-full-z1-compiled  profile-full-z2-compiled on full-z1-compiled's first dpo-dist run (ZeRO-1)
#   profile-full-z2-compiled, sample-full-z2-compiled  the same two on full-z2-compiled's dpo-dist run (ZeRO-2, no
#              per-layer hooks): where a compiled step's time goes once the hooks are gone (the MFU gap left)
# all at max_seq_length 2048, 2 pairs per micro-batch, 4 micro-batches per step, 5 steps (2 warm-up).
#   bash bench/gpu_suite.sh OUT_DIR CASE[:SECONDS]...   (SECONDS: that case's time limit, else CASE_SECONDS or 270; a machine without deepspeed/trl/datasets/liger-kernel: their wheels in
#   .whl/, which `python bench/gpu_wheels.py` fills on a machine with a package index)
# Writes gpu_<case>.json (bench/vs_trl.py's report), <case>.log and logs.tgz (every run's log) to OUT_DIR.
set -u
OUT=$1
shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, transformers, deepspeed, trl, peft, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__)" 2>&1 | grep -v WARNING | tee -a "$OUT/machine.txt"

WORK=/tmp/dpo_gpu_work
COMMON=(--device cuda --processes 1 --seq-len 2048 --batch-size 2 --grad-accum 4 --steps 5 --warmup-steps 2 --keep)
FULL=(--preset qwen3-1.7b --ds-config ds_configs/zero3.json)
LORA=(--preset qwen3-4b --lora-r 16 --ds-config ds_configs/zero2.json --no-packing)
CKPT=(--variant ckpt:model.gradient_checkpointing=true)
# dpo-dist variants several cases share
LEAN_COMPILED=(--variant sharedleancompile:data.prefix_sharing=true,model.lean_activations=true,model.compile=true)
# the full case's memory goal: prefix sharing + Liger + recompute_elementwise, then also the first 6 layers checkpointed
FULL_MEMORY=(--variant sharedligerrecompute:data.prefix_sharing=true,model.liger_kernels=true,model.recompute_elementwise=true
             --variant sharedligerrecomputeckpt6:data.prefix_sharing=true,model.liger_kernels=true,model.recompute_elementwise=true,model.gradient_checkpointing=true,model.checkpointed_layers=6)
for spec in "$@"; do
    case=${spec%%:*}
    seconds=${CASE_SECONDS:-270}
    [ "$spec" != "$case" ] && seconds=${spec#*:}
    case $case in
        full) args=("${FULL[@]}" "${CKPT[@]}") ;;
        lora) args=("${LORA[@]}" "${CKPT[@]}") ;;
        full-ckpt) args=("${FULL[@]}" --gradient-checkpointing --no-packing) ;;
        lora-ckpt) args=("${LORA[@]}" --gradient-checkpointing) ;;
        lora-ours) args=("${LORA[@]}" --no-trl) ;;
        full-ckpt-ours) args=("${FULL[@]}" --gradient-checkpointing --no-packing --no-trl) ;;
        lora-compile) args=("${LORA[@]}" --no-trl --variant compile:model.compile=true) ;;
        full-z2) args=(--preset qwen3-1.7b --ds-config ds_configs/zero2.json --no-packing --variant compile:model.compile=true
                       --variant flexpacked:data.packing=true,model.attn_implementation=flex_attention) ;;
        lora-fast) args=("${LORA[@]}" --no-defaults "${LEAN_COMPILED[@]}") ;;
        lora-next) args=("${LORA[@]}" --no-defaults
                         --variant sharedligerfused:data.prefix_sharing=true,model.liger_kernels=true,lora.fused=true
                         "${LEAN_COMPILED[@]}") ;;
        full-next) args=("${FULL[@]}" --no-packing --no-defaults --variant sharedliger:data.prefix_sharing=true,model.liger_kernels=true
                         "${FULL_MEMORY[@]}" "${LEAN_COMPILED[@]}") ;;
        full-mem) args=("${FULL[@]}" --no-packing --no-defaults "${FULL_MEMORY[@]}" "${LEAN_COMPILED[@]}") ;;
        full-compiled) args=("${FULL[@]}" --no-packing --no-defaults
                             "${LEAN_COMPILED[@]}"
                             --variant sharedleancompileckpt10:data.prefix_sharing=true,model.lean_activations=true,model.compile=true,model.gradient_checkpointing=true,model.checkpointed_layers=10) ;;
        lora-compiled) args=("${LORA[@]}" --no-defaults "${LEAN_COMPILED[@]}") ;;
        lora-compiled-ours) args=("${LORA[@]}" --no-defaults --no-trl "${LEAN_COMPILED[@]}") ;;
        lora-zero1) args=("${LORA[@]}" --no-defaults --no-trl
                          --variant sharedleancompilezero1:data.prefix_sharing=true,model.lean_activations=true,model.compile=true,deepspeed.config=ds_configs/zero1.json) ;;
        full-z1-compiled) args=(--preset qwen3-1.7b --ds-config ds_configs/zero1.json --no-packing --no-defaults "${LEAN_COMPILED[@]}"
                                --variant sharedleancompileckpt8:data.prefix_sharing=true,model.lean_activations=true,model.compile=true,model.gradient_checkpointing=true,model.checkpointed_layers=8) ;;
        full-z1-ckpt) args=(--preset qwen3-1.7b --ds-config ds_configs/zero1.json --no-packing --no-defaults
                            --variant sharedleancompileckpt18:data.prefix_sharing=true,model.lean_activations=true,model.compile=true,model.gradient_checkpointing=true,model.checkpointed_layers=18) ;;
        full-z2-compiled) args=(--preset qwen3-1.7b --ds-config ds_configs/zero2.json --no-packing --no-defaults "${LEAN_COMPILED[@]}") ;;
        full-z2-overlap) args=(--preset qwen3-1.7b --ds-config ds_configs/zero2.json --no-packing --no-defaults --no-trl
                               "${LEAN_COMPILED[@]}"
                               --variant sharedleancompilezero1:data.prefix_sharing=true,model.lean_activations=true,model.compile=true,deepspeed.config=ds_configs/zero1.json) ;;
        full-z2-metrics) args=(--preset qwen3-1.7b --ds-config ds_configs/zero2.json --no-packing --no-defaults --no-trl
                               "${LEAN_COMPILED[@]}"
                               --variant sharedleancompilenometrics:data.prefix_sharing=true,model.lean_activations=true,model.compile=true,training.token_metrics=false) ;;
        compile-parity)
            timeout "$seconds" python3 bench/compile_parity.py --device cuda --preset qwen3-4b --lora-r 16 \
                --variants eager,lean+compile,lean+compile+nodet 2>&1 | grep -v -i -e warn | tee "$OUT/$case.log"
            continue ;;
        head|head-frozen)
            frozen=(); [ "$case" = head-frozen ] && frozen=(--frozen-head)
            { timeout "$seconds" python3 bench/logps_chunk.py --device cuda --dtype bfloat16 --hidden 2048 --iters 20 --total-tokens 4096 "${frozen[@]}"
              timeout "$seconds" python3 bench/logps_chunk.py --device cuda --dtype bfloat16 --hidden 2048 --iters 20 --total-tokens 4096 --tokens 883 "${frozen[@]}"
            } 2>&1 | grep -v -i -e warn | tee "$OUT/$case.log"
            continue ;;
        liger-tests)
            # -o addopts= : the project's xdist options, which the machine's pytest-xdist may not know
            timeout "$seconds" python3 -m pytest -o addopts= -p no:cacheprovider -q -rs tests/test_lean_ops.py -k liger 2>&1 \
                | grep -v -e WARNING | tee "$OUT/$case.log"
            continue ;;
        full-z2-next) args=(--preset qwen3-1.7b --ds-config ds_configs/zero2.json --no-packing --no-defaults
                           --variant sharedliger:data.prefix_sharing=true,model.liger_kernels=true) ;;
        full-precomputed) args=("${FULL[@]}" --no-packing --no-defaults
                               --variant sharedligerrecomputeprecomputed:data.prefix_sharing=true,model.liger_kernels=true,model.recompute_elementwise=true,reference.mode=precomputed) ;;
        full-fast) args=("${FULL[@]}" --no-packing --no-defaults --variant sharedliger:data.prefix_sharing=true,model.liger_kernels=true) ;;
        lora-shared) args=("${LORA[@]}" --variant sharedlean:data.prefix_sharing=true,model.lean_activations=true) ;;
        lora-shared-flex) args=("${LORA[@]}" --no-trl
                                --variant sharedflex:data.prefix_sharing=true,model.attn_implementation=flex_attention
                                --variant sharedflexcompile:data.prefix_sharing=true,model.attn_implementation=flex_attention,model.compile=true) ;;
        full-z2-shared) args=(--preset qwen3-1.7b --ds-config ds_configs/zero2.json --no-packing --no-trl
                              --variant sharedflex:data.prefix_sharing=true,model.attn_implementation=flex_attention
                              --variant sharedflexcompile:data.prefix_sharing=true,model.attn_implementation=flex_attention,model.compile=true) ;;
        full-lean) args=("${FULL[@]}" --no-packing --variant lean:model.lean_activations=true
                         --variant leanshared:model.lean_activations=true,data.prefix_sharing=true) ;;
        grad-parity)
            timeout "$seconds" python3 bench/grad_vs_nograd.py --device cuda --preset qwen3-1.7b 2>&1 \
                | grep -v -e WARNING -e "it/s]" | tee "$OUT/$case.log"
            continue ;;
        ceiling)
            { timeout 260 python3 bench/decoder_ceiling.py --preset qwen3-4b --lora-r 16 --variants eager,fused,lean,recompute,liger,liger+fused,liger+recompute,compile
              timeout 130 python3 bench/decoder_ceiling.py --preset qwen3-1.7b --lora-r 0 --variants eager,lean,recompute,liger,liger+recompute
            } 2>&1 | grep -v -e WARNING -e "warn" | tee "$OUT/$case.log"
            continue ;;
        ceiling-full)
            timeout "$seconds" python3 bench/decoder_ceiling.py --preset qwen3-1.7b --lora-r 0 --variants liger,compile 2>&1 \
                | grep -v -e WARNING -e "warn" | tee "$OUT/$case.log"
            continue ;;
        profile-full-compiled|sample-full-compiled|profile-full-z2-compiled|sample-full-z2-compiled|profile-full-z1-compiled)
            source_case=${case#*-}  # full-compiled, full-z2-compiled or full-z1-compiled
            config=$WORK/$source_case/dpo_dist_sharedleancompile/config.yaml  # the run's resolved config, variant included
            [ -f "$config" ] || { echo "$case: run $source_case first"; continue; }
            how=(--steps 1) report=profile.json
            [ "${case%%-*}" = sample ] && how=(--steps 2 --sample-host 2) report=host_samples.json
            timeout "$seconds" python3 bench/profile_step.py --warmup 3 "${how[@]}" --config "$config" \
                training.output_dir=/tmp/dpo_profile/$case 2>&1 | grep -v -e WARNING -e "it/s]" | tee "$OUT/$case.log"
            cp /tmp/dpo_profile/$case/profile/$report "$OUT/$case.json"
            continue ;;
        profile-lora|profile-full)
            candidates=$([ "$case" = profile-lora ] && echo "lora-ours lora-shared lora-compile lora" || echo "full-ckpt-ours full-lean full-ckpt full")
            config=$(for c in $candidates; do [ -f "$WORK/$c/dpo_dist.yaml" ] && echo "$WORK/$c/dpo_dist.yaml" && break; done)
            [ -n "$config" ] || { echo "$case: run one of $candidates first"; continue; }
            timeout "$seconds" python3 bench/profile_step.py --warmup 2 --steps 1 --config "$config" \
                training.output_dir=/tmp/dpo_profile/$case 2>&1 | grep -v -e WARNING -e "it/s]" | tee "$OUT/$case.log"
            cp /tmp/dpo_profile/$case/profile/profile.json "$OUT/$case.json"
            continue ;;
        *) echo "unknown case $case"; exit 2 ;;
    esac
    rm -rf "$WORK/$case"  # a case run again on a warm machine: its old output dirs would be refused (another run's)
    timeout "$seconds" python3 bench/vs_trl.py "${COMMON[@]}" "${args[@]}" --work-dir "$WORK/$case" \
        --out "$OUT/gpu_$case.json" 2>&1 | grep -v -e WARNING -e "it/s]" | tee "$OUT/$case.log"
    # A case cut by its time limit must not leave ranks holding the GPU while the next case measures its memory
    # (timeout signals the whole group, torchrun passes it on; this is the belt to those braces)
    pkill -9 -f "bench/(vs_trl|trl_runner)\.py" 2>/dev/null && sleep 2
done
tar czf "$OUT/logs.tgz" $(find "$WORK" -name "*.log" -o -name "metrics.jsonl" -o -name "*.yaml" | grep -v /model/) 2>/dev/null
