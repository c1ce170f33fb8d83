"""The reference log-prob cache on disk: plan, shards, manifest, fingerprint, verification.

Layout of `cache_dir/`:
- `plan.json`: written first. The fingerprint and the shard plan (which uids go in which shard).
  A rerun with the same plan resumes; a different one is refused unless asked to overwrite.
- `shard-00000.parquet` ...: columns `uid`, `ref_chosen_logps`, `ref_rejected_logps` (TRL's names),
  `chosen_tokens`, `rejected_tokens` (completion token counts). Each is written under a temp
  name, fsynced and renamed, so a shard that exists is complete.
- `manifest.json`: written last, by rank 0, once every shard exists: format version,
  fingerprint, row count, per-shard row counts and sha256. Without it the cache is unfinished.

The fingerprint holds what the reference log-probs depend on: the reference weights (sha256 of
each weight file, recorded with its size and mtime so a later check only re-hashes files whose
size or mtime changed; `verify=True` re-hashes everything), the tokenizer and its chat template,
the tokenization settings and the dtype. The data files' hashes are recorded for information; the
hard data check is per pair: every uid the run needs must have a row, with the same completion
token counts as this run's tokenization. So a cache made for a dataset serves any subset of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_dist.errors import UserError

FORMAT_VERSION = 1
PLAN = "plan.json"
MANIFEST = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
COLUMNS = ("uid", "ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens")


class CacheError(UserError):
    """The cache cannot be trusted for this run; the message says what differs and what to do."""


# ---------------------------------------------------------------- hashing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_model_dir(name: str) -> Path:
    """The directory holding a checkpoint's files: the path itself, or its Hugging Face cache snapshot."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as err:  # the hub client raises several types for "not in the cache"
        raise CacheError(f"reference checkpoint {name}: not a directory and not in the Hugging Face cache ({err})") from None


def weight_hashes(model_dir: Path, known: dict[str, Any] | None = None, verify: bool = False) -> dict[str, dict]:
    """{file: {size, mtime_ns, sha256}} of the weight files; reuses `known` hashes whose size and mtime match."""
    known = known or {}
    hashes = {}
    for path in sorted(model_dir.iterdir()):
        if path.suffix not in WEIGHT_SUFFIXES:
            continue
        stat = path.stat()
        previous = known.get(path.name)
        if not verify and previous and (previous["size"], previous["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
            sha = previous["sha256"]
        else:
            sha = sha256_file(path)
        hashes[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    if not hashes:
        raise CacheError(f"reference checkpoint {model_dir}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) to fingerprint")
    return hashes


def tokenizer_fingerprint(tokenizer) -> dict[str, str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    serialized = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token])
    return {"sha256": sha256_text(serialized + special), "chat_template_sha256": sha256_text(tokenizer.chat_template or "")}


def tokenizer_changes(first: dict, second: dict) -> list[str]:
    """The parts of two `tokenizer_fingerprint`s that differ, named for a message: "the tokenizer" (its
    vocabulary, merges or special tokens) and "the chat template"."""
    changes = []
    if first["sha256"] != second["sha256"]:
        changes.append("the tokenizer")
    if first["chat_template_sha256"] != second["chat_template_sha256"]:
        changes.append("the chat template")
    return changes


def fingerprint(reference_path: str, tokenizer, max_seq_length: int, truncation_mode: str, dtype: str,
                data_files: list[str], known_weights: dict | None = None, verify: bool = False,
                ld_alpha: float | None = None) -> dict:
    """Everything the cached reference log-probs depend on (see the module docstring)."""
    return {
        "reference": {"path": reference_path, "weights": weight_hashes(resolve_model_dir(reference_path), known_weights, verify)},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenization": {"max_seq_length": max_seq_length, "truncation_mode": truncation_mode},
        "scoring": {"ld_alpha": ld_alpha},  # LD-DPO weighs the sums' tokens (dpo.ld_alpha)
        "dtype": dtype,
        "data_files": {name: sha256_file(Path(name)) for name in sorted(set(data_files))},
    }


def fingerprint_differences(cached: dict, current: dict) -> list[str]:
    """Human-readable reasons the cache does not fit the run (empty when it fits)."""
    differences = []
    cached_weights = {name: entry["sha256"] for name, entry in cached["reference"]["weights"].items()}
    current_weights = {name: entry["sha256"] for name, entry in current["reference"]["weights"].items()}
    if cached_weights != current_weights:
        differences.append(
            f"reference weights differ: the cache was computed from {cached['reference']['path']}, "
            f"this run's reference is {current['reference']['path']} (model.ref_model / model.sft_model)"
        )
    for part in tokenizer_changes(cached["tokenizer"], current["tokenizer"]):
        differences.append(f"{part} differs from the one the cache was computed with")
    for key in ("max_seq_length", "truncation_mode"):
        was, now = cached["tokenization"][key], current["tokenization"][key]
        if was != now:
            section = "training" if key == "max_seq_length" else "data"
            differences.append(f"{section}.{key} is {now!r}; the cache was computed with {was!r}")
    # caches written before LD-DPO have no "scoring": plain sums
    was, now = cached.get("scoring", {}).get("ld_alpha"), current.get("scoring", {}).get("ld_alpha")
    if was != now:
        differences.append(f"dpo.ld_alpha is {now!r}; the cache was computed with {was!r}")
    if cached["dtype"] != current["dtype"]:
        differences.append(f"model.dtype resolves to {current['dtype']}; the cache was computed in {cached['dtype']}")
    return differences


# ---------------------------------------------------------------- writing


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename in it), to disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename: the path holds all of `data` or nothing."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)  # make the rename itself durable


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def make_plan(fingerprint_: dict, uids: list[str], rows_per_shard: int) -> dict:
    shards = [
        {"file": shard_name(i), "uids": uids[start : start + rows_per_shard]}
        for i, start in enumerate(range(0, len(uids), rows_per_shard))
    ]
    return {"format_version": FORMAT_VERSION, "fingerprint": fingerprint_, "total_rows": len(uids), "shards": shards}


def same_plan(old: dict, new: dict) -> bool:
    """Resumable when the work is the same: same shards of the same uids, same fingerprint."""
    return (
        old.get("format_version") == new["format_version"]
        and [s["uids"] for s in old.get("shards", [])] == [s["uids"] for s in new["shards"]]
        and not fingerprint_differences(old["fingerprint"], new["fingerprint"])
    )


def write_shard(path: Path, uids: list[str], chosen, rejected, chosen_tokens, rejected_tokens) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "uid": pa.array(uids, pa.string()),
        "ref_chosen_logps": pa.array(chosen, pa.float32()),
        "ref_rejected_logps": pa.array(rejected, pa.float32()),
        "chosen_tokens": pa.array(chosen_tokens, pa.int32()),
        "rejected_tokens": pa.array(rejected_tokens, pa.int32()),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(path, sink.getvalue().to_pybytes())


def write_manifest(cache_dir: Path, plan: dict) -> dict:
    shards = []
    for shard in plan["shards"]:
        path = cache_dir / shard["file"]
        shards.append({"file": shard["file"], "rows": len(shard["uids"]), "sha256": sha256_file(path)})
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": plan["fingerprint"],
        "total_rows": plan["total_rows"],
        "shards": shards,
    }
    write_atomic(cache_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class CachedRow:
    ref_chosen_logps: float
    ref_rejected_logps: float
    chosen_tokens: int
    rejected_tokens: int


def read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict):  # a manifest or plan is an object; anything else was damaged
        raise CacheError(
            f"{path}: the {what} is unreadable (truncated or corrupt); rerun launch/precompute_ref.py with --overwrite"
        )
    return value


