"""Fill .whl/ with the wheels bench/gpu_suite.sh needs on the GPU machine, which has no package index.

    python bench/gpu_wheels.py            # then: device run with carry [".whl"]; gpu_suite.sh installs them

The machine's image (Python 3.12, x86-64) has torch, transformers, peft, accelerate, pyarrow and most small
libraries (the list below, from the workplace's KINDS.md, read 2026-11-17), but not deepspeed, trl, datasets or
liger-kernel. This takes those four and transformers and peft at the versions installed HERE (the versions
the CPU suite passed with; liger-kernel, GPU-only, at the version the H200 runs used), then every requirement of theirs the image lacks, or holds at a version their
specifier rules out, recursively. Wheels are for CPython 3.12 on manylinux x86-64; a package published only
as a source archive (deepspeed: its CUDA ops build at run time) is built here into a pure-Python wheel.
"""

import re
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".whl"
TOP = ["deepspeed", "trl", "datasets", "liger-kernel", "transformers", "peft"]
NOT_HERE = {"liger-kernel": "0.8.5"}  # GPU-only, so not installed here: the version the H200 runs used
# What the image holds, by name (KINDS.md, "Python packages already there"), and the versions a session saw
DEVICE_HAS = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer
click cloudpickle colorama contourpy cycler einops filelock fonttools frozenlist fsspec h11 hf-xet httpcore httpx
huggingface-hub idna jinja2 joblib markdown markdown-it-py markupsafe matplotlib mdurl ml-dtypes msgpack multidict
networkx ninja numpy nvidia-ml-py packaging pandas pillow pip pluggy propcache protobuf psutil pyarrow py-cpuinfo
pygments pyparsing python-dateutil pyyaml regex requests rich safetensors scipy sentencepiece setuptools
shellingham six sympy tensorboard tiktoken tokenizers toolz torch tqdm transformers triton typer typing-extensions
urllib3 wheel wrapt xxhash yarl zipp peft
""".split())
DEVICE_VERSIONS = {"huggingface-hub": "1.33.0", "tokenizers": "0.23.2", "safetensors": "0.8.0", "numpy": "2.5.2",
                   "accelerate": "1.15.0", "transformers": "5.17.0", "torch": "2.11.0", "triton": "3.6.0"}
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64"]
DEVICE_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
              "platform_machine": "x86_64", "sys_platform": "linux", "platform_system": "Linux"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(wheel: Path) -> list[Requirement]:
    """The wheel's unconditional requirements on the device (no extras, markers evaluated for Python 3.12)."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    needed = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        if requirement.marker is None or requirement.marker.evaluate({**DEVICE_ENV, "extra": ""}):
            needed.append(requirement)
    return needed


def fetch(spec: str, into: Path) -> Path:
    """One wheel for the device: a binary for CPython 3.12 where one is published, else built from source."""
    before = set(into.iterdir())
    pip = [sys.executable, "-m", "pip"]
    got = subprocess.run([*pip, "download", "-q", "--no-deps", *PLATFORM, "-d", str(into), spec], capture_output=True, text=True)
    if got.returncode != 0:
        built = subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(into), spec], capture_output=True, text=True)
        if built.returncode != 0:
            raise SystemExit(f"error: no wheel for {spec}:\n{got.stderr[-1500:]}\n{built.stderr[-1500:]}")
    [wheel] = set(into.iterdir()) - before
    return wheel


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        queue = [f"{name}=={NOT_HERE[name] if name in NOT_HERE else version(name)}" for name in TOP]
        taken: dict[str, Path] = {}
        while queue:
            spec = queue.pop(0)
            name = normalized(Requirement(spec).name)
            if name in taken:
                continue
            wheel = fetch(spec, scratch)
            taken[name] = wheel
            print(f"{wheel.name:70} {wheel.stat().st_size / 2**20:6.1f} MiB")
            for requirement in requirements(wheel):
                needed = normalized(requirement.name)
                on_device = DEVICE_VERSIONS.get(needed)
                if needed in taken or (needed in DEVICE_HAS and (on_device is None or requirement.specifier.contains(on_device))):
                    continue
                try:  # the version this machine runs, where it satisfies the requirement
                    here = version(needed)
                    queue.append(f"{needed}=={here}" if requirement.specifier.contains(here) else str(requirement))
                except PackageNotFoundError:
                    queue.append(str(requirement))
        OUT.mkdir(exist_ok=True)
        for old in OUT.glob("*.whl"):
            old.unlink()
        for wheel in taken.values():
            wheel.rename(OUT / wheel.name)
    total = sum(wheel.stat().st_size for wheel in OUT.glob("*.whl"))
    print(f"wrote {len(taken)} wheels to {OUT} ({total / 2**20:.1f} MiB; a device call carries at most 64 MiB with the tree)")


if __name__ == "__main__":
    main()
