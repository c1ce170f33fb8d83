"""Profile optimizer steps of a real run: where the time goes, and every place the host waits for the device.

    python bench/profile_step.py --config configs/demo.yaml                      # 2 warm-up steps, 1 profiled
    python bench/profile_step.py --warmup 3 --steps 2 --config X.yaml model.compile=true
    torchrun --nproc_per_node 2 bench/profile_step.py --config X.yaml            # rank 0 reports

Runs `Trainer.setup()` and `--warmup` optimizer steps unprofiled (compilation, the allocator, DeepSpeed's
first-step work), then `--steps` steps under torch.profiler (CPU, plus CUDA on a GPU) and prints:
- on a GPU the kernels with the most device time and how long the device was busy (the union of the kernels'
  intervals), on CPU the ops with the most self CPU time; each with its share of the total;
- host syncs per step: `aten::_local_scalar_dense` (every `.item()`, `bool(tensor)`, `float(tensor)` of a
  device tensor) and `aten::nonzero` (boolean-mask selection: only the device knows the result's size)
  calls, and on a GPU cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize calls; on a
  GPU each one waits for the stream, on CPU they are counted where they WOULD wait; each with the Python
  lines (outside torch) that made them and the trainer phase (`trainer.phase`: to_device, reference,
  policy_forward, loss, objective, collate, backward, step, metrics) they ran in, so a sync on the hot path can
  be found and removed;
- the host's time per phase (collate's is ~0 here: the micro-batches are collated before profiling, below), and on
  a GPU where the device waited: its idle time between kernels, charged to the
  phase whose launch ended each gap and split by whether the host launched that kernel only after the device had
  run out of work (the host was late) or in time (the kernel waited on something else), with the longest gaps;
and writes `profile.json` (the same numbers) and a Chrome/Perfetto trace `trace.json` under
`<training.output_dir>/profile/`. Nothing is checkpointed, exported or logged: the steps' metrics are summed
as in training but never reduced or written (a logging step's one all-reduce is not in the profile).

Options (before or after --config): --warmup N (unprofiled steps first, default 2, >= 0), --steps N (profiled
steps, default 1, >= 1), --sample-host MS (see below; > 0).

    python bench/profile_step.py --sample-host 2 --warmup 3 --steps 3 --config X.yaml model.compile=true

`--sample-host MS` answers a different question, where the host's time goes by Python function: instead of
torch.profiler, a thread reads the main thread's Python stack every MS milliseconds during the steps and the
report gives each function's share of the samples, inclusive (it or what it called was running) and self (it
was the innermost frame, or in the C code it called). Compiled code is sampled as it runs: cProfile and other
profilers that install a profile function make torch.compile's frames run eagerly, so they time other code.
Writes `host_samples.json` there.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # dpo_dist, also when not installed

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from dpo_dist.cli import run_main  # noqa: E402
from dpo_dist.engine import init_distributed  # noqa: E402
from dpo_dist.errors import UserError  # noqa: E402
from dpo_dist.metrics import MetricWindow  # noqa: E402
from dpo_dist.trainer import Trainer  # noqa: E402

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
TOP_OPS = 25
STACK_DEPTH = 4  # Python frames (outside torch) kept per sync site
PHASE_PREFIX = "dpo:"  # trainer.phase's ranges
NO_PHASE = "(outside the phases)"
LAUNCH_UNKNOWN = "(launch not found)"
# Idle spans between kernels shorter than this are the device's own spacing between queued kernels (a few us), not
# a wait for anything
MIN_GAP_US = 5.0
TOP_GAPS = 10


def next_batches(trainer: Trainer, count: int) -> list:
    """The micro-batches of the next `count` optimizer steps, built on the host exactly as Trainer.train
    builds them (same order); built before profiling, so host-side collation is not taken for a sync (the
    profiled steps therefore leave out collation's host time, which training spends during the forwards)."""
    state, steps = trainer.state, []
    for _ in range(count):
        steps.append(list(trainer._micro_batches(state.epoch, state.epoch_step)))
        state.advance(trainer.steps_per_epoch)
    return steps


def run_steps(trainer: Trainer, steps: list) -> None:
    for micro_batches in steps:
        trainer.train_step(micro_batches, MetricWindow(trainer.config.training.token_metrics))


def is_python_frame(name: str) -> bool:
    """with_stack=True adds an event per Python call, named 'path/file.py(line): function'."""
    return ".py(" in name or name.startswith("<built-in")


def top_ops(prof, kernels: list[tuple[str, float, float, float | None]] | None) -> tuple[list[dict], float]:
    """CPU (`kernels` None): the ops (not Python frames) with the most self CPU time, and the total of that time in
    ms. GPU: of `kernels` (`device_kernels`), those with the most device time, and how long the device was busy
    (`kernel_summary`).

    Not the ops' self device time on a GPU: torch's table lists each kernel twice, as itself and as the self device
    time of the op that launched it (aten::mm and its GEMM kernel, an inductor graph's call and its Triton
    kernels), so summing the table doubles the busy time (the fourth and fifth GPU sessions' "41%" and "101%" busy
    were that; bench/RESULTS.md)."""
    if kernels is not None:
        return kernel_summary([(name, start, end) for name, start, end, _ in kernels])
    averages = [event for event in prof.key_averages() if event.self_cpu_time_total > 0 and not is_python_frame(event.key)]
    total = sum(event.self_cpu_time_total for event in averages) or 1
    averages.sort(key=lambda event: event.self_cpu_time_total, reverse=True)
    rows = [
        {"op": event.key, "calls": event.count, "self_ms": event.self_cpu_time_total / 1e3,
         "share": event.self_cpu_time_total / total}
        for event in averages[:TOP_OPS]
    ]
    return rows, total / 1e3


def kernel_summary(kernels: list[tuple[str, float, float]]) -> tuple[list[dict], float]:
    """(name, start us, end us) of each kernel -> the names with the most time (calls, ms, share of all kernels'
    time) and the busy time in ms: the union of the kernels' intervals (kernels on two streams can overlap)."""
    per_name: dict[str, list] = {}
    for name, start, end in kernels:
        calls_and_us = per_name.setdefault(name, [0, 0.0])
        calls_and_us[0] += 1
        calls_and_us[1] += end - start
    total = sum(us for _, us in per_name.values()) or 1
    ranked = sorted(per_name.items(), key=lambda item: item[1][1], reverse=True)
    rows = [{"op": name, "calls": calls, "self_ms": us / 1e3, "share": us / total} for name, (calls, us) in ranked[:TOP_OPS]]
    busy_us, covered_until = 0.0, float("-inf")
    for _, start, end in sorted(kernels, key=lambda kernel: kernel[1]):
        if end > covered_until:
            busy_us += end - max(start, covered_until)
            covered_until = end
    return rows, busy_us / 1e3


def outside_torch(frame: str) -> bool:
    return not frame.startswith("torch/") and "/torch/" not in frame


def python_frames(event) -> list[str]:
    """The innermost Python lines outside torch that led to `event`: its Python-call ancestors in the profile's
    tree, else the stack recorded with the op itself or its nearest ancestor op (the seventh GPU session's H200
    profiles, torch 2.11, named no Python line for any sync, where CPU profiles do: why is not known, so both)."""
    frames, parent = [], event.cpu_parent
    while parent is not None and len(frames) < STACK_DEPTH:
        if ".py(" in parent.name and outside_torch(parent.name):
            frames.append(parent.name)
        parent = parent.cpu_parent
    holder = event
    while not frames and holder is not None:
        frames = [frame for frame in (getattr(holder, "stack", None) or []) if outside_torch(frame)][:STACK_DEPTH]
        holder = holder.cpu_parent
    return frames


def sync_sites(prof, steps: int, regions: list[tuple[str, float, float]]) -> list[dict]:
    """Each host-sync op per step, grouped by the phase it ran in and the innermost Python lines outside torch that
    led to it."""
    counts: dict[tuple, int] = {}
    for event in prof.events():
        if event.name not in SYNC_OPS:
            continue
        key = (event.name, phase_at(regions, event.time_range.start), *python_frames(event))
        counts[key] = counts.get(key, 0) + 1
    sites = [{"op": key[0], "phase": key[1], "per_step": count / steps, "stack": list(key[2:])}
             for key, count in counts.items()]
    sites.sort(key=lambda site: site["per_step"], reverse=True)
    return sites


def phase_regions(prof) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of each trainer.phase range on the host, by start."""
    from torch.autograd import DeviceType

    regions = [(event.name, event.time_range.start, event.time_range.end) for event in prof.events()
               if event.device_type == DeviceType.CPU and event.name.startswith(PHASE_PREFIX)]
    return sorted(regions, key=lambda region: region[1])


def phase_at(regions: list[tuple[str, float, float]], host_us: float | None) -> str:
    """The innermost phase range around host time `host_us` (the shortest that holds it)."""
    if host_us is None:
        return LAUNCH_UNKNOWN
    holding = [(end - start, name) for name, start, end in regions if start <= host_us <= end]
    return min(holding)[1] if holding else NO_PHASE


def phase_times(regions: list[tuple[str, float, float]], steps: int) -> list[dict]:
    """Each phase's host time and calls per step, the most time first. Time on the host, not the device's: with
    the device behind, a phase's time is how long the host took to queue its work (or to wait, at a sync)."""
    totals: dict[str, list] = {}
    for name, start, end in regions:
        calls_and_us = totals.setdefault(name, [0, 0.0])
        calls_and_us[0] += 1
        calls_and_us[1] += end - start
    rows = [{"phase": name, "calls_per_step": calls / steps, "host_ms_per_step": us / 1e3 / steps}
            for name, (calls, us) in totals.items()]
    return sorted(rows, key=lambda row: row["host_ms_per_step"], reverse=True)


def idle_by_phase(kernels: list[tuple[str, float, float, float | None]], regions: list[tuple[str, float, float]],
                  steps: int, min_gap_us: float = MIN_GAP_US) -> dict:
    """Where the device waited. `kernels`: (name, start us, end us, host us at which its launch call began, or None
    where the profile does not link the two) on the device; `regions`: the host's phase ranges.

    Each span longer than `min_gap_us` in which no kernel ran (between the union of the kernels' intervals, so
    from the first kernel to the last) is charged to the kernel that ends it: to the phase around that kernel's
    launch, and as "host late" when the launch began after the span did, i.e. the device had run out of queued
    work and waited for the host to launch more. A kernel launched before the span began was queued in time and
    waited on something else (a kernel on another stream, an event, a copy)."""
    per_phase: dict[str, list] = {}  # phase -> [gaps, idle us, host-late us]
    gaps, idle_us, covered_until = [], 0.0, None
    for name, start, end, launch in sorted(kernels, key=lambda kernel: kernel[1]):
        if covered_until is not None and start - covered_until > min_gap_us:
            gap_us, phase = start - covered_until, phase_at(regions, launch)
            late = launch is not None and launch > covered_until
            row = per_phase.setdefault(phase, [0, 0.0, 0.0])
            row[0] += 1
            row[1] += gap_us
            row[2] += gap_us if late else 0.0
            idle_us += gap_us
            gaps.append({"idle_ms": gap_us / 1e3, "phase": phase, "host_late": late, "next_kernel": name})
        covered_until = end if covered_until is None else max(covered_until, end)
    rows = [{"phase": phase, "idle_ms_per_step": us / 1e3 / steps, "gaps_per_step": count / steps,
             "host_late_ms_per_step": late_us / 1e3 / steps}
            for phase, (count, us, late_us) in per_phase.items()]
    rows.sort(key=lambda row: row["idle_ms_per_step"], reverse=True)
    gaps.sort(key=lambda gap: gap["idle_ms"], reverse=True)
    return {"idle_ms_per_step": idle_us / 1e3 / steps, "by_phase": rows, "longest": gaps[:TOP_GAPS]}


def is_launch_call(name: str) -> bool:
    """A CUDA runtime or driver API call (cudaLaunchKernel, cuLaunchKernelEx: inductor's Triton kernels, ...)."""
    return name.startswith("cuda") or (name.startswith("cu") and name[2:3].isupper())


def device_kernels(prof) -> list[tuple[str, float, float, float | None]]:
    """(name, start us, end us, launch us) of each kernel and device copy. A kernel and the API call that launched
    it share CUPTI's correlation id (kineto's RuntimeActivity, DriverActivity and GpuActivity all report it), an id
    apart from the ops' own (their numbers can collide, so calls are told from ops by name); both link to the op
    they ran under (`linked_correlation_id`: an aten op, or inductor's range named after the Triton kernel). Where
    no call is found the linked op's start stands in (earlier than the launch: the host then looks less late than
    it was), else the launch is unknown."""
    from torch.autograd import DeviceType

    launch_starts, op_starts, kernels = {}, {}, []
    for event in prof.events():
        if event.device_type == DeviceType.CPU:
            (launch_starts if is_launch_call(event.name) else op_starts)[event.id] = event.time_range.start
        # not the device-side spans of record_function regions (an inductor graph's call, ProfilerStep, trainer.phase):
        # they run from a region's first kernel to its last, gaps included, and torch's own table leaves them out too
        elif not getattr(event, "is_user_annotation", False):
            kernels.append(event)
    rows = []
    for event in kernels:
        linked = getattr(event, "linked_correlation_id", 0) or 0  # 0: not linked (or a torch without the attribute)
        launch = launch_starts.get(event.id, op_starts.get(linked) if linked > 0 else None)
        rows.append((event.name, event.time_range.start, event.time_range.end, launch))
    return rows


def main(config, args) -> int:
    if args.warmup < 0 or args.steps < 1 or args.sample_host < 0:
        raise UserError(f"--warmup must be >= 0, --steps >= 1 and --sample-host > 0 when given; got --warmup {args.warmup}, "
                        f"--steps {args.steps}, --sample-host {args.sample_host}")
    trainer = Trainer(config, init_distributed(config.deepspeed.timeout_minutes))
    trainer.setup(train=True)
    if trainer.total_steps < args.warmup + args.steps:
        raise UserError(f"the run has {trainer.total_steps} optimizer steps; --warmup {args.warmup} + --steps {args.steps} need more")
    trainer.policy.train()
    run_steps(trainer, next_batches(trainer, args.warmup))
    profiled = next_batches(trainer, args.steps)
    if args.sample_host:
        return sample_host(trainer, profiled, args.sample_host / 1e3)
    on_gpu = trainer.dist.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities, with_stack=True, record_shapes=False) as prof:
        began = time.perf_counter()
        run_steps(trainer, profiled)
        if on_gpu:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - began) * 1e3
    if trainer.dist.is_main:
        out = Path(config.training.output_dir) / "profile"
        out.mkdir(parents=True, exist_ok=True)
        kernels = device_kernels(prof) if on_gpu else None  # one pass over the events, for both reports
        ops, busy_ms = top_ops(prof, kernels)
        regions = phase_regions(prof)
        summary = {"device": str(trainer.dist.device), "world_size": trainer.dist.world_size, "steps": args.steps,
                   "wall_ms": wall_ms, "busy_ms": busy_ms, "top_ops": ops, "phases": phase_times(regions, args.steps),
                   "idle": idle_by_phase(kernels, regions, args.steps) if on_gpu else None,
                   "syncs": sync_sites(prof, args.steps, regions)}
        (out / "profile.json").write_text(json.dumps(summary, indent=1))
        prof.export_chrome_trace(str(out / "trace.json"))
        print_summary(summary, out)
    trainer.cleanup()
    return 0


