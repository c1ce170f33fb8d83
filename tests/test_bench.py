"""The benchmark harness itself: bench/vs_trl.py runs TRL's DPOTrainer and dpo-dist on the same data and
reports both. Its numbers are for bench/RESULTS.md, not for assertions; what is checked is that the harness
works end to end and measures both tools alike."""

import json
import math
import random
import sys

import pytest

from launching import assert_ok, run, write_config


def test_vs_trl_runs_both_tools_on_the_same_tokens(tmp_path):
    """A tiny model, one process, ZeRO-3 in both: each run reports its numbers, and the two count the same
    tokens per step (non-padding chosen + rejected, counted by each tool's own code) and start at ln 2
    (policy = reference)."""
    out = tmp_path / "vs_trl.json"
    result = run([sys.executable, "bench/vs_trl.py", "--vocab-size", "2000", "--hidden", "64", "--layers", "2",
                  "--seq-len", "64", "--processes", "1", "--steps", "3", "--warmup-steps", "1", "--no-packing",
                  "--ds-config", "ds_configs/zero3.json", "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    assert_ok(result)
    report = json.loads(out.read_text())
    trl, ours = report["results"]["trl"], report["results"]["dpo_dist"]
    assert trl["steps_measured"] == ours["steps_measured"] == 2
    assert trl["tokens_per_step_mean"] == ours["tokens_per_step_mean"] > 0
    assert math.isclose(trl["loss_first_step"], math.log(2), abs_tol=1e-5)
    assert math.isclose(ours["loss_first_step"], math.log(2), abs_tol=1e-5)
    assert trl["engines"]["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
    for key in ("tokens_per_second", "step_seconds_median", "peak_memory_mb_max_over_ranks"):
        assert report["ratios_dpo_dist_over_trl"]["dpo_dist"][key] > 0


def test_vs_trl_refuses_what_it_cannot_measure_before_running_and_reports_mfu_per_device(monkeypatch, capsys):
    """Counts it cannot measure with, and a --variant without its NAME: (which ran a default run under the whole
    spec's name): refused before anything is built. MFU is per device, as the trainer logs it: the run's tokens/s
    over its processes."""
    import runpy

    import pytest

    from launching import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # its sibling modules, as when run as a script
    bench = runpy.run_path(str(ROOT / "bench" / "vs_trl.py"))
    for words, expected in [(["--steps", "2", "--warmup-steps", "2"], "--warmup-steps 2 leaves no measured step"),
                            (["--processes", "0"], "--processes must be >= 1, got 0"),
                            (["--variant", "model.logps_chunk_tokens=7"], "give NAME:KEY=VALUE")]:
        monkeypatch.setattr(sys, "argv", ["vs_trl.py", *words])
        with pytest.raises(SystemExit) as end:
            bench["parse_args"]()
        assert end.value.code == 2 and expected in capsys.readouterr().err
    results = {"dpo_dist": {"tokens_per_second": 1000.0, "processed_tokens_per_second": 750.0}}
    bench["add_ratios_and_mfu"](results, 6e9, 10.0, 2)
    assert results["dpo_dist"]["mfu"] == pytest.approx(750.0 * 6e9 / 2 / 10e12)  # the trainer's formula


def test_decoder_ceiling_runs_each_cpu_variant_and_scores_alike():
    """bench/decoder_ceiling.py (the GPU suite's `ceiling` case) at its CPU shape: every variant that needs no GPU
    runs (a changed SequenceLogps signature once failed them all, each printed as 'cannot run', exit 0), and
    lean activations, fused LoRA projections and recomputation score the same sequence log-probs as transformers'
    eager modules in fp32 (the script compares each variant with the first on the same weights and batch).
    Liger-Kernel's variant needs a GPU: the table says so, and the exit status too."""
    variants = ["eager", "lean", "fused", "recompute"]
    result = run([sys.executable, "bench/decoder_ceiling.py", "--device", "cpu", "--preset", "qwen3-0.6b",
                  "--lora-r", "4", "--variants", ",".join(variants + ["liger"]), "--iters", "1"])
    assert result.returncode != 0 and "1 variant(s) could not run: liger" in result.stderr, result.stderr[-3000:]
    rows = {}  # variant -> its table row's fields
    for line in result.stdout.splitlines():
        fields = line.split()
        if fields and fields[0] in variants + ["liger"]:
            rows[fields[0]] = fields
    assert sorted(rows) == sorted(variants + ["liger"]), result.stdout
    assert rows["liger"][1:3] == ["cannot", "run:"]
    assert rows["eager"][-1] == "(baseline)"
    for variant in variants[1:]:
        assert float(rows[variant][-1]) < 1e-3, rows[variant]  # fp32: rounding only


def test_compile_parity_scores_every_forward_mode_of_an_eager_model_alike():
    """bench/compile_parity.py (the GPU suite's `compile-parity` case) on CPU, eager only (its compiled variants take
    minutes here): every forward mode, with the adapter switched off both ways (the trainer's switch without grad,
    PEFT's with it), in both layouts, scores what the policy scores in bf16 on CPU, so each row's first loss is
    ln 2."""
    result = run([sys.executable, "bench/compile_parity.py", "--variants", "eager", "--seq-len", "64"])
    assert_ok(result)
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("eager ")]
    assert [(row[1], row[2]) for row in rows] == [(layout, mode) for layout in ("padded", "shared")
                                                  for mode in ("policy", "reference", "no_grad", "ref_grad")]
    for row in rows:
        assert float(row[3]) == float(row[4]) == 0.0, row
        assert float(row[6]) == round(math.log(2), 6), row


def test_collate_times_every_layout():
    """bench/collate.py on a small micro-batch: a time and a ratio to the padded layout for each of the four."""
    result = run([sys.executable, "bench/collate.py", "--seq-len", "64", "--iters", "2"])
    assert_ok(result)
    reported = [line.split("  ")[1].strip() for line in result.stdout.splitlines() if line.endswith("x padded")]
    assert reported == ["padded", "packed", "prefix-shared", "prefix-shared packed"], result.stdout


@pytest.mark.parametrize("frozen", [False, True])
def test_logps_chunk_times_each_setting_and_finds_their_gradients_alike(frozen):
    """bench/logps_chunk.py at a small vocabulary: all five settings run and report, the eager ones' gradients are
    bit-identical (the script exits non-zero otherwise): the normaliser the recompute now takes, torch.logsumexp,
    gives the same bits as the exp pass the forward takes with the metrics, so the change moves no gradient; and
    the compiled head's are theirs up to fp32 rounding. Over 100 tokens in chunks of 40 (a shorter last one), as a
    micro-batch's head runs. Also with the lm_head frozen (a LoRA run's head: only the hidden states' gradients)."""
    result = run([sys.executable, "bench/logps_chunk.py", "--vocab", "3000", "--hidden", "16", "--tokens", "40",
                  "--total-tokens", "100", "--iters", "2", *(["--frozen-head"] if frozen else [])])
    assert_ok(result)
    assert result.stdout.startswith("100 tokens in 3 chunks of 40"), result.stdout
    assert ("lm_head frozen" in result.stdout.splitlines()[0]) == frozen
    reported = [line.split()[0] for line in result.stdout.splitlines() if line.endswith("%")]
    settings = ["recompute-as-forward", "metrics", "no-metrics", "compiled-metrics", "compiled-no-metrics"]
    assert reported == settings, result.stdout
    assert "gradients alike across settings" in result.stdout


def test_profile_step_reports_ops_and_samples_compiled_layers_as_they_run(tiny_policy, tmp_path):
    """bench/profile_step.py, both ways, on the tiny model with compiled layers: torch.profiler's report (the ops
    with the most CPU time) and --sample-host's (Python stacks sampled from a thread). Every sample of the steps
    lies inside Trainer.train_step, and samples land in the compiled layers' generated code: the layers ran
    compiled while sampled (under cProfile they would run eagerly)."""
    config = write_config(tmp_path / "run.yaml", tiny_policy, None, tmp_path / "out", model={"compile": True},
                          training={"max_steps": 5, "warmup_ratio": 0.0}, data={"eval_files": []})
    profiled = run([sys.executable, "bench/profile_step.py", "--warmup", "1", "--steps", "1", "--config", str(config)])
    assert_ok(profiled)
    report = json.loads((tmp_path / "out/profile/profile.json").read_text())
    assert report["steps"] == 1 and report["wall_ms"] > 0
    assert {"aten::mm", "aten::addmm"} & {row["op"] for row in report["top_ops"]}
    # trainer.phase's ranges: every phase of a micro-batch once per micro-batch, the host's time in each; no device
    phases = {row["phase"]: row for row in report["phases"]}
    names = ["to_device", "reference", "policy_forward", "loss", "objective", "collate", "backward", "step", "metrics"]
    assert set(phases) == {f"dpo:{name}" for name in names}, phases
    micro_batches = phases["dpo:backward"]["calls_per_step"]
    assert micro_batches >= 1 and all(row["calls_per_step"] == micro_batches for row in phases.values())
    assert phases["dpo:backward"]["host_ms_per_step"] > phases["dpo:loss"]["host_ms_per_step"] > 0
    assert sum(row["host_ms_per_step"] for row in phases.values()) < report["wall_ms"]
    assert report["idle"] is None
    # DeepSpeed's optimizer step reads the gradient norm on the host: its syncs are in the step phase
    assert report["syncs"] and {site["phase"] for site in report["syncs"]} == {"dpo:step"}, report["syncs"]
    # 4 steps: 2 gave 17-30-odd samples on 2 busy cores (the sampler needs the GIL), too near the floor below
    sampled = run([sys.executable, "bench/profile_step.py", "--sample-host", "1", "--warmup", "1", "--steps", "4",
                   "--config", str(config), f"training.output_dir={tmp_path / 'sampled'}"])
    assert_ok(sampled)
    samples = json.loads((tmp_path / "sampled/profile/host_samples.json").read_text())
    assert samples["steps"] == 4 and samples["samples"] > 20
    inclusive = {row["function"]: row["share"] for row in samples["inclusive"]}
    assert inclusive["dpo_dist/trainer.py:train_step"] > 0.97
    assert any(name.startswith("torch/_inductor/output_code.py") and share > 0.05 for name, share in inclusive.items())


def profile_step():
    """bench/profile_step.py as a module, for its pure functions (bench/ is on the path only while it loads)."""
    import importlib

    sys.path.insert(0, "bench")
    try:
        return importlib.import_module("profile_step")
    finally:
        sys.path.remove("bench")


def test_profile_step_counts_each_kernel_once_and_overlaps_once():
    """On a GPU the device's busy time is the union of the kernels' intervals, each kernel counted once: torch's
    op table also lists every kernel as the self device time of the op that launched it, and summing that table
    had doubled the busy time the GPU sessions reported. Two streams' overlapping kernels count once."""
    kernel_summary = profile_step().kernel_summary
    kernels = [("gemm", 0.0, 400.0), ("gemm", 1000.0, 1400.0), ("norm", 1400.0, 1500.0),
               ("copy", 1450.0, 1600.0),  # another stream, overlapping the norm by 50 us
               ("norm", 3000.0, 3100.0)]
    rows, busy_ms = kernel_summary(kernels)
    assert math.isclose(busy_ms, (400 + 400 + 100 + 100 + 100) / 1e3)
    assert [(row["op"], row["calls"]) for row in rows] == [("gemm", 2), ("norm", 2), ("copy", 1)]
    assert math.isclose(rows[0]["self_ms"], 0.8) and math.isclose(rows[0]["share"], 800 / 1150)


def test_profile_step_charges_each_device_gap_to_the_phase_that_launched_its_end():
    """Where the device waited: each gap between kernels (over 5 us; the union of their intervals, so overlapping
    kernels leave none) is charged to the innermost trainer phase around the launch of the kernel that ends it,
    and counted as the host's lateness only when that launch came after the device had run out of work. Host
    time per phase is the sum of its ranges. Checked against sums worked out by hand."""
    tool = profile_step()
    regions = [("dpo:backward", 0.0, 100.0), ("dpo:step", 100.0, 150.0), ("dpo:inner", 108.0, 112.0)]
    kernels = [  # (name, start us, end us, launch us)
        ("a", 0.0, 10.0, 1.0), ("b", 10.0, 30.0, 5.0),  # back to back: no gap
        ("c", 40.0, 50.0, 39.0),  # 10 us idle, launched after the device ran dry at 30: host late, backward
        ("d", 45.0, 60.0, 41.0),  # overlaps c (another stream): no gap
        ("d2", 46.0, 48.0, 42.0),  # inside d: the device stays busy until 60, not 48
        ("e", 62.0, 70.0, 20.0),  # 2 us: the device's own spacing, not counted
        ("f", 120.0, 130.0, 110.0),  # 50 us, late, launched inside dpo:inner (innermost of step and inner)
        ("g", 140.0, 141.0, 115.0),  # 10 us, queued at 115 before the device ran dry at 130: not late, step
        ("h", 160.0, 170.0, None),  # 19 us, launch not in the profile
        ("i", 200.0, 210.0, 180.0),  # 30 us, late, launched outside every phase
    ]
    random.Random(0).shuffle(kernels)  # the profile's order is not the device's
    idle = tool.idle_by_phase(kernels, regions, steps=2)
    assert math.isclose(idle["idle_ms_per_step"], (10 + 50 + 10 + 19 + 30) / 1e3 / 2)
    got = {row["phase"]: (row["gaps_per_step"], round(row["idle_ms_per_step"] * 2e3, 6),
                          round(row["host_late_ms_per_step"] * 2e3, 6)) for row in idle["by_phase"]}
    assert got == {"dpo:inner": (0.5, 50, 50), "dpo:backward": (0.5, 10, 10), "dpo:step": (0.5, 10, 0),
                   tool.LAUNCH_UNKNOWN: (0.5, 19, 0), tool.NO_PHASE: (0.5, 30, 30)}
    assert [row["phase"] for row in idle["by_phase"]][:3] == ["dpo:inner", tool.NO_PHASE, tool.LAUNCH_UNKNOWN]
    assert [(gap["next_kernel"], gap["host_late"]) for gap in idle["longest"]] == [
        ("f", True), ("i", True), ("h", False), ("c", True), ("g", False)]
    times = tool.phase_times([("dpo:a", 0.0, 10.0), ("dpo:b", 10.0, 40.0), ("dpo:a", 50.0, 55.0)], steps=1)
    assert times == [{"phase": "dpo:b", "calls_per_step": 1.0, "host_ms_per_step": 0.03},
                     {"phase": "dpo:a", "calls_per_step": 2.0, "host_ms_per_step": 0.015}]


def test_profile_step_finds_each_kernels_launch_by_its_cupti_id():
    """A kernel's launch time comes from the API call with the same CUPTI correlation id (runtime or driver call,
    told from ops by name: an op's id comes from another counter and may be the same number), else from the op
    both link to, else it is unknown. Events are torch's own FunctionEvent, filled as _parse_kineto_results
    fills them from kineto."""
    import inspect

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    if not {"linked_correlation_id", "is_user_annotation"} <= set(inspect.signature(FunctionEvent).parameters):
        pytest.skip("this torch's FunctionEvent has no linked_correlation_id (device_kernels then reads none)")
    device_kernels = profile_step().device_kernels

    def event(id, name, start, end, device=DeviceType.CPU, linked=0, annotation=False):
        return FunctionEvent(id=id, name=name, thread=1, start_us=start, end_us=end, device_type=device,
                             linked_correlation_id=linked, is_user_annotation=annotation)

    cuda = DeviceType.CUDA
    events = [
        event(70, "cudaLaunchKernel", 2.0, 3.0, linked=7),
        event(70, "gemm", 20.0, 30.0, cuda, linked=7),  # launched at 2
        event(8, "triton_poi_fused_add_0", 40.0, 41.0),  # inductor's range around a Triton launch
        event(7, "cuLaunchKernelEx", 40.5, 40.8, linked=8),
        event(7, "triton_poi_fused_add_0", 50.0, 51.0, cuda, linked=8),  # launched at 40.5, not op 7's 0
        event(90, "copy", 60.0, 61.0, cuda, linked=8),  # its call not in the profile: the linked op's start
        event(91, "fill", 62.0, 63.0, cuda, linked=70),  # linked to op 70 (at 0), not to the call with CUPTI id 70
        event(92, "orphan", 70.0, 71.0, cuda),  # neither
        event(5, "dpo:backward", 0.0, 100.0, cuda, annotation=True),  # the range's device span: not a kernel
        # op 7, after the call with CUPTI id 7 (one dict for both would then give kernel 7 this op's start, 0);
        # op 70, after the call with CUPTI id 70
        event(7, "aten::mm", 0.0, 10.0), event(70, "aten::add", 0.0, 1.0),
    ]

    class Profile:  # what device_kernels reads of torch.profiler.profile: its events
        def events(self):
            return events

    assert device_kernels(Profile()) == [("gemm", 20.0, 30.0, 2.0), ("triton_poi_fused_add_0", 50.0, 51.0, 40.5),
                                         ("copy", 60.0, 61.0, 40.0), ("fill", 62.0, 63.0, 0.0),
                                         ("orphan", 70.0, 71.0, None)]


def suite_cases() -> dict[str, str]:
    """bench/gpu_suite.sh's cases: each case name and the text of its branch, with the shared arrays it names
    spelled out (what bench/vs_trl.py or another bench script gets on the GPU)."""
    import re
    from pathlib import Path

    script = (Path(__file__).resolve().parent.parent / "bench" / "gpu_suite.sh").read_text()
    arrays = dict(re.findall(r"^([A-Z_]+)=\((.*?)\)\n", script, flags=re.M | re.S))
    body = script.split('case $case in', 1)[1].split("\n    esac", 1)[0]
    branches = re.findall(r"^        ([a-z0-9|-]+)\)(.*?)(?=^        [a-z0-9|*-]+\)|\Z)", body, flags=re.M | re.S)
    cases = {}
    for names, text in branches:
        for name, array in arrays.items():
            text = text.replace(f'"${{{name}[@]}}"', array)
        for name in names.split("|"):
            cases[name] = text
    cases["COMMON"] = f"args=({arrays['COMMON']})"  # what every vs_trl.py call gets beside its case's args
    return cases


def test_gpu_suite_cases_are_configs_the_trainer_accepts(tiny_policy, tmp_path):
    """The GPU suite runs where device time is scarce (15 minutes a session) and no CPU test runs its cases: every
    dpo-dist variant it passes must load as a config, with its DeepSpeed file filled as the trainer fills it; every
    bench script and flag it names must exist; and the cases the next GPU session's plan (bench/RESULTS.md) names
    must be cases the suite has."""
    import re
    from pathlib import Path

    import yaml

    from dpo_dist.config import load_config
    from dpo_dist.engine import training_ds_config
    from dpo_dist.errors import UserError

    root = Path(__file__).resolve().parent.parent
    cases = suite_cases()
    checked_flags = set()  # (script, flag) pairs found in the script's own arguments
    assert {"head", "full-z2-compiled", "profile-full-z2-compiled", "lora-compiled-ours", "full-z2-overlap"} <= set(cases)
    checked = 0
    for name, text in cases.items():
        ds_configs = re.findall(r"--ds-config ([^\s)]+)", text) or ["ds_configs/zero2.json"]
        lora = {"lora": {"r": 16, "alpha": 32}} if "--lora-r" in text else {}
        for variant in re.findall(r"--variant [a-z0-9]+:([^\s)]+)", text) + [""]:
            overrides = [word for word in variant.split(",") if word]
            for ds_config in ds_configs:
                path = tmp_path / f"{name}.yaml"
                path.write_text(yaml.safe_dump({
                    "model": {"base_model": str(tiny_policy), "dtype": "bfloat16", "attn_implementation": "sdpa"},
                    "training": {"batch_size": 2, "gradient_accumulation_steps": 4, "max_seq_length": 2048},
                    "deepspeed": {"config": ds_config}, **lora}))
                config = load_config(path, overrides)
                try:
                    training_ds_config(config, world_size=1)
                except UserError as err:  # refusals of this CPU only (compiled FlexAttention)
                    assert "needs a GPU" in str(err), (name, variant, ds_config, err)
                checked += 1
        invocations = re.findall(r"python3 (bench/\w+\.py)([^|\n]*(?:\\\n[^|\n]*)*)", text)
        if "args=(" in text:  # the case's arguments, for the vs_trl.py call after the case statement
            invocations.append(("bench/vs_trl.py", text))
        for script, flags in invocations:
            source = (root / script).read_text() + (root / "dpo_dist" / "cli.py").read_text()  # + launch flags
            for flag in re.findall(r"(?<![\w.-])(--[a-z][a-z0-9-]*)", flags):
                assert f'"{flag}"' in source, (name, script, flag)
                checked_flags.add((script, flag))
    assert checked > 30
    assert {("bench/vs_trl.py", "--no-trl"), ("bench/vs_trl.py", "--keep"), ("bench/logps_chunk.py", "--tokens")} <= checked_flags
    plan = (root / "bench" / "RESULTS.md").read_text().split("Next GPU session", 1)[1].split("\n## ", 1)[0]
    planned = {case.split(":")[0] for line in re.findall(r"gpu_suite\.sh OUT ([^`]+)`", plan) for case in line.split()}
    assert planned and planned <= set(cases), planned - set(cases)
