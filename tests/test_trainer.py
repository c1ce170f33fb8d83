"""One-process runs through launch/train.py: what lands in output_dir, LoRA, gradient checkpointing."""

import json

import pytest
import torch
import yaml

from dpo_dist.metrics import TOKEN_METRICS
from launching import ROOT, read_metrics, run_here, write_config

TRL_NAMES = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy",
    "grad_norm", "learning_rate", "tokens_per_second",
)


def test_lora_with_gradient_checkpointing_trains_and_exports_an_adapter(tiny_policy, tiny_reference, tmp_path):
    out = tmp_path / "run"
    config = write_config(
        tmp_path / "c.yaml", tiny_policy, tiny_reference, out,
        model={"gradient_checkpointing": True}, lora={"r": 4, "alpha": 8},
        training={"max_steps": 6, "logging_steps": 3, "warmup_ratio": 0.5},
    )
    run_here("train.py", config)

    train, evals = read_metrics(out)
    assert sorted(train) == [3, 6]
    for name in TRL_NAMES:
        assert name in train[6], name
    # 6 steps, 3 of them warmup (1/4, 2/4, 3/4 of the peak), then the linear decay (1, 2/3, 1/3): as transformers 5's
    # Trainer (so TRL) logs it, a step's rate is the one it trained with, not the scheduler's next one
    assert train[3]["learning_rate"] == pytest.approx(0.75e-3) and train[6]["learning_rate"] == pytest.approx(1e-3 / 3)
    # num_tokens as TRL logs it: trained on so far; each window's share is its rate x its time
    for start, end in ((0, 3), (3, 6)):
        window = train[end]["tokens_per_second"] * train[end]["step_seconds"] * (end - start)
        assert train[end]["num_tokens"] - train.get(start, {}).get("num_tokens", 0) == pytest.approx(window, rel=1e-6)
    assert list(out.glob("tensorboard/events.out.tfevents.*"))
    # the run's summary, as HF's Trainer ends TRL's runs: the loss over all steps is the windows' step-weighted mean
    summary = json.loads((out / "train_results.json").read_text())
    assert summary["train_loss"] == pytest.approx((3 * train[3]["loss"] + 3 * train[6]["loss"]) / 6, rel=1e-12)
    assert summary["train_steps"] == 6 and summary["epoch"] == train[6]["epoch"]
    runtime = summary["train_runtime"]
    steps_seconds = 3 * (train[3]["step_seconds"] + train[6]["step_seconds"])  # the windows' train time, no eval
    assert steps_seconds <= runtime < steps_seconds + 60
    assert summary["train_steps_per_second"] * runtime == pytest.approx(6, rel=1e-9)
    assert summary["train_samples_per_second"] * runtime == pytest.approx(6 * 4, rel=1e-9)  # 4 pairs per step
    assert summary["train_tokens_per_second"] * runtime == pytest.approx(train[6]["num_tokens"], rel=1e-9)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lora"]["r"] == 4 and saved["model"]["ref_model"] == str(tiny_reference)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    ids = torch.tensor([[1, 20, 30, 40, 2]])
    base_logits = base(ids).logits
    adapted = PeftModel.from_pretrained(base, out / "final").eval()
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 4
    assert not torch.allclose(adapted(ids).logits, base_logits)  # the trained adapter changes the model
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_offloaded_reference_and_no_token_metrics_give_the_same_losses(tiny_policy, tiny_reference, tmp_path):
    """reference.offload puts the reference under ZeRO-3 parameter offload (CPU), training.token_metrics false skips
    the per-token metrics' passes over the vocabulary; neither may move a number, and the second leaves exactly those
    four metrics out of the train and eval records."""
    token_metric_names = set(TOKEN_METRICS)
    runs, printed = {}, {}
    for name, offload, token_metrics in (("baseline", False, True), ("offload", True, True),
                                         ("no-token-metrics", False, False)):
        out = tmp_path / name
        config = write_config(tmp_path / f"{name}.yaml", tiny_policy, tiny_reference, out,
                              training={"max_steps": 4, "token_metrics": token_metrics}, reference={"offload": offload})
        printed[name] = run_here("train.py", config)
        runs[name] = read_metrics(out)
    assert "reference: model, its parameters offloaded to CPU (reference.offload)" in printed["offload"]
    assert "reference: model, its parameters offloaded" not in printed["baseline"] and "reference: model" in printed["baseline"]
    baseline_train, baseline_evals = runs["baseline"]
    assert sorted(baseline_train) == [1, 2, 3, 4] and len(baseline_evals) == 2
    for name in ("offload", "no-token-metrics"):
        train, evals = runs[name]
        for step, record in baseline_train.items():
            for metric in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
                assert train[step][metric] == pytest.approx(record[metric], abs=1e-6), (name, step, metric)
        assert [e["eval_loss"] for e in evals] == pytest.approx([e["eval_loss"] for e in baseline_evals], abs=1e-6)
    for record in (*baseline_train.values(), *runs["offload"][0].values()):
        assert token_metric_names <= set(record)
    dropped = set(baseline_train[4]) - set(runs["no-token-metrics"][0][4])
    assert dropped == token_metric_names
    eval_dropped = set(baseline_evals[-1]) - set(runs["no-token-metrics"][1][-1])
    assert eval_dropped == {f"eval_{name}" for name in token_metric_names}