def read_manifest(cache_dir: Path) -> dict:
    """The manifest of a finished cache, or a clear error about why there is none."""
    manifest_path = cache_dir / MANIFEST
    if not manifest_path.exists():
        if (cache_dir / PLAN).exists():
            plan = read_json(cache_dir / PLAN, "plan")
            done = sum((cache_dir / s["file"]).exists() for s in plan["shards"])
            raise CacheError(
                f"the reference cache at {cache_dir} is unfinished ({done} of {len(plan['shards'])} shards, no "
                "manifest): rerun launch/precompute_ref.py with the same config; it resumes where it stopped"
            )
        raise CacheError(
            f"no reference cache at {cache_dir}: run launch/precompute_ref.py with this config first "
            "(or point reference.cache_dir at an existing cache)"
        )
    manifest = read_json(manifest_path, "manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{manifest_path}: cache format {manifest.get('format_version')} is not {FORMAT_VERSION}; recompute it")
    return manifest


def read_rows(cache_dir: Path, manifest: dict, verify_checksums: bool = True) -> dict[str, CachedRow]:
    """Every row of every shard, by uid; a missing, altered or short shard is an error naming it."""
    import pyarrow.parquet as pq

    rows: dict[str, CachedRow] = {}
    for shard in manifest["shards"]:
        path = cache_dir / shard["file"]
        if not path.exists():
            raise CacheError(f"{path}: shard listed in the manifest is missing; recompute the cache (--overwrite)")
        if verify_checksums and sha256_file(path) != shard["sha256"]:
            raise CacheError(f"{path}: checksum differs from the manifest (corrupt or modified); recompute the cache (--overwrite)")
        try:
            table = pq.read_table(path, columns=list(COLUMNS)).to_pydict()
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise CacheError(f"{path}: unreadable Parquet ({err}); recompute the cache (--overwrite)") from None
        if len(table["uid"]) != shard["rows"]:
            raise CacheError(f"{path}: {len(table['uid'])} rows, the manifest says {shard['rows']}; recompute the cache")
        for i, uid in enumerate(table["uid"]):
            rows[uid] = CachedRow(
                table["ref_chosen_logps"][i], table["ref_rejected_logps"][i], table["chosen_tokens"][i], table["rejected_tokens"][i]
            )
    return rows


def check_coverage(rows: dict[str, CachedRow], completion_lengths, cache_dir: Path) -> None:
    """Every pair needs a row, tokenized to the same completion lengths as when it was cached. Missing rows
    are reported before changed lengths. `completion_lengths`: (uid, chosen tokens, rejected tokens) per pair,
    as `ExampleStore.completion_lengths` streams them (one pass)."""
    total, missing, first_missing, first_changed = 0, 0, None, None
    for uid, *completion in completion_lengths:
        total += 1
        row = rows.get(uid)
        if row is None:
            missing += 1
            first_missing = first_missing or uid
            continue
        lengths = tuple(completion)
        if first_changed is None and lengths != (row.chosen_tokens, row.rejected_tokens):
            first_changed = (
                f"pair {uid}: completion lengths {lengths} differ from the cache's "
                f"{(row.chosen_tokens, row.rejected_tokens)}; tokenization changed since precompute: recompute the cache"
            )
    if missing:
        raise CacheError(
            f"{missing} of this run's {total} pairs have no row in the reference cache at {cache_dir} "
            f"(first uid {first_missing}); the data, or which of its records dpo-dist keeps, changed since precompute: "
            "rerun launch/precompute_ref.py with --overwrite (or set reference.cache_dir to a new directory)"
        )
    if first_changed:
        raise CacheError(first_changed)
