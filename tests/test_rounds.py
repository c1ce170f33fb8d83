"""Iterative DPO: round 2 starts from round 1's export and uses it as the reference (here through a
precomputed cache per round); a rerun skips finished rounds."""

import math

import pytest
import yaml

from launching import ROOT, read_metrics, run_here, write_config


def test_two_rounds_second_reference_is_first_policy(tiny_policy, tmp_path):
    lines = (ROOT / "examples/data/demo_train.jsonl").read_text().splitlines(keepends=True)
    files = []
    for index in range(2):
        path = tmp_path / f"round{index}.jsonl"
        path.write_text("".join(lines[index * 96 : (index + 1) * 96]))
        files.append(str(path))
    config = write_config(
        tmp_path / "c.yaml", tiny_policy, None, tmp_path / "out",
        training={"max_steps": 6, "batch_size": 8}, rounds={"train_files": files, "precompute_reference": True},
    )
    run_here("multi_round.py", config)

    round0, round1 = tmp_path / "out" / "round-0", tmp_path / "out" / "round-1"
    saved = yaml.safe_load((round1 / "config.yaml").read_text())
    assert saved["model"]["sft_model"] == saved["model"]["ref_model"] == str(round0 / "final")
    assert saved["data"]["train_files"] == [files[1]] and saved["reference"]["mode"] == "precomputed"
    _, evals0 = read_metrics(round0)
    train1, evals1 = read_metrics(round1)
    # Round 1 begins with policy == reference == round 0's result: zero rewards, loss ln 2, and its
    # policy log-probs are the ones round 0 ended with.
    assert evals1[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert evals1[0]["eval_logps/chosen"] == pytest.approx(evals0[-1]["eval_logps/chosen"], abs=1e-4)
    assert evals0[-1]["eval_loss"] < math.log(2) - 1e-3  # round 0 really moved away from its reference
    assert evals1[-1]["eval_loss"] < evals1[0]["eval_loss"]

    printed = run_here("multi_round.py", config)
    assert "round 0: already done" in printed and "round 1: already done" in printed


def test_a_missing_round_file_is_named_before_any_round_trains(tiny_policy, tmp_path):
    from dpo_dist.config import load_config
    from dpo_dist.errors import UserError
    from dpo_dist.rounds import check_round_files

    first = tmp_path / "r0.jsonl"
    first.write_text("")
    config = load_config(write_config(tmp_path / "c.yaml", tiny_policy, None, tmp_path / "out"),
                         [f"rounds.train_files=[{first}, {tmp_path / 'nope.jsonl'}]"])
    with pytest.raises(UserError) as err:
        check_round_files(config)
    assert str(err.value).startswith(f"rounds.train_files[1]: {tmp_path / 'nope.jsonl'} does not exist")
    check_round_files(load_config(write_config(tmp_path / "c.yaml", tiny_policy, None, tmp_path / "out"),
                                  [f"rounds.train_files=[{first}]"]))