@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_reference_free_losses_load_no_reference(tiny_policy, tmp_path, loss_type):
    out = tmp_path / loss_type
    config = write_config(tmp_path / "c.yaml", tiny_policy, None, out, dpo={"loss_type": loss_type, "beta": 1.0},
                          training={"max_steps": 12, "logging_steps": 2})
    printed = run_here("train.py", config)
    assert "reference: none" in printed and "reference: rank 0 holds" not in printed
    train, evals = read_metrics(out)
    if loss_type == "orpo":  # ORPO's loss contains the NLL term, so it is above it
        assert all(train[s]["loss"] > train[s]["nll_loss"] for s in train)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_sft_weight_adds_the_chosen_nll(tiny_policy, tiny_reference, tmp_path):
    """Same run with and without sft_weight: the first step's loss differs by exactly weight x nll_loss."""
    first = {}
    for weight in (0.0, 0.5):
        out = tmp_path / f"w{weight}"
        config = write_config(tmp_path / f"{weight}.yaml", tiny_policy, tiny_reference, out, dpo={"sft_weight": weight},
                              training={"max_steps": 1}, data={"eval_files": []})
        run_here("train.py", config)
        first[weight] = read_metrics(out)[0][1]
    assert first[0.5]["nll_loss"] == pytest.approx(first[0.0]["nll_loss"], rel=1e-6) and first[0.0]["nll_loss"] > 1.0
    assert first[0.5]["loss"] == pytest.approx(first[0.0]["loss"] + 0.5 * first[0.0]["nll_loss"], abs=1e-5)


def test_sft_files_are_mixed_in_and_learned(tiny_policy, tiny_reference, tmp_path):
    sft = tmp_path / "sft.jsonl"
    records = [{"prompt": f"Sort ascending: {a} {b}\nAnswer:", "completion": f" {min(a, b)} {max(a, b)}"} for a, b in zip(range(10), range(50, 60))]
    records += [{"messages": [{"role": "user", "content": f"Sort ascending: {a} 3"}, {"role": "assistant", "content": f"3 {a}"}]} for a in range(4, 14)]
    sft.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_policy, tiny_reference, out, training={"max_steps": 10, "logging_steps": 5},
                          data={"sft_files": [str(sft)], "sft_ratio": 0.5, "eval_files": []})
    assert "sft: 20 pairs from 1 file(s)" in run_here("train.py", config)
    train, _ = read_metrics(out)
    assert train[10]["sft_nll_loss"] < train[5]["sft_nll_loss"]  # the SFT completions get more likely
    assert "sft_nll_loss" in train[5] and train[5]["num_pairs"] == 5 * 4


