"""What every launch script shares: arguments, config loading, and user errors without tracebacks.

`deepspeed` passes `--local_rank=N` to the script, torchrun and srun set LOCAL_RANK; both work.
A `UserError` (bad config key, malformed data line, missing model) prints one line prefixed with
`error:` on rank 0 (each rank finds the same mistake) and exits with status 2.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import sys
import typing
from typing import Any, Callable

from dpo_dist.config import FOREIGN_NAMES, SECTIONS, Config, foreign_answer, key_homes, load_config
from dpo_dist.engine import shutdown_distributed
from dpo_dist.errors import UserError

EXIT_USER_ERROR = 2


def _describe(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def describe_keys() -> str:
    """Every config key with its type, default and help: the body of `launch/train.py --help`."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            allowed = f" [{' | '.join(choices)}]" if choices else ""
            lines.append(f"  {section}.{f.name} ({_describe(hints[f.name])}, default {default!r}){allowed}")
            lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def parse_args(description: str, argv: list[str] | None = None, flags: tuple[tuple[str, str], ...] = ()) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=description,
        epilog="overrides: section.key=value words after the config, e.g. training.num_epochs=1\n\n"
        "config keys:\n" + describe_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for flag, help_text in flags:
        parser.add_argument(flag, action="store_true", help=help_text)
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    # Intermixed: overrides may stand on both sides of a flag (deepspeed's launcher puts --local_rank first)
    args, unknown = parser.parse_known_intermixed_args(argv)
    if unknown:
        parser.error(unknown_flag_message(unknown, sys.argv[1:] if argv is None else argv))
    return args


def unknown_flag_message(unknown: list[str], argv: list[str]) -> str:
    """What to write instead of a flag the script does not have (OpenRLHF's and TRL's scripts take settings as
    flags: --beta 0.1, --ref_offload)."""
    flag = next((word for word in unknown if word.startswith("-")), unknown[0])
    name, _, value = flag.lstrip("-").partition("=")
    name = name.replace("-", "_")
    if not value and flag in argv:  # the flag's value, unless the next word is an override or another flag
        following = argv[argv.index(flag) + 1:]
        value = following[0] if following and "=" not in following[0] and not following[0].startswith("--") else ""
    homes, foreign = key_homes(name), FOREIGN_NAMES.get(name, "")
    answer_is_a_key = foreign in key_homes(foreign.rpartition(".")[2])  # an answer that is section.key alone
    key = homes[0] if homes else (foreign if answer_is_a_key else None)
    if key is not None:  # a key of this config: the word to write (a switch given alone turns it on)
        instead = f": {key}={value or ('true' if _is_switch(key) else '...')}"
    elif foreign:
        instead = f"; --{name}: {foreign_answer(name)}"
    else:
        instead = " (e.g. training.num_epochs=1; --help lists every key)"
    return f"unrecognized arguments: {' '.join(unknown)}. Settings are section.key=value words after --config here{instead}"


def _is_switch(key: str) -> bool:
    section, name = key.split(".")
    return typing.get_type_hints(SECTIONS[section])[name] is bool


def run_main(
    description: str,
    body: Callable[[Config, argparse.Namespace], int | None],
    argv: list[str] | None = None,
    flags: tuple[tuple[str, str], ...] = (),
) -> None:
    """Parse, load the config, run `body(config, args)`; user errors become one clean line and exit 2.

    `flags` are extra on/off switches of a script, as (flag, help) pairs."""
    args = parse_args(description, argv, flags)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        config = load_config(args.config, args.overrides)
        status = body(config, args)
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        exit_process(EXIT_USER_ERROR)
    exit_process(status or 0)


def exit_process(status: int) -> None:
    """End the process with `status` once its work is done, skipping the interpreter's teardown.

    Destroying the process groups does not end gloo's worker threads: DeepSpeed keeps a group of its own in a
    module global (deepspeed.utils.groups._WORLD_GROUP), so two groups' threads were still running after
    destroy_process_group in a 2-rank ZeRO-3 run. Their objects then die in the interpreter's teardown, and
    now and then that aborts the process ("terminate called without an active exception", pytorch issue
    190489): twice in this project's CI, a finished run (status 0) and a SIGUSR1 stop (status 75) turned into
    a crash (250) that a scheduler would read as a failed job. So: destroy the groups, run the exit functions
    (atexit: logging, tempfile and the like) as a normal exit would, flush, and leave with os._exit, which
    runs no teardown. Every file this project writes is closed or renamed into place before this point."""
    shutdown_distributed()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