class StackSampler(threading.Thread):
    """Records the Python stack of thread `thread_id` every `interval` seconds until `stop` is set: each sample a
    list of 'path:function' names, innermost first. The sampled thread must release the GIL now and then (torch's
    ops do; pure Python is preempted every few milliseconds), so a sample can lag by that much."""

    def __init__(self, thread_id: int, interval: float):
        super().__init__(daemon=True)
        self.thread_id, self.interval = thread_id, interval
        self.stop, self.samples = threading.Event(), []

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            frame, stack = sys._current_frames().get(self.thread_id), []
            while frame is not None:
                stack.append(f"{short_path(frame.f_code.co_filename)}:{frame.f_code.co_name}")
                frame = frame.f_back
            self.samples.append(stack)


def short_path(filename: str) -> str:
    """A library file by its path inside site-packages; this repo's by its path in the repo."""
    for marker in ("site-packages/", "dist-packages/", f"{Path(__file__).resolve().parent.parent}/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def sample_shares(samples: list[list[str]], top: int = TOP_OPS * 2) -> dict:
    """The functions on the most sampled stacks (inclusive) and innermost (self), with their share of samples."""
    inclusive, innermost = collections.Counter(), collections.Counter()
    for stack in samples:
        inclusive.update(set(stack))  # a recursive function counts once per sample
        if stack:
            innermost[stack[0]] += 1
    total = max(len(samples), 1)
    return {"samples": len(samples),
            "inclusive": [{"function": name, "share": count / total} for name, count in inclusive.most_common(top)],
            "self": [{"function": name, "share": count / total} for name, count in innermost.most_common(top)]}


def sample_host(trainer: Trainer, profiled: list, interval: float) -> int:
    sampler = StackSampler(threading.get_ident(), interval)
    sampler.start()
    began = time.perf_counter()
    run_steps(trainer, profiled)
    wall_ms = (time.perf_counter() - began) * 1e3
    sampler.stop.set()
    sampler.join()
    if trainer.dist.is_main:
        out = Path(trainer.config.training.output_dir) / "profile"
        out.mkdir(parents=True, exist_ok=True)
        # The samples of the steps: the thread's first samples can land before run_steps and its last after it
        # (a sample waits for the GIL), which are the sampler's own start and stop, not the steps'
        during = [stack for stack in sampler.samples if any(name.endswith(":run_steps") for name in stack)]
        summary = {"steps": len(profiled), "wall_ms": wall_ms, **sample_shares(during)}
        (out / "host_samples.json").write_text(json.dumps(summary, indent=1))
        print(f"\n{len(profiled)} sampled step(s): {wall_ms:.0f} ms wall, {summary['samples']} samples of rank 0's host")
        for kind in ("inclusive", "self"):
            print(f"{kind} share of the samples:")
            for row in summary[kind]:
                print(f"  {row['share']:6.1%}  {row['function']}")
        print(f"\nwrote {out / 'host_samples.json'}")
    trainer.cleanup()
    return 0


def print_summary(summary: dict, out: Path) -> None:
    unit = "device" if summary["device"].startswith("cuda") else "CPU"
    print(f"\n{summary['steps']} profiled step(s): {summary['wall_ms']:.0f} ms wall (profiler overhead included), "
          f"{unit} busy {summary['busy_ms']:.0f} ms ({summary['busy_ms'] / summary['wall_ms']:.0%})")
    print(f"top {'kernels by device' if unit == 'device' else 'ops by self CPU'} time, rank 0:")
    for row in summary["top_ops"]:
        print(f"  {row['share']:6.1%} {row['self_ms']:10.1f} ms {row['calls']:7d}x  {row['op']}")
    print("\nhost time by phase (trainer.phase), ms per step (collate: built before profiling, so ~0):")
    for row in summary["phases"]:
        print(f"  {row['host_ms_per_step']:9.1f} ms  {row['calls_per_step']:5.1f} calls  {row['phase']}")
    idle = summary["idle"]
    if idle is not None:
        print(f"\ndevice idle {idle['idle_ms_per_step']:.1f} ms per step, in gaps over {MIN_GAP_US:g} us between "
              "kernels, by the phase that launched the kernel ending each gap (host late: launched after the device "
              "ran out of work):")
        for row in idle["by_phase"]:
            print(f"  {row['idle_ms_per_step']:9.1f} ms  {row['gaps_per_step']:7.1f} gaps  "
                  f"host late {row['host_late_ms_per_step']:8.1f} ms  {row['phase']}")
        print("longest gaps:")
        for gap in idle["longest"]:
            late = "  host late" if gap["host_late"] else ""
            print(f"  {gap['idle_ms']:9.2f} ms  {gap['phase']}{late}  then {gap['next_kernel'][:90]}")
    print("\nhost syncs per step, by phase and call site:" if summary["syncs"] else "\nhost syncs per step: none")
    for site in summary["syncs"]:
        print(f"  {site['per_step']:6.1f}  {site['op']}  in {site['phase']}")
        for frame in site["stack"]:
            print(f"           {frame}")
    print(f"\nwrote {out / 'profile.json'} and {out / 'trace.json'}")


if __name__ == "__main__":
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--warmup", type=int, default=2, help="unprofiled optimizer steps first")
    own.add_argument("--steps", type=int, default=1, help="optimizer steps profiled")
    own.add_argument("--sample-host", type=float, default=0, metavar="MS",
                     help="sample the host's Python stack every MS ms instead of running torch.profiler")
    counts, rest = own.parse_known_args()
    run_main(__doc__, lambda config, args: main(config, counts), argv=rest)