def test_demo_lora_recipe_runs(tiny_policy, tmp_path):
    """configs/demo_lora.yaml as shipped (on the test's tiny model): trains, and exports adapter + merged model."""
    run_here("train.py", ROOT / "configs" / "demo_lora.yaml", f"model.base_model={tiny_policy}",
             f"training.output_dir={tmp_path}", "training.max_steps=8")
    assert (tmp_path / "final" / "adapter_model.safetensors").exists() and (tmp_path / "final" / "merged" / "model.safetensors").exists()


def test_packing_trains_like_padding(tiny_policy, tiny_reference, tmp_path):
    """data.packing changes the layout, not the numbers: per-step losses match the padded run's."""
    losses = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        config = write_config(tmp_path / f"{packing}.yaml", tiny_policy, tiny_reference, out,
                              training={"max_steps": 4}, data={"packing": packing, "eval_files": []})
        run_here("train.py", config)
        train, _ = read_metrics(out)
        losses[packing] = [train[step]["loss"] for step in sorted(train)]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_setup_refuses_a_run_too_big_for_the_gpu_before_loading_anything(tiny_policy, tmp_path, monkeypatch):
    """Trainer.setup plans with the trainer's own DeepSpeed config, world size and dtype, and refuses before
    the data and the models; the GPU's memory is injected (a CPU has no limit, so it never refuses)."""
    from dpo_dist import trainer as trainer_lib
    from dpo_dist.config import load_config
    from dpo_dist.engine import DistInfo, training_ds_config
    from dpo_dist.errors import UserError
    from dpo_dist.models import read_model_config
    from dpo_dist.planner import ModelShape, plan_memory

    class PastTheCheck(Exception):
        pass

    def reached_data(self, train):
        raise PastTheCheck

    monkeypatch.setattr(trainer_lib.Trainer, "_setup_data", reached_data)  # stop where loading begins
    path = write_config(tmp_path / "c.yaml", tiny_policy, None, tmp_path / "out", training={"max_seq_length": 1024})
    dtype, ds_config = training_ds_config(load_config(path), 1)
    plan = plan_memory(load_config(path), ModelShape.from_hf_config(read_model_config(str(tiny_policy))), ds_config, 1,
                       "float32", None)

    def setup(device_bytes, *overrides):
        monkeypatch.setattr(trainer_lib, "device_memory_bytes", lambda device: device_bytes)
        trainer = trainer_lib.Trainer(load_config(path, list(overrides)), DistInfo(0, 1, 0, torch.device("cpu")))
        try:
            trainer.setup(train=True)
        finally:
            trainer.cleanup()

    too_small = plan.total - 2**20
    advice = plan_memory(load_config(path), ModelShape.from_hf_config(read_model_config(str(tiny_policy))), ds_config, 1,
                         "float32", too_small).advice
    with pytest.raises(UserError) as err:
        setup(too_small)
    assert f"try: {advice[0]}" in str(err.value) and "training.memory_check=false" in str(err.value)
    for device_bytes, overrides in ((plan.total + 2**20, ()), (too_small, ("training.memory_check=false",)), (None, ())):
        with pytest.raises(PastTheCheck):
            setup(device_bytes, *overrides)


def test_group_by_length_keeps_every_pair_and_cuts_padding():
    from dpo_dist.data import epoch_order, length_grouped_order

    lengths = [(i * 37) % 101 for i in range(400)]
    order = epoch_order(400, epoch=0, seed=1, shuffle=True)
    grouped = length_grouped_order(order, lengths, group_size=100, trained=400)
    assert sorted(grouped) == list(range(400)) and set(grouped[:100]) == set(order[:100])

    def padding(sequence):  # padded tokens in micro-batches of 4
        return sum(4 * max(lengths[i] for i in sequence[k : k + 4]) - sum(lengths[i] for i in sequence[k : k + 4])
                   for k in range(0, len(sequence), 4))

    assert padding(grouped) < 0.3 * padding(order)


