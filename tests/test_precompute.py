"""A precompute killed with kill -9 resumes (here on another world size, with the reference ZeRO-3
sharded) and ends with the rows of a clean run; a shard that exists is always complete."""

import json
import os
import random
import signal
import subprocess
import time

import pytest

from dpo_dist import cache as cache_lib
from launching import ROOT, assert_ok, python_launch, run, run_here, torchrun_launch, write_config

from make_demo_data import _pair

pytestmark = pytest.mark.multirank
SHARDS = 60


@pytest.fixture(scope="module")
def big_data(tmp_path_factory):
    rng = random.Random(5)
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(_pair(rng)) + "\n" for _ in range(SHARDS * 25)))
    return path


def tokenized_pairs(config_path):
    """The train pairs as the trainer tokenizes them under this config."""
    from transformers import AutoTokenizer

    from dpo_dist.config import load_config
    from dpo_dist.tokenization import load_examples
    from dpo_dist.metrics import NullLogger

    config = load_config(config_path)
    return load_examples(config.data.train_files, AutoTokenizer.from_pretrained(config.model.policy_path),
                         config.training.max_seq_length, config.data.truncation_mode, False, NullLogger(), "train")


def config_for(tmp_path, policy, reference, data, cache_dir):
    return write_config(
        tmp_path / f"{cache_dir.name}.yaml", policy, reference, tmp_path / "run",
        data={"train_files": [str(data)], "eval_files": []},
        reference={"rows_per_shard": 25, "cache_dir": str(cache_dir)},
    )


def test_kill_9_then_resume_on_two_ranks_gives_the_clean_rows(tiny_policy, tiny_reference, big_data, tmp_path):
    clean_config = config_for(tmp_path, tiny_policy, tiny_reference, big_data, tmp_path / "clean")
    run_here("precompute_ref.py", clean_config)

    cache_dir = tmp_path / "killed"
    killed_config = config_for(tmp_path, tiny_policy, tiny_reference, big_data, cache_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        python_launch("precompute_ref.py", killed_config), cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 120
    while len(list(cache_dir.glob("shard-*.parquet"))) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    written = sorted(cache_dir.glob("shard-*.parquet"))
    assert not (cache_dir / "manifest.json").exists()
    assert 3 <= len(written) < SHARDS, len(written)
    import pyarrow.parquet as pq

    done_uids = set()
    for shard in written:  # whatever exists is whole
        table = pq.read_table(shard)
        assert table.num_rows == 25
        done_uids.update(table.column("uid").to_pylist())
    with pytest.raises(cache_lib.CacheError, match=f"unfinished \\({len(written)} of {SHARDS} shards"):
        cache_lib.read_manifest(cache_dir)

    # Resume on 2 ranks with the reference ZeRO-3 sharded across them: the ranks get unequal numbers
    # of shards, so the one with less work runs filler forwards to keep the collectives in step.
    result = run(torchrun_launch("precompute_ref.py", killed_config, "deepspeed.config=ds_configs/zero3.json"))
    assert_ok(result)
    assert f"{len(written)} already done, {SHARDS - len(written)} to score on 2 rank(s)" in result.stdout
    # the scoring rate's line counts what both ranks scored: the pending pairs' tokens, from the tokenized data
    pending_tokens = sum(example.num_tokens for example in tokenized_pairs(killed_config) if example.uid not in done_uids)
    assert f"precompute: scored {(SHARDS - len(written)) * 25} pairs, {pending_tokens:,} tokens in " in result.stdout

    clean = cache_lib.read_rows(tmp_path / "clean", cache_lib.read_manifest(tmp_path / "clean"))
    resumed = cache_lib.read_rows(cache_dir, cache_lib.read_manifest(cache_dir))
    assert len(clean) == SHARDS * 25 and clean.keys() == resumed.keys()
    for uid, row in clean.items():  # the same batches; ZeRO-3 gathers the same weights: equal to float32 rounding
        assert resumed[uid].chosen_tokens == row.chosen_tokens and resumed[uid].rejected_tokens == row.rejected_tokens
        assert resumed[uid].ref_chosen_logps == pytest.approx(row.ref_chosen_logps, abs=1e-5)
        assert resumed[uid].ref_rejected_logps == pytest.approx(row.ref_rejected_logps, abs=1e-5)


def test_rerun_of_a_finished_cache_does_nothing_and_other_settings_are_refused(tiny_policy, tiny_reference, big_data, tmp_path):
    config = config_for(tmp_path, tiny_policy, tiny_reference, big_data, tmp_path / "c")
    run_here("precompute_ref.py", config)
    manifest = (tmp_path / "c" / "manifest.json").read_text()
    assert f"{SHARDS} already done, 0 to score" in run_here("precompute_ref.py", config)
    assert (tmp_path / "c" / "manifest.json").read_text() == manifest
    result = run(python_launch("precompute_ref.py", config, "training.max_seq_length=64"))
    assert result.returncode == 2 and "pass --overwrite to replace it" in result.stderr
    run_here("precompute_ref.py", config, "training.max_seq_length=64", "--overwrite")
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["fingerprint"]["tokenization"]["max_seq_length"] == 64
