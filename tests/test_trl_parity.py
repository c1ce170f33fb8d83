"""Parity with TRL: `launch/evaluate.py` reports the same eval metrics as `trl.DPOTrainer.evaluate()`.

Same policy, a DIFFERENT reference checkpoint (so rewards are not trivially 0), the same records,
the same beta and max length, fp32 on CPU. Run once with plain-string records and once with chat
records. The data is chosen to exercise the tokenization rules both tools share: EOS appended to
plain completions, a prompt/completion token merge (the completion starts at the common prefix),
sequences longer than max_length (keep_start truncation) and one pair whose prompt alone fills
max_length (dropped by both).

TRL runs in this process; ours runs as the real `python launch/evaluate.py` subprocess.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import CHAT_RECORD, DEMO_EVAL, PLAIN_RECORD, write_jsonl
from launching import run_here, write_config

BETA = 0.1
TOLERANCE = 1e-4

# Metrics both tools define the same way (TRL's names). TRL also reports `eval_num_tokens`, but there it
# is the cumulative number of TRAINING tokens (0 before training), not the eval tokens we count, so it is
# not compared; runtime is TRL-only, num_pairs is ours only.
REQUIRED = {
    "eval_loss",
    "eval_rewards/chosen",
    "eval_rewards/rejected",
    "eval_rewards/accuracies",
    "eval_rewards/margins",
    "eval_logps/chosen",
    "eval_logps/rejected",
    "eval_logits/chosen",
    "eval_logits/rejected",
    "eval_entropy",
    "eval_mean_token_accuracy",
}
NOT_COMPARABLE = {"eval_num_tokens"}


def _demo_records(conversational: bool) -> list[dict]:
    records = [json.loads(line) for line in DEMO_EVAL.read_text().splitlines() if line.strip()]
    return [r for r in records if isinstance(r["prompt"], list) == conversational]


def _as_plain(record: dict) -> dict:
    """A chat demo record as a plain-string one: the last user turn, then ' Answer:' style completions."""
    return {
        "prompt": record["prompt"][-1]["content"] + "\nAnswer:",
        "chosen": " " + record["chosen"][0]["content"],
        "rejected": " " + record["rejected"][0]["content"],
    }


LONG_NUMBERS = " ".join(str((7 * i) % 100) for i in range(40))
# The tiny random models (tied embeddings) put their argmax on the current token, so a completion that repeats
# its tokens makes mean_token_accuracy non-zero: without it both tools would report 0 and agree trivially.
REPEATS_RECORD = {"prompt": "Say 7:\nAnswer:", "chosen": " 7 7 7 7", "rejected": " 7 8"}
CHAT_REPEATS_RECORD = {
    "prompt": [{"role": "user", "content": "Say 7:"}],
    "chosen": [{"role": "assistant", "content": "7 7 7 7"}],
    "rejected": [{"role": "assistant", "content": "7 8"}],
}


def plain_records() -> list[dict]:
    records = _demo_records(conversational=False)  # 12 in the demo file
    records += [_as_plain(r) for r in _demo_records(conversational=True)[:6]]
    records += [
        PLAIN_RECORD,
        # "...Answer: 2 1" + "3" tokenizes as "... 2 13": the completion starts before the prompt's end.
        {"prompt": "Sort ascending: 13 2\nAnswer: 2 1", "chosen": "3", "rejected": "3 2"},
        # The prompt alone is longer than max_length: both tools drop this pair.
        {"prompt": f"Sort ascending: {LONG_NUMBERS}\nAnswer:", "chosen": " 0 7", "rejected": " 7 0"},
        # An empty completion: both tools score the EOS alone.
        {"prompt": "Sort ascending: 4 2\nAnswer:", "chosen": " 2 4", "rejected": ""},
    ]
    return records


def chat_records() -> list[dict]:
    records = _demo_records(conversational=True)[:18]
    records += [
        CHAT_RECORD,
        {
            "prompt": [{"role": "user", "content": f"Sort ascending: {LONG_NUMBERS}"}],
            "chosen": [{"role": "assistant", "content": "0 7"}],
            "rejected": [{"role": "assistant", "content": "7 0"}],
        },
    ]
    return records


def implicit(make_records):
    """The same pairs with the prompt left implicit (no "prompt" key; chosen and rejected both start with it),
    as in hh-rlhf-style data; both tools split it off again (TRL with its maybe_extract_prompt). Pairs where one
    side is the start of the other are left out: we refuse those, TRL splits them inside a word."""
    from dpo_dist.records import split_implicit_prompt

    def records() -> list[dict]:
        joined = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in make_records()]
        return [r for r in joined if not isinstance(split_implicit_prompt(r["chosen"], r["rejected"]), str)]

    return records


def with_record(make_records, record: dict):
    return lambda: make_records() + [record]


# (records, max_seq_length): the lengths are chosen so that some pairs are truncated (checked below).
CASES = {
    "plain": (with_record(plain_records, REPEATS_RECORD), 20),
    "chat": (with_record(chat_records, CHAT_REPEATS_RECORD), 40),
    "plain-implicit": (implicit(with_record(plain_records, REPEATS_RECORD)), 20),
    "chat-implicit": (implicit(with_record(chat_records, CHAT_REPEATS_RECORD)), 40),
}


# Every per-pair loss both tools define the same way, in one weighted mix (distinct weights: a wrong loss moves the
# sum). The batch-level ones (aot, aot_unpaired, sft) are checked over one batch (BATCH_LEVEL_MIXES).
LOSS_MIX = {
    "loss_type": ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
                  "apo_down", "discopop", "sigmoid_norm"],
    "loss_weights": [1.0, 0.9, 0.05, 0.7, 0.6, 0.5, 0.4, 0.003, 0.3, 0.2, 0.15, 0.1],
    "label_smoothing": 0.01,  # robust's flip rate, exo_pair's epsilon
}


# The losses TRL lets another f-divergence replace the log-ratios in (its f_divergence_loss_types, less sft).
F_DIVERGENCE_MIX = {
    "loss_type": ["sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm"],
    "loss_weights": [1.0, 0.7, 0.05, 0.5, 0.3, 0.2, 0.1],
    "label_smoothing": 0.01,
}


def trl_evaluate(policy_path, reference_path, records: list[dict], max_length: int, output_dir, losses=None):
    """TRL's DPOTrainer.evaluate() on `records` (sigmoid DPO, or the `losses` settings); returns (metrics, the
    prepared eval dataset)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")

    args = DPOConfig(
        output_dir=str(output_dir),
        beta=BETA,
        **(losses or {"loss_type": ["sigmoid"]}),
        max_length=max_length,
        truncation_mode="keep_start",
        # The whole eval set is ONE batch. TRL logs the mean over batches of per-batch means (and its logits/*,
        # entropy and mean_token_accuracy are token-weighted within a batch only), while we weight every pair / token of the eval set
        # equally; with a single TRL batch the two definitions coincide exactly.
        per_device_eval_batch_size=len(records),
        # TRL's config defaults to bf16=True even on CPU. Accelerate then wraps the REFERENCE model's forward
        # in a bf16 autocast (the policy's eval forward is not wrapped), which moves rewards/* and loss by
        # ~1e-4 away from the fp32 truth. Both tools must be fp32 here.
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        dataset_num_proc=None,
        precompute_ref_log_probs=False,
    )
    dataset = Dataset.from_list(records)
    trainer = DPOTrainer(
        model=load(policy_path),
        ref_model=load(reference_path),
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(policy_path),
    )
    return trainer.evaluate(), trainer.eval_dataset