def test_group_by_length_leaves_out_what_the_shuffle_leaves_out():
    """The pairs past an epoch's last whole global batch are left out of it: with grouping, the shuffle's tail
    (a different set each epoch), not the shortest pairs of the last window (the same ones every epoch)."""
    from dpo_dist.data import epoch_order, length_grouped_order, steps_per_epoch

    lengths = list(range(10))  # pair i has length i
    global_batch = 4
    trained = steps_per_epoch(10, global_batch) * global_batch
    left_out = []
    for epoch in range(5):
        order = epoch_order(10, epoch, seed=1, shuffle=True)
        grouped = length_grouped_order(order, lengths, group_size=50 * global_batch, trained=trained)
        assert sorted(grouped) == list(range(10)) and grouped[trained:] == order[trained:]
        assert grouped[:trained] == sorted(order[:trained], key=lambda i: -lengths[i])
        left_out.append(set(grouped[trained:]))
    assert len(set(map(frozenset, left_out))) > 1 and set().union(*left_out) != {0, 1}


def test_resume_auto_without_a_checkpoint_starts_over_without_the_killed_attempts_records(tiny_policy, tmp_path):
    """`training.resume_from=auto` (what every SLURM start and multi-round round passes) in an output_dir where an
    attempt was killed before its first checkpoint: the run starts over, and metrics.jsonl holds its own records
    only, each step once (the killed attempt's records stayed and doubled steps 0-18 in a review's run)."""
    out = tmp_path / "run"
    out.mkdir()
    killed = [{"step": step, "time": 1.0, "loss": 123.0} for step in range(0, 5)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in killed))
    config = write_config(tmp_path / "c.yaml", tiny_policy, None, out, data={"eval_files": []},
                          training={"max_steps": 3, "save_steps": 0, "resume_from": "auto"})
    run_here("train.py", config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 3]
    assert all(record["loss"] != 123.0 for record in records)


def test_resuming_with_another_number_of_steps_is_refused_unless_the_rate_is_constant(tiny_policy, tmp_path):
    """A checkpoint's learning-rate schedule spans its run's planned steps: resumed with more (a reviewer's 2 -> 5
    steps), the first step trained at the finished schedule's rate, 0, and the next jumped onto the new one. Refused,
    naming both counts; a constant rate without warmup has no length and continues."""
    from dpo_dist.errors import UserError

    config = write_config(tmp_path / "c.yaml", tiny_policy, None, tmp_path / "run", data={"eval_files": []},
                          training={"max_steps": 2, "save_steps": 0, "learning_rate": 1e-3})
    run_here("train.py", config)
    with pytest.raises(UserError, match="checkpoint-2 belongs to a run of 2 optimizer steps, whose learning-rate schedule "
                                        r"\(training.lr_scheduler=linear, warmup_ratio=0.0\) spans them; training.num_epochs "
                                        "/ max_steps now give 5"):
        run_here("train.py", config, "training.resume_from=auto", "training.max_steps=5")
    constant = ("training.lr_scheduler=constant", "training.resume_from=auto")
    run_here("train.py", config, "training.lr_scheduler=constant", "training.output_dir=" + str(tmp_path / "flat"))
    run_here("train.py", config, *constant, "training.max_steps=3", "training.output_dir=" + str(tmp_path / "flat"))
    records = [json.loads(line) for line in (tmp_path / "flat" / "metrics.jsonl").read_text().splitlines()]
    assert [(record["step"], record["learning_rate"]) for record in records] == [(1, 1e-3), (2, 1e-3), (3, 1e-3)]


