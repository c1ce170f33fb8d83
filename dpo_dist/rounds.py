"""Iterative (multi-round) DPO: round r starts from round r-1's exported policy and uses it as
its reference, on round r's training file.

Each round is an ordinary run in `output_dir/round-<r>/` with `resume_from=auto`, so a killed
round continues from its last checkpoint and a finished round (its `final/` exists) is skipped:
the sequence resumes at round granularity, and inside a round at checkpoint granularity. With
LoRA, the next round needs a full model to start from, so rounds export merged weights and the
next round starts from `final/merged/` (with a fresh adapter, its reference the merged model).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dpo_dist.config import Config
from dpo_dist.errors import UserError


def round_dir(config: Config, index: int) -> Path:
    return Path(config.training.output_dir) / f"round-{index}"


def round_policy_export(config: Config, index: int) -> Path:
    """Where round `index` leaves the full-model policy the next round starts from."""
    final = round_dir(config, index) / "final"
    return final / "merged" if config.lora is not None else final


def round_config(config: Config, index: int) -> Config:
    """The run config of round `index` (0-based)."""
    model = config.model
    if index > 0:
        previous = str(round_policy_export(config, index - 1))
        model = dataclasses.replace(model, sft_model=previous, ref_model=previous)
    out = round_dir(config, index)
    reference = config.reference
    if config.rounds.precompute_reference:
        reference = dataclasses.replace(reference, mode="precomputed", cache_dir=str(out / "reference_cache"))
    return dataclasses.replace(
        config,
        model=model,
        data=dataclasses.replace(config.data, train_files=[config.rounds.train_files[index]]),
        training=dataclasses.replace(config.training, output_dir=str(out), resume_from="auto", overwrite_output_dir=False),
        reference=reference,
        export=dataclasses.replace(config.export, merge=config.export.merge or config.lora is not None),
        rounds=None,
    )


def check_round_files(config: Config) -> None:
    """Every round's training file, before round 0 trains: a missing last file found only after the earlier
    rounds had trained would cost their hours, and the data reader's error would name data.train_files."""
    for index, name in enumerate(config.rounds.train_files):
        if not Path(name).is_file():
            raise UserError(f"rounds.train_files[{index}]: {name} does not exist (every round's file is checked "
                            "before the first round trains)")


def round_is_done(config: Config, index: int) -> bool:
    return (round_dir(config, index) / "final").is_dir()
