"""Ranks that load whole models from their own node's files end up with rank 0's model (dpo_dist.replicas).

The end-to-end tests run launch/train.py on two real ranks (torchrun, gloo, ZeRO-2) where each rank starts in
its own "node" directory holding its own copies of the checkpoints, named by the same relative paths: a
rank-1 copy holding other weights must change nothing in what the run computes (checked against a run where
both nodes hold rank 0's copies), and a rank-1 copy of another shape must stop the run with one clear error.
"""

import shutil
import struct
import sys

import pytest
import torch

from conftest import make_checkpoint
from dpo_dist import replicas
from launching import ROOT, assert_ok, free_port, read_metrics, run, write_config

# Each rank starts in <work>/node<RANK>, as if each node had its own disk, then runs launch/train.py unchanged.
PER_NODE = """
import os, runpy, sys
work, config = sys.argv[1], sys.argv[2]
os.chdir(os.path.join(work, "node" + os.environ["RANK"]))
sys.argv = [{train!r}, "--config", config]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_checksum_is_the_exact_integer_sum_of_the_bits():
    values = torch.tensor([1.5, -2.25, 3.0e-3, 65504.0, -0.0], dtype=torch.bfloat16)
    raw = values.view(torch.int16).numpy().tobytes()
    expected = sum(struct.unpack(f"<{values.numel()}h", raw))  # independent: Python integers from the bytes
    assert replicas.tensor_checksum(values) == expected
    nudged = values.clone()
    nudged.view(torch.int16)[2] += 1  # one element, one step of its last bit
    assert replicas.tensor_checksum(nudged) != expected
    # Order-free: the reversed tensor (another summation order on another device) sums to the same integer
    assert replicas.tensor_checksum(values.flip(0)) == expected


def test_device_checksum_sums_in_chunks_like_at_once(monkeypatch):
    values = torch.randn(1000, dtype=torch.float32)
    expected = sum(struct.unpack("<1000i", values.numpy().tobytes()))
    monkeypatch.setattr(replicas, "_CHECKSUM_CHUNK", 7)
    assert replicas.chunked_sum(values.view(torch.int32)) == expected == replicas.tensor_checksum(values)


def test_shape_differences_name_config_keys_and_layout(tmp_path):
    from transformers import AutoModelForCausalLM

    first = replicas.describe(AutoModelForCausalLM.from_pretrained(make_checkpoint(tmp_path / "a", seed=0)))
    reseeded = replicas.describe(AutoModelForCausalLM.from_pretrained(make_checkpoint(tmp_path / "b", seed=5)))
    wider = replicas.describe(AutoModelForCausalLM.from_pretrained(make_checkpoint(tmp_path / "c", intermediate_size=80)))
    assert replicas.shape_differences(first, reseeded) == []  # other weights, same model: not a shape difference
    assert replicas.differing_tensor_counts([first, first, reseeded]) == {2: sum(
        1 for a, b in zip(first["checksums"], reseeded["checksums"]) if a != b)}
    assert replicas.differing_tensor_counts([first, reseeded])[1] > 0
    assert replicas.shape_differences(first, wider) == ["config.json differs in intermediate_size (128 vs 80)"]
    relaid = dict(first, layout="another digest")  # same config, other tensors (another transformers version)
    assert replicas.shape_differences(first, relaid) == ["the tensors differ in name, shape or dtype"]


def _node_copies(work, sources_by_node):
    """<work>/node<r>/<name> for each node r and each (name, source checkpoint)."""
    for rank, sources in enumerate(sources_by_node):
        for name, source in sources.items():
            shutil.copytree(source, work / f"node{rank}" / name)


def _train_on_nodes(work, output_dir):
    """launch/train.py on two ranks, each from its own node directory (model paths relative to it)."""
    config = write_config(
        work / "run.yaml", "model", "ref", output_dir,
        training={"max_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 1},
        deepspeed={"config": str(ROOT / "ds_configs/zero2.json")},
        data={"eval_files": []},
    )
    launcher = work / "per_node.py"
    launcher.write_text(PER_NODE.format(train=str(ROOT / "launch/train.py")))
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), str(launcher), str(work), str(config)])


def test_a_node_with_stale_copies_trains_rank_0s_models(tmp_path, tiny_policy, tiny_reference):
    alike, drifted = tmp_path / "alike", tmp_path / "drifted"
    rank0_copies = {"model": tiny_policy, "ref": tiny_reference}
    _node_copies(alike, [rank0_copies, rank0_copies])
    # Node 1's copies are stale: its "policy" and "reference" hold other weights (the two swapped)
    _node_copies(drifted, [rank0_copies, {"model": tiny_reference, "ref": tiny_policy}])

    result = _train_on_nodes(alike, alike / "out")
    assert_ok(result)
    assert "hold other weights" not in result.stdout
    result = _train_on_nodes(drifted, drifted / "out")
    assert_ok(result)
    for what in ("policy model", "reference model ref"):
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"{what}: the copies loaded by rank 1 on "))
        assert "hold other weights than rank 0's" in line and "every rank now uses rank 0's" in line

    # Every rank scored with rank 0's models, so the run computed what the run with alike copies computed
    expected, _ = read_metrics(alike / "out")
    measured, _ = read_metrics(drifted / "out")
    assert sorted(measured) == sorted(expected) == [1, 2]
    for step in expected:
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "grad_norm"):
            assert measured[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-7), (step, key)


def test_a_node_with_another_model_stops_the_run_with_one_error(tmp_path, tiny_policy, tiny_reference):
    other_shape = make_checkpoint(tmp_path / "other", seed=1, intermediate_size=80)
    _node_copies(tmp_path, [{"model": tiny_policy, "ref": tiny_reference}, {"model": tiny_policy, "ref": other_shape}])
    result = _train_on_nodes(tmp_path, tmp_path / "out")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and all(line == errors[0] for line in errors), result.stderr[-3000:]
    assert "reference model ref: rank 1 on " in errors[0] and "loads another model than rank 0 on " in errors[0]
    assert "config.json differs in intermediate_size (" in errors[0] and "Give every node the same checkpoint" in errors[0]
    assert "dpo_dist/" not in result.stderr  # no traceback through our code (torchrun prints its own on exit 2)
