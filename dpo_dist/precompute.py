"""The offline reference pass: score every train and eval pair once, write the verified cache.

Work is cut into shards of `reference.rows_per_shard` pairs by the plan (not by the number of
ranks), so a rerun on any world size resumes from the shards already on disk. Pending shards are
dealt round-robin to the ranks; each rank writes its shards atomically. Under ZeRO-3 the
reference is sharded and its forwards are collective, so ranks with less work run weight-0 filler
batches until every rank has made the same number of forwards. Rank 0 writes the manifest last,
after a barrier: a cache without a manifest is, visibly, unfinished.
"""

from __future__ import annotations

import json
import time

from dpo_dist import cache as cache_lib
from dpo_dist import data as data_lib
from dpo_dist import tokenization
from dpo_dist.config import Config
from dpo_dist.engine import (DistInfo, barrier, broadcast_from_main, dtype_name, reduce_floats, resolve_dtype,
                              tokenize_shards, training_ds_config)
from dpo_dist.errors import UserError
from dpo_dist.examples import ExampleStore
from dpo_dist.models import load_tokenizer
from dpo_dist.reference import build_model_reference, open_fitting_cache


def unique_examples(config: Config, tokenizer, logger, dist_info: DistInfo) -> ExampleStore:
    """Train then eval pairs, each uid once (a pair in both splits needs one row). The splits are tokenized as
    training tokenizes them (by all ranks together), and kept for it (`data.cache_tokenized`, written by rank 0)."""
    files = config.data.train_files + config.data.eval_files
    if not files:
        raise UserError("data.train_files and data.eval_files are empty: nothing to precompute")
    examples, seen = ExampleStore(), set()
    for split, split_files in (("train", config.data.train_files), ("eval", config.data.eval_files)):
        if not split_files:
            continue
        loaded = tokenization.load_examples(
            split_files, tokenizer, config.training.max_seq_length, config.data.truncation_mode,
            config.data.skip_invalid, logger, split, cache_root=config.tokenized_cache_dir, write_cache=dist_info.is_main,
            shards=tokenize_shards(dist_info), chat_template_kwargs=config.data.chat_template_kwargs,
        )
        for example in loaded:
            if example.uid not in seen:
                seen.add(example.uid)
                examples.append(example)
    return examples


def _prepare_plan(config: Config, tokenizer, dtype_text: str, uids: list[str], overwrite: bool) -> dict | str:
    """Rank 0: the plan to work on (new, or the one on disk to resume), or an error message."""
    cache_dir = config.reference_cache_dir
    if cache_dir.exists() and not cache_dir.is_dir():
        return f"reference.cache_dir {cache_dir} is a file, not a directory: set reference.cache_dir to a directory"
    try:
        fingerprint = cache_lib.fingerprint(
            config.model.reference_path, tokenizer, config.training.max_seq_length, config.data.truncation_mode,
            dtype_text, config.data.train_files + config.data.eval_files, ld_alpha=config.dpo.ld_alpha,
        )
        plan = cache_lib.make_plan(fingerprint, uids, config.reference.rows_per_shard)
        plan_path = cache_dir / cache_lib.PLAN
        if plan_path.exists() and not overwrite:
            old = cache_lib.read_json(plan_path, "plan")
            if not cache_lib.same_plan(old, plan):
                return (
                    f"{cache_dir} holds a reference cache for other data or settings; pass --overwrite to replace "
                    "it, or set reference.cache_dir to a new directory"
                )
            return old
        cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in list(cache_dir.glob("shard-*.parquet")) + [cache_dir / cache_lib.MANIFEST]:
            stale.unlink(missing_ok=True)
        for leftover in cache_dir.glob(".shard-*.tmp-*"):  # half-written shards of a killed run
            leftover.unlink(missing_ok=True)
        cache_lib.write_atomic(plan_path, json.dumps(plan).encode())
        return plan
    except UserError as err:
        return str(err)