def ours_evaluate(policy_path, reference_path, records: list[dict], max_length: int, tmp_path, losses=None,
                  eval_batch: int = 4) -> dict:
    eval_file = write_jsonl(tmp_path / "eval.jsonl", records)
    output_dir = tmp_path / "ours"
    config = write_config(
        tmp_path / "config.yaml",
        policy_path,
        reference_path,
        output_dir,
        model={"dtype": "float32", "attn_implementation": "sdpa"},
        dpo={"beta": BETA, **(losses or {"loss_type": "sigmoid"})},
        # A small eval batch that does not divide the pair count: our metrics are global pair / token means,
        # independent of batching and of the weight-0 padding pairs that fill the last batch.
        training={"max_seq_length": max_length, "batch_size": 4, "eval_batch_size": eval_batch},
        data={"eval_files": [str(eval_file)], "truncation_mode": "keep_start"},
    )
    printed = run_here("evaluate.py", config)
    written = json.loads((output_dir / "eval_results.json").read_text())
    assert json.dumps(written) in printed.splitlines()
    return written


@pytest.mark.parametrize("case", sorted(CASES))
def test_evaluate_matches_trl(case, tiny_policy, tiny_reference, tmp_path):
    make_records, max_length = CASES[case]
    records = make_records()
    assert all(isinstance(r["chosen"], list) == case.startswith("chat") for r in records)

    trl_metrics, trl_dataset = trl_evaluate(tiny_policy, tiny_reference, records, max_length, tmp_path / "trl")
    ours = ours_evaluate(tiny_policy, tiny_reference, records, max_length, tmp_path)

    # The data really exercises truncation and the prompt-too-long drop, and both tools keep the same pairs.
    lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in trl_dataset]
    assert any(length > max_length for length in lengths), "no pair is truncated: lengthen the data"
    assert len(trl_dataset) < len(records), "no pair is dropped for a prompt that fills max_length"
    assert ours["eval_num_pairs"] == len(trl_dataset)

    shared = (set(trl_metrics) & set(ours)) - NOT_COMPARABLE
    assert REQUIRED <= shared, f"metrics missing from one side: {sorted(REQUIRED - shared)}"

    # The reference is really a different model: with reference == policy every reward is exactly 0.
    assert abs(ours["eval_rewards/chosen"]) > 1e-3 and abs(ours["eval_rewards/rejected"]) > 1e-3
    assert abs(ours["eval_loss"] - math.log(2)) > 1e-3
    assert ours["eval_mean_token_accuracy"] > 0.01 and ours["eval_entropy"] > 0.1  # compared below, and not trivially

    diffs = {key: abs(float(ours[key]) - float(trl_metrics[key])) for key in sorted(shared)}
    print(f"\n[{case}] max abs diff vs TRL: " + ", ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    mismatched = {key: (ours[key], trl_metrics[key]) for key, diff in diffs.items() if not diff <= TOLERANCE}
    assert not mismatched, f"ours vs TRL differ by more than {TOLERANCE}: {mismatched}"


def test_loss_mix_matches_trl(tiny_policy, tiny_reference, tmp_path):
    """TRL's and our eval loss for every loss both define, summed with weights: TRL adds each loss's batch mean
    times its weight, we each pair's weighted sum; over one TRL batch the two are the same number."""
    records = plain_records()
    trl_metrics, _ = trl_evaluate(tiny_policy, tiny_reference, records, 20, tmp_path / "trl", LOSS_MIX)
    ours = ours_evaluate(tiny_policy, tiny_reference, records, 20, tmp_path, LOSS_MIX)
    assert ours["eval_loss"] == pytest.approx(trl_metrics["eval_loss"], abs=TOLERANCE)
    sigmoid_only, _ = trl_evaluate(tiny_policy, tiny_reference, records, 20, tmp_path / "trl-sigmoid")
    assert abs(ours["eval_loss"] - sigmoid_only["eval_loss"]) > 0.1  # the mix is really another loss
    for key in ("eval_rewards/chosen", "eval_rewards/margins"):  # every loss logs beta * log-ratio, as TRL
        assert ours[key] == pytest.approx(trl_metrics[key], abs=TOLERANCE)


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_matches_trl(divergence, tiny_policy, tiny_reference, tmp_path):
    """f-DPO: TRL and we put f'(pi/pi_ref) in place of the log-ratios in every loss that allows it."""
    records = plain_records()
    losses = {**F_DIVERGENCE_MIX, "f_divergence_type": divergence, "f_alpha_divergence_coef": 0.3}
    trl_metrics, _ = trl_evaluate(tiny_policy, tiny_reference, records, 20, tmp_path / "trl", losses)
    ours = ours_evaluate(tiny_policy, tiny_reference, records, 20, tmp_path, losses)
    assert ours["eval_loss"] == pytest.approx(trl_metrics["eval_loss"], abs=TOLERANCE)
    reverse, _ = trl_evaluate(tiny_policy, tiny_reference, records, 20, tmp_path / "trl-reverse", F_DIVERGENCE_MIX)
    assert abs(ours["eval_loss"] - reverse["eval_loss"]) > 1e-3  # the divergence really changed the loss


def test_wpo_weighting_matches_trl(tiny_policy, tiny_reference, tmp_path):
    """WPO (use_weighting): each pair's losses times the policy's length-normalised probabilities of its two
    completions; TRL and we agree on the weighted eval loss, which is far from the unweighted one."""
    records = plain_records()
    losses = {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [1.0, 0.5], "use_weighting": True}
    trl_metrics, _ = trl_evaluate(tiny_policy, tiny_reference, records, 20, tmp_path / "trl", losses)
    ours = ours_evaluate(tiny_policy, tiny_reference, records, 20, tmp_path, losses)
    assert ours["eval_loss"] == pytest.approx(trl_metrics["eval_loss"], abs=TOLERANCE)
    (tmp_path / "unweighted").mkdir()
    unweighted = ours_evaluate(tiny_policy, tiny_reference, records, 20, tmp_path / "unweighted",
                               {**losses, "use_weighting": False})
    assert abs(ours["eval_loss"] - unweighted["eval_loss"]) > 1e-3


# Losses of a whole batch, not of each pair alone: AOT sorts the batch's pairs, sft averages over all its chosen
# tokens (TRL 1.16's MPO example mixes it in).
BATCH_LEVEL_MIXES = {
    "aot": {"loss_type": ["aot", "aot_unpaired"], "loss_weights": [1.0, 0.5], "label_smoothing": 0.05},
    "mpo": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
}


@pytest.mark.parametrize("mix", sorted(BATCH_LEVEL_MIXES))
def test_batch_level_losses_match_trl_over_one_batch(mix, tiny_policy, tiny_reference, tmp_path):
    """A pair's loss depends on its batch-mates: over the same single batch (ours one pair larger than the pairs
    kept, so it holds a weight-0 padding pair that must count nowhere), TRL's and our eval loss agree; split into
    batches of 4 it is another number (further from the one batch's than the tolerance)."""
    records = plain_records()
    losses = BATCH_LEVEL_MIXES[mix]
    trl_metrics, trl_dataset = trl_evaluate(tiny_policy, tiny_reference, records, 20, tmp_path / "trl", losses)
    ours = ours_evaluate(tiny_policy, tiny_reference, records, 20, tmp_path, losses, eval_batch=len(trl_dataset) + 1)
    assert ours["eval_loss"] == pytest.approx(trl_metrics["eval_loss"], abs=TOLERANCE)
    (tmp_path / "batches").mkdir()
    in_batches = ours_evaluate(tiny_policy, tiny_reference, records, 20, tmp_path / "batches", losses)
    assert abs(in_batches["eval_loss"] - ours["eval_loss"]) > 2 * TOLERANCE  # aot: 4.4e-4 here, beta 0.1 keeps it small


def test_ld_alpha_matches_trl(tiny_policy, tiny_reference, tmp_path):
    """LD-DPO: the policy's and the reference's sums weigh the tokens past the shorter answer by ld_alpha; TRL's and
    our eval metrics agree (the log-probs too, which TRL reports weighted), and they are not the plain ones."""
    records = plain_records()
    losses = {"loss_type": ["sigmoid"], "ld_alpha": 0.4}
    trl_metrics, _ = trl_evaluate(tiny_policy, tiny_reference, records, 20, tmp_path / "trl", losses)
    ours = ours_evaluate(tiny_policy, tiny_reference, records, 20, tmp_path, losses)
    for key in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected"):
        assert ours[key] == pytest.approx(trl_metrics[key], abs=TOLERANCE), key
    plain, _ = trl_evaluate(tiny_policy, tiny_reference, records, 20, tmp_path / "trl-plain")
    assert abs(ours["eval_logps/rejected"] - plain["eval_logps/rejected"]) > 0.1
    assert abs(ours["eval_loss"] - plain["eval_loss"]) > 2 * TOLERANCE  # 3.8e-4: the pairs' shifts partly cancel


# A Qwen3-like template that reads what a record's TRL columns pass: its tools (a system turn naming them) and
# chat_template_kwargs' enable_thinking (false: the generation prompt holds the empty thinking block, which the
# last assistant turn always renders, so the completion starts after it instead of with it).
THINKING_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nTools:' }}{%- for tool in tools %}{{- ' ' + tool.function.name }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
SORT_TOOL = json.dumps([{"type": "function", "function": {"name": "sort_numbers", "description": "Sort numbers.",
                                                          "parameters": {"type": "object", "properties": {}}}}])


def test_tools_and_chat_template_kwargs_match_trl(tiny_policy, tiny_reference, tmp_path):
    """A record's `tools` and `chat_template_kwargs` columns (TRL 1.16's) reach the chat template in both tools:
    the same pairs, the same tokens scored, the same metrics; and they change what is scored."""
    import shutil

    from transformers import AutoTokenizer

    from dpo_dist.records import Record, validate
    from dpo_dist.tokenization import render_texts

    policy = shutil.copytree(tiny_policy, tmp_path / "policy")
    (policy / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    trajectory = {  # an agent's completion: a tool call, the tool's answer, the answer (scored whole by both)
        "prompt": [{"role": "user", "content": "Sort ascending: 8 2"}],
        "chosen": [{"role": "assistant", "content": "sort_numbers 8 2"}, {"role": "tool", "content": "2 8"},
                   {"role": "assistant", "content": "2 8"}],
        "rejected": [{"role": "assistant", "content": "8 2"}],
    }
    records = [r | {"chat_template_kwargs": {"enable_thinking": i % 2 == 1}, "tools": SORT_TOOL if i % 3 == 0 else None}
               for i, r in enumerate(chat_records() + [trajectory])]
    # (thinking on: with it off, this template's generation prompt holds the empty thinking block that only the
    # conversation's last assistant turn renders, so an earlier turn does not start with it: refused, naming the record)
    records[-1]["chat_template_kwargs"] = {"enable_thinking": True}
    trl_metrics, _ = trl_evaluate(policy, tiny_reference, records, 64, tmp_path / "trl")
    ours = ours_evaluate(policy, tiny_reference, records, 64, tmp_path)
    for key in sorted(REQUIRED):
        assert ours[key] == pytest.approx(trl_metrics[key], abs=TOLERANCE), key

    tokenizer = AutoTokenizer.from_pretrained(policy)
    normalised, _ = validate(records[0])  # enable_thinking false, and the tool
    with_options = render_texts(Record(uid="x", location="x", **normalised), tokenizer)
    assert with_options[0].endswith("<think>\n\n</think>\n\n") and "Tools: sort_numbers" in with_options[0]
    plain = {key: normalised[key] for key in ("prompt", "chosen", "rejected")}
    assert not render_texts(Record(uid="x", location="x", **plain), tokenizer)[0].endswith("</think>\n\n")
