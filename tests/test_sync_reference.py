"""TR-DPO (`reference.sync_steps`): the reference moves toward the policy every N steps, and a checkpoint keeps it.

Checked against the files the runs write: the reference a checkpoint keeps must be mixup_alpha x the policy's
weights at that step (DeepSpeed's own consolidation of the checkpoint) + (1 - alpha) x the reference kept at
the previous sync, computed here in numpy. A run resumed from the middle must continue as the uninterrupted one.
"""

import shutil

import numpy as np
import pytest
import torch

from dpo_dist.checkpoint import consolidated_checkpoint_state
from dpo_dist.reference import layout_mismatch, move_toward
from launching import assert_ok, read_metrics, run, run_here, torchrun_launch, write_config

ALPHA = 0.5


def weights(path):
    """A saved HF checkpoint's parameters as float64 numpy arrays, read with safetensors (not our loader)."""
    from safetensors.numpy import load_file

    arrays = {}
    for shard in sorted(path.glob("*.safetensors")):
        arrays.update({name: value.astype(np.float64) for name, value in load_file(shard).items()})
    return arrays


def policy_at(checkpoint):
    return {name: value.detach().double().numpy() for name, value in consolidated_checkpoint_state(checkpoint).items()}


def assert_synced(kept, policy, previous):
    assert set(kept) <= set(policy) and set(kept) <= set(previous)
    moved = 0
    for name, value in kept.items():
        expected = ALPHA * policy[name] + (1 - ALPHA) * previous[name]
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7, err_msg=name)
        moved += not np.allclose(value, previous[name])
    assert moved > len(kept) // 2  # the sync really changed the reference


def test_move_toward_mixes_in_the_references_dtype(tiny_policy, tiny_reference):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_reference, dtype=torch.bfloat16)
    before = {name: param.detach().float().numpy().copy() for name, param in reference.named_parameters()}
    move_toward(reference, policy, 0.25)
    for name, param in reference.named_parameters():
        expected = 0.25 * dict(policy.named_parameters())[name].detach().numpy() + 0.75 * before[name]
        assert param.dtype == torch.bfloat16
        np.testing.assert_allclose(param.detach().float().numpy(), expected, rtol=1e-2, atol=1e-2, err_msg=name)
    assert layout_mismatch(reference, policy) is None


def test_layout_mismatch_names_the_parameter(tiny_policy, tmp_path):
    from conftest import make_checkpoint
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_policy)
    wider = AutoModelForCausalLM.from_pretrained(make_checkpoint(tmp_path / "wider", intermediate_size=80))
    assert layout_mismatch(wider, policy) == (
        "model.layers.0.mlp.down_proj.weight is (64, 80) in the reference, (64, 128) in the policy")


def _sync_config(tmp_path, tiny_policy, tiny_reference, output_dir, ds_config="ds_configs/zero2.json"):
    return write_config(
        tmp_path / f"{output_dir.name}.yaml", tiny_policy, tiny_reference, output_dir,
        training={"max_steps": 4, "save_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 1},
        reference={"mode": "model", "sync_steps": 2, "mixup_alpha": ALPHA},
        deepspeed={"config": ds_config},
        data={"eval_files": []},
    )


def test_a_tr_dpo_run_syncs_keeps_and_resumes_its_reference(tmp_path, tiny_policy, tiny_reference):
    out = tmp_path / "run"
    run_here("train.py", _sync_config(tmp_path, tiny_policy, tiny_reference, out))
    start = weights(tiny_reference)
    kept_2, kept_4 = weights(out / "checkpoint-2/reference"), weights(out / "checkpoint-4/reference")
    assert_synced(kept_2, policy_at(out / "checkpoint-2"), start)
    assert_synced(kept_4, policy_at(out / "checkpoint-4"), kept_2)

    # Resume from step 2, as after a crash past it: steps 3 and 4 must score against the synced reference
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("checkpoint-4", "final"))
    printed = run_here("train.py", _sync_config(tmp_path, tiny_policy, tiny_reference, resumed), "training.resume_from=auto")
    expected, _ = read_metrics(out)
    measured, _ = read_metrics(resumed)
    for step in (3, 4):
        for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen"):
            assert measured[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-7), (step, key)
    assert f"reference: the synced reference kept in {resumed / 'checkpoint-2/reference'}" in printed
    for name, value in weights(resumed / "checkpoint-4/reference").items():
        np.testing.assert_allclose(value, kept_4[name], rtol=1e-6, atol=1e-7, err_msg=name)

    # Resume from a step-2 checkpoint that keeps no reference (a run that did not sync): syncing starts over from
    # model.ref_model, so step 3 scores against the original reference and step 4's sync mixes into it.
    unsynced = tmp_path / "unsynced"
    shutil.copytree(out, unsynced, ignore=shutil.ignore_patterns("checkpoint-4", "final", "reference"))
    printed = run_here("train.py", _sync_config(tmp_path, tiny_policy, tiny_reference, unsynced), "training.resume_from=auto")
    assert f"reference: {unsynced / 'checkpoint-2'} keeps no synced reference (that run did not sync); " in printed
    assert_synced(weights(unsynced / "checkpoint-4/reference"), policy_at(unsynced / "checkpoint-4"), start)
    from_start, _ = read_metrics(unsynced)
    assert abs(from_start[3]["rewards/margins"] - expected[3]["rewards/margins"]) > 1e-6  # another reference


@pytest.mark.parametrize("offload", [False, True], ids=["sharded", "offloaded"])
def test_tr_dpo_under_zero3_on_two_ranks(tmp_path, tiny_policy, tiny_reference, offload):
    out = tmp_path / "z3"
    config = _sync_config(tmp_path, tiny_policy, tiny_reference, out, "ds_configs/zero3.json")
    result = run(torchrun_launch("train.py", config, "training.max_steps=3", f"reference.offload={str(offload).lower()}"))
    assert_ok(result)
    kept_2 = weights(out / "checkpoint-2/reference")
    assert_synced(kept_2, policy_at(out / "checkpoint-2"), weights(tiny_reference))
    # Step 3 (no sync) scored with it, and its checkpoint keeps it unchanged (gathered after that step's forwards)
    kept_3 = weights(out / "checkpoint-3/reference")
    assert kept_3.keys() == kept_2.keys() and all(np.array_equal(kept_3[name], kept_2[name]) for name in kept_2)