def run_precompute(config: Config, dist_info: DistInfo, logger, overwrite: bool = False) -> dict:
    """Write (or finish) the cache for `config`; returns the manifest."""
    tokenizer = load_tokenizer(config.model.policy_path)
    dtype, ds_config = training_ds_config(config, dist_info.world_size)
    examples = unique_examples(config, tokenizer, logger, dist_info)
    position = {uid: i for i, uid in enumerate(examples.uids)}
    plan = _prepare_plan(config, tokenizer, dtype_name(dtype), examples.uids, overwrite) if dist_info.is_main else None
    plan = broadcast_from_main(plan)
    if isinstance(plan, str):
        raise cache_lib.CacheError(plan)

    cache_dir = config.reference_cache_dir
    pending = [i for i, shard in enumerate(plan["shards"]) if not (cache_dir / shard["file"]).exists()]
    barrier()  # every rank has listed what is done before any rank writes
    micro = config.training.micro_eval_batch_size
    batches_of = {i: -(-len(plan["shards"][i]["uids"]) // micro) for i in pending}
    mine = pending[dist_info.rank :: dist_info.world_size]
    forwards_needed = max(
        (sum(batches_of[i] for i in pending[r :: dist_info.world_size]) for r in range(dist_info.world_size)), default=0
    )
    logger.info(
        f"precompute: {len(plan['shards'])} shards of up to {config.reference.rows_per_shard} pairs, "
        f"{len(plan['shards']) - len(pending)} already done, {len(pending)} to score on {dist_info.world_size} rank(s)"
    )

    if pending:
        reference = build_model_reference(config, dtype, ds_config, dist_info.device, logger)
        rows_total = sum(len(plan["shards"][i]["uids"]) for i in mine)
        progress = logger.progress(total=rows_total, desc="precompute", unit="row")
        forwards, tokens, started = 0, 0, time.perf_counter()
        collate = data_lib.collate_for(config.data.packing, config.data.prefix_sharing, config.dpo.ld_alpha)
        for index in mine:
            uids = plan["shards"][index]["uids"]
            columns = {"chosen": [], "rejected": [], "chosen_tokens": [], "rejected_tokens": []}
            for offset in range(0, len(uids), micro):
                batch = collate([examples[position[u]] for u in uids[offset : offset + micro]], tokenizer.pad_token_id)
                scores = reference.logps(batch.to(dist_info.device))
                columns["chosen"] += scores.chosen_logps.tolist()
                columns["rejected"] += scores.rejected_logps.tolist()
                columns["chosen_tokens"] += scores.chosen_tokens.tolist()
                columns["rejected_tokens"] += scores.rejected_tokens.tolist()  # .tolist() waits for the device
                forwards += 1
                tokens += batch.num_tokens
            cache_lib.write_shard(cache_dir / plan["shards"][index]["file"], uids, *columns.values())
            progress.update(len(uids))  # tqdm shows rows/s and the ETA
        filler = collate([examples[0]], tokenizer.pad_token_id, [0.0]).to(dist_info.device)
        for _ in range(forwards_needed - forwards):  # ZeRO-3 forwards are collective: stay in step
            reference.logps(filler)
        progress.close()
        log_scoring_rate(logger, rows_total, tokens, time.perf_counter() - started, dist_info)
    barrier()
    manifest = cache_lib.write_manifest(cache_dir, plan) if dist_info.is_main else None
    barrier()
    logger.info(f"precompute: wrote {cache_dir} ({plan['total_rows']} rows)")
    return manifest


def log_scoring_rate(logger, rows: int, tokens: int, seconds: float, dist_info: DistInfo) -> None:
    """One line with what the ranks scored and how fast, model loading left out (the slowest rank's time):
    what a precomputed reference costs against the reference forward it saves in every epoch (tokens as
    training's num_tokens, so the rates compare). A collective: every rank calls it (all see the same
    pending shards)."""
    total_rows, total_tokens = reduce_floats([rows, tokens], "sum", dist_info.device)
    [slowest] = reduce_floats([seconds], "max", dist_info.device)
    logger.info(f"precompute: scored {int(total_rows)} pairs, {int(total_tokens):,} tokens in {slowest:.2f} s on "
                f"{dist_info.world_size} rank(s): {total_tokens / max(slowest, 1e-9):,.0f} tokens/s")


def verify_cache(config: Config, dist_info: DistInfo, logger) -> dict:
    """Full check of an existing cache: re-hash the reference weights and every shard, check coverage."""
    tokenizer = load_tokenizer(config.model.policy_path)
    examples = unique_examples(config, tokenizer, logger, dist_info)
    manifest, rows = open_fitting_cache(config, tokenizer, resolve_dtype(config.model.dtype), examples.completion_lengths(), verify=True)
    logger.info(f"verify: {config.reference_cache_dir} is complete and fits this config ({len(rows)} rows, weights re-hashed)")
    return manifest
