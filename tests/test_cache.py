"""The reference cache: values, verification, and every way it can be wrong refusing to train."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_dist import cache as cache_lib
from dpo_dist.config import load_config
from dpo_dist.data import collate
from dpo_dist.tokenization import load_examples
from dpo_dist.examples import ExampleStore
from dpo_dist.engine import resolve_dtype
from dpo_dist.metrics import NullLogger
from dpo_dist.reference import load_precomputed_reference
from launching import python_launch, run, run_here, write_config
from test_logps import naive_completion_logps


@pytest.fixture(scope="module")
def cache_run(tiny_policy, tiny_reference, tmp_path_factory):
    """A finished cache from a one-process precompute, 6 shards of 100 pairs (576 pairs in all)."""
    root = tmp_path_factory.mktemp("cache")
    config_path = write_config(
        root / "c.yaml", tiny_policy, tiny_reference, root / "run", reference={"rows_per_shard": 100, "cache_dir": str(root / "cache")}
    )
    return config_path, root / "cache", run_here("precompute_ref.py", config_path)


def open_cache(config_path, *overrides, cache_dir=None):
    """Load the cache as training would, for the train + eval examples of `config_path` with overrides."""
    words = list(overrides) + ([f"reference.cache_dir={cache_dir}"] if cache_dir else [])
    config = load_config(config_path, words)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model.policy_path)
    examples = ExampleStore()
    for files in (config.data.train_files, config.data.eval_files):
        examples.extend(load_examples(files, tokenizer, config.training.max_seq_length, config.data.truncation_mode, False, NullLogger(), "x"))
    dtype = resolve_dtype(config.model.dtype)
    return load_precomputed_reference(config, tokenizer, dtype, examples.completion_lengths(), NullLogger()), examples, tokenizer


def test_layout_and_values_equal_a_naive_reference_forward(cache_run, tiny_reference):
    config_path, cache_dir, printed = cache_run
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["total_rows"] == 576 and [s["rows"] for s in manifest["shards"]] == [100] * 5 + [76]
    assert set(manifest["fingerprint"]) >= {"reference", "tokenizer", "tokenization", "dtype", "data_files"}
    import pyarrow.parquet as pq

    assert set(cache_lib.COLUMNS) <= set(pq.read_schema(cache_dir / "shard-00000.parquet").names)
    reference, examples, tokenizer = open_cache(config_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_reference, dtype=torch.float32).eval()
    batch = collate(examples[:5] + examples[-3:], tokenizer.pad_token_id)  # train and eval pairs
    with torch.no_grad():
        expected = naive_completion_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
    cached = reference.logps(batch)
    torch.testing.assert_close(torch.cat([cached.chosen_logps, cached.rejected_logps]), expected, atol=1e-5, rtol=0)
    assert "row/s" in printed  # the rank-0 progress bar reports throughput


def test_serves_a_subset_of_its_data(cache_run, tmp_path):
    config_path, cache_dir, _ = cache_run
    subset = tmp_path / "subset.jsonl"
    lines = Path(load_config(config_path).data.train_files[0]).read_text().splitlines()
    subset.write_text("\n".join(lines[10:40]) + "\n")
    reference, examples, _ = open_cache(config_path, f"data.train_files=[{subset}]")
    assert len(examples) == 30 + 64 and len(reference.rows) == 576


def damaged_copy(cache_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    return copy


def corrupt_shard(c):
    path = c / "shard-00002.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate_manifest(c):
    path = c / "manifest.json"
    path.write_text(path.read_text()[:100])


def half_done(c):
    (c / "manifest.json").unlink()
    (c / "shard-00004.parquet").unlink()


@pytest.mark.parametrize(
    "damage, overrides, message",
    [
        (corrupt_shard, [], "shard-00002.parquet: checksum differs from the manifest"),
        (truncate_manifest, [], "manifest.json: the manifest is unreadable (truncated or corrupt)"),
        (lambda c: (c / "manifest.json").write_text("[]"), [], "manifest.json: the manifest is unreadable"),  # JSON, no object
        (lambda c: (c / "shard-00001.parquet").unlink(), [], "shard-00001.parquet: shard listed in the manifest is missing"),
        (half_done, [], "is unfinished (5 of 6 shards, no manifest)"),
        (None, ["training.max_seq_length=64"], "training.max_seq_length is 64; the cache was computed with 128"),
        (None, ["data.truncation_mode=keep_end"], "data.truncation_mode is 'keep_end'"),
        (None, ["model.dtype=bfloat16"], "model.dtype resolves to"),
        (None, ["dpo.ld_alpha=0.5"], "dpo.ld_alpha is 0.5; the cache was computed with None"),
    ],
)
def test_refuses_a_cache_that_does_not_fit(cache_run, tmp_path, damage, overrides, message):
    config_path, cache_dir, _ = cache_run
    copy = damaged_copy(cache_dir, tmp_path)
    if damage:
        damage(copy)
    with pytest.raises(cache_lib.CacheError) as err:
        open_cache(config_path, *overrides, cache_dir=copy)
    assert message in str(err.value)


def test_refuses_another_reference_checkpoint(cache_run, tiny_policy):
    config_path, _, _ = cache_run
    with pytest.raises(cache_lib.CacheError, match="reference weights differ: the cache was computed from .*reference"):
        open_cache(config_path, f"model.ref_model={tiny_policy}")


def test_changed_record_is_a_missing_row(cache_run, tmp_path):
    config_path, _, _ = cache_run
    data = tmp_path / "edited.jsonl"
    lines = Path(load_config(config_path).data.train_files[0]).read_text().splitlines()
    record = json.loads(lines[0])
    record["rejected"][0]["content"] += " 0"
    data.write_text(json.dumps(record) + "\n" + "\n".join(lines[1:20]) + "\n")
    with pytest.raises(cache_lib.CacheError, match="1 of this run's 84 pairs have no row in the reference cache") as err:
        open_cache(config_path, f"data.train_files=[{data}]")
    assert "rerun launch/precompute_ref.py with --overwrite" in str(err.value)  # without it, precompute refuses


def test_precompute_refuses_a_cache_dir_that_is_a_file(tmp_path):
    from dpo_dist.precompute import _prepare_plan

    (tmp_path / "cache").write_text("")
    config = load_config(write_config(tmp_path / "c.yaml", "x", None, tmp_path / "out"),
                         [f"reference.cache_dir={tmp_path / 'cache'}"])
    assert _prepare_plan(config, None, "float32", [], overwrite=False) == (
        f"reference.cache_dir {tmp_path / 'cache'} is a file, not a directory: set reference.cache_dir to a directory")


def test_weights_hashed_once_then_checked_by_size_and_mtime(cache_run, tiny_reference, monkeypatch):
    _, cache_dir, _ = cache_run
    known = json.loads((cache_dir / "manifest.json").read_text())["fingerprint"]["reference"]["weights"]
    calls = []
    original = cache_lib.sha256_file
    monkeypatch.setattr(cache_lib, "sha256_file", lambda p: calls.append(p) or original(p))
    assert cache_lib.weight_hashes(tiny_reference, known) == known
    assert calls == []  # size and mtime unchanged: nothing re-read
    assert cache_lib.weight_hashes(tiny_reference, known, verify=True) == known
    assert len(calls) == 1  # --verify re-hashes the weight file


def test_training_refuses_with_one_clear_line_and_verify_passes(cache_run, tmp_path):
    config_path, cache_dir, _ = cache_run
    run_here("precompute_ref.py", config_path, "--verify")
    copy = damaged_copy(cache_dir, tmp_path)
    corrupt_shard(copy)
    result = run(python_launch("train.py", config_path, "reference.mode=precomputed", f"reference.cache_dir={copy}"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: " in result.stderr and "checksum differs" in result.stderr
    assert not (Path(load_config(config_path).training.output_dir) / "metrics.jsonl").exists()  # nothing trained


def test_lora_policy_trains_from_the_cache(cache_run, tmp_path):
    config_path, cache_dir, _ = cache_run
    printed = run_here("train.py", config_path, "reference.mode=precomputed", f"reference.cache_dir={cache_dir}",
                       "lora.r=4", "training.max_steps=3", f"training.output_dir={tmp_path / 'lora'}")
    assert "no reference model loaded" in printed and (tmp_path / "lora" / "final" / "adapter_model.safetensors").exists()


def test_a_changed_tokenizer_or_chat_template_is_named():
    base = {"reference": {"path": "ref", "weights": {"model.safetensors": {"sha256": "w"}}},
            "tokenizer": {"sha256": "vocab", "chat_template_sha256": "template"},
            "tokenization": {"max_seq_length": 128, "truncation_mode": "keep_start"}, "dtype": "float32"}
    assert cache_lib.fingerprint_differences(base, base) == []
    other_template = base | {"tokenizer": {"sha256": "vocab", "chat_template_sha256": "another"}}
    assert cache_lib.fingerprint_differences(base, other_template) == [
        "the chat template differs from the one the cache was computed with"
    ]
    both = base | {"tokenizer": {"sha256": "another", "chat_template_sha256": "another"}}
    assert cache_lib.fingerprint_differences(base, both) == [
        "the tokenizer differs from the one the cache was computed with",
        "the chat template differs from the one the cache was computed with",
    ]


def test_a_cache_scored_with_another_ld_alpha_is_named():
    """LD-DPO weighs the reference's sums too, so dpo.ld_alpha is part of what a cache fits; a cache written
    before the setting existed (no "scoring") holds plain sums and fits a run without it."""
    old = {"reference": {"path": "ref", "weights": {"model.safetensors": {"sha256": "w"}}},
           "tokenizer": {"sha256": "vocab", "chat_template_sha256": "template"},
           "tokenization": {"max_seq_length": 128, "truncation_mode": "keep_start"}, "dtype": "float32"}
    plain, weighted = old | {"scoring": {"ld_alpha": None}}, old | {"scoring": {"ld_alpha": 0.5}}
    assert cache_lib.fingerprint_differences(old, plain) == []
    assert cache_lib.fingerprint_differences(plain, weighted) == ["dpo.ld_alpha is 0.5; the cache was computed with None"]
    assert cache_lib.fingerprint_differences(old, weighted) == ["dpo.ld_alpha is 0.5; the cache was computed with None"]