def test_overwrite_output_dir_keeps_the_old_run_until_the_new_one_has_loaded(tiny_policy, tmp_path):
    """training.overwrite_output_dir deletes the old run only once the new one has passed its checks and loaded its
    models: a config that fails on the way (here a LoRA target the model lacks) leaves the old run as it was; one that
    loads replaces it."""
    from dpo_dist.config import load_config
    from dpo_dist.engine import DistInfo
    from dpo_dist.errors import UserError
    from dpo_dist.trainer import Trainer

    out = tmp_path / "out"
    out.mkdir()
    old_metrics = '{"step": 7, "loss": 0.25}\n'
    (out / "metrics.jsonl").write_text(old_metrics)
    (out / "train_results.json").write_text('{"train_steps": 7}')
    (out / "final").mkdir()
    good = write_config(tmp_path / "good.yaml", tiny_policy, None, out, lora={"r": 4, "alpha": 8},
                        training={"overwrite_output_dir": True, "max_steps": 1})
    bad = load_config(good, ["lora.target_modules=[no_such_proj]"])
    trainer = Trainer(bad, DistInfo(0, 1, 0, torch.device("cpu")))
    try:
        with pytest.raises(UserError) as err:
            trainer.setup(train=True)
    finally:
        trainer.cleanup()
    assert "no_such_proj" in str(err.value)
    assert (out / "metrics.jsonl").read_text() == old_metrics and (out / "final").is_dir()
    assert json.loads((out / "train_results.json").read_text()) == {"train_steps": 7}

    run_here("train.py", good)
    train, _ = read_metrics(out)
    assert sorted(train) == [1]  # the old run's step 7 is gone
    assert json.loads((out / "train_results.json").read_text())["train_steps"] == 1


def test_a_micro_batch_is_collated_while_the_previous_ones_forward_is_queued(tiny_policy, tiny_reference, tmp_path,
                                                                              monkeypatch):
    """train_step collates micro-batch k + 1 after k's forward and loss are queued and before k's backward (after
    which ZeRO-2 with overlap_comm waits for the device): each step's first one before anything, the others one
    backward behind. Observed on a real run (3 accumulation steps, 2 optimizer steps) through its collate and its
    engine's backward, inside train_step (evaluation collates too)."""
    from dpo_dist import data as data_lib
    from dpo_dist.engine import TrainEngine
    from dpo_dist.trainer import Trainer

    events = []

    def recording(name, function):
        def record_and_call(*args, **kwargs):
            events.append(name)
            return function(*args, **kwargs)
        return record_and_call

    collate_for = data_lib.collate_for
    monkeypatch.setattr(data_lib, "collate_for", lambda *args: recording("collate", collate_for(*args)))
    monkeypatch.setattr(TrainEngine, "backward", recording("backward", TrainEngine.backward))
    train_step = Trainer.train_step

    def recorded_train_step(self, micro_batches, window):
        events.append("step")
        train_step(self, micro_batches, window)
        events.append("end")

    monkeypatch.setattr(Trainer, "train_step", recorded_train_step)
    config = write_config(tmp_path / "c.yaml", tiny_policy, tiny_reference, tmp_path / "out",
                          training={"max_steps": 2, "gradient_accumulation_steps": 3, "batch_size": 1})
    run_here("train.py", config)
    inside, in_step = [], False
    for event in events:
        in_step = in_step or event == "step"
        if in_step:
            inside.append(event)
        in_step = in_step and event != "end"
    step = ["step", "collate", "collate", "backward", "collate", "backward", "backward", "end"]
    assert inside == step + step, events


def test_a_max_seq_length_past_the_trained_positions_is_noted():
    """Long-context runs past max_position_embeddings train on positions the model never saw: said, unless the
    config extends RoPE (YaRN)."""
    from transformers import Qwen3Config

    from dpo_dist.trainer import positions_note

    plain = Qwen3Config(max_position_embeddings=4096)
    assert "training.max_seq_length=8192 is past the model's max_position_embeddings=4096" in positions_note(plain, 8192)
    assert positions_note(plain, 4096) is None
    yarn = Qwen3Config(max_position_embeddings=4096,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096})
    assert positions_note(yarn, 8192) is None
