"""Config loading: the seed config unchanged, strict keys and types, overrides, help."""

import dataclasses
import textwrap

import pytest

from dpo_dist.cli import describe_keys
from dpo_dist.config import load_config
from dpo_dist.errors import UserError

SEED_CONFIG = """\
model: {base_model: Qwen/Qwen3-4B, sft_model: ./output/sft_model}
dpo: {beta: 0.1}
lora: {r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}
training: {num_epochs: 3, batch_size: 2, gradient_accumulation_steps: 8, learning_rate: 1e-6,
           warmup_ratio: 0.1, max_seq_length: 2048}
"""


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_seed_config_loads_unchanged(tmp_path):
    config = load_config(write(tmp_path, SEED_CONFIG))
    assert config.model.policy_path == "./output/sft_model"
    assert config.model.reference_path == "./output/sft_model"  # the reference defaults to the policy's start
    assert config.training.learning_rate == 1e-6  # PyYAML reads 1e-6 as a string; it must still be a float
    assert isinstance(config.training.learning_rate, float)
    assert config.training.gradient_accumulation_steps == 8 and config.training.max_seq_length == 2048
    assert config.lora.r == 16 and config.lora.alpha == 32 and len(config.lora.target_modules) == 7
    assert config.dpo.beta == 0.1
    assert config.reference_mode == "adapter"  # LoRA and no explicit reference: the policy without its adapter


def test_peft_all_linear_wildcard_loads_as_peft_reads_it(tmp_path):
    """`target_modules: all-linear`, as TRL and PEFT users write it: handed to PEFT as its wildcard string."""
    config = load_config(write(tmp_path, SEED_CONFIG.replace("[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                                             "down_proj]", "all-linear")))
    assert config.lora.all_linear and config.lora.peft_target_modules == "all-linear"
    assert config.lora.adapted_projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    seed = load_config(write(tmp_path, SEED_CONFIG)).lora
    assert not seed.all_linear and seed.peft_target_modules == seed.target_modules


def test_whole_numbers_written_as_floats_or_quoted_are_integers(tmp_path):
    training = load_config(write(tmp_path, SEED_CONFIG), ["training.num_epochs=3.0", "training.seed='7'",
                                                         "training.max_steps='12345678901234567891'"]).training
    assert training.num_epochs == 3 and training.seed == 7 and type(training.num_epochs) is int
    assert training.max_steps == 12345678901234567891  # not through a float


def test_chat_template_kwargs_is_a_mapping_passed_on_as_written(tmp_path):
    config = load_config(write(tmp_path, SEED_CONFIG), ["data.chat_template_kwargs={enable_thinking: false, depth: 2}"])
    assert config.data.chat_template_kwargs == {"enable_thinking": False, "depth": 2}
    assert load_config(write(tmp_path, SEED_CONFIG)).data.chat_template_kwargs == {}


def test_overrides_apply_with_yaml_values(tmp_path):
    config = load_config(
        write(tmp_path, SEED_CONFIG),
        ["training.num_epochs=1", "model.ref_model=/ckpt/ref", "data.train_files=[a.jsonl, b.jsonl]", "data.eval_files=e.jsonl"],
    )
    assert config.training.num_epochs == 1
    assert config.model.reference_path == "/ckpt/ref"
    assert config.data.train_files == ["a.jsonl", "b.jsonl"] and config.data.eval_files == ["e.jsonl"]


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        (SEED_CONFIG + "training2: {}\n", [], "unknown key 'training2'"),
        (SEED_CONFIG, ["training.lerning_rate=1"], "unknown key 'training.lerning_rate' in the overrides"),
        (SEED_CONFIG, ["training.num_epochs=two"], "training.num_epochs: expected an integer, got 'two'"),
        (SEED_CONFIG, ["training.learning_rate=fast"], "training.learning_rate: expected a number"),
        (SEED_CONFIG, ["model.dtype=float8"], "model.dtype: 'float8' is not one of auto, float32, bfloat16, float16"),
        (SEED_CONFIG, ["model.gradient_checkpointing=maybe"], "expected true or false"),
        (SEED_CONFIG, ["training.batch_size=0"], "training.batch_size must be >= 1"),
        (SEED_CONFIG, ["training.peak_tflops=-1"], "training.peak_tflops must be a positive number of TFLOP/s"),
        # values that trained silently to nan weights or the wrong objective, or ended in a library's traceback
        (SEED_CONFIG, ["dpo.beta=nan"], "dpo.beta: expected a finite number, got 'nan'"),
        (SEED_CONFIG, ["training.learning_rate=.inf"], "training.learning_rate: expected a finite number"),
        (SEED_CONFIG, ["training.max_steps=0"], "training.max_steps must be >= 1, or -1 to run training.num_epochs"),
        (SEED_CONFIG, ["lora.target_modules=[q_proj,all-linear]"], "lora.target_modules: all-linear stands alone"),
        (SEED_CONFIG, ["data.chat_template_kwargs=[enable_thinking]"], "data.chat_template_kwargs: expected a mapping"),
        (SEED_CONFIG, ["training.num_epochs=2.5"], "training.num_epochs: expected an integer, got 2.5"),
        (SEED_CONFIG, ["data.train_files=null"], "data.train_files: expected a list (or one value), got null: write [] for none"),
        ("model: {base_model: x}\ndeepspeed: ds.json\n", [], "deepspeed: 'ds.json' in "),
        (SEED_CONFIG, ["training.max_seq_length=1"], "training.max_seq_length must be >= 2: a sequence of one token"),
        (SEED_CONFIG, ["training.weight_decay=-1"], "training.weight_decay must be >= 0"),
        (SEED_CONFIG, ["training.max_grad_norm=-1"], "training.max_grad_norm must be >= 0 (0: no clipping)"),
        (SEED_CONFIG, ["training.adam_beta2=1"], "training.adam_beta2 must be in [0, 1)"),
        (SEED_CONFIG, ["training.adam_epsilon=0"], "training.adam_epsilon must be > 0"),
        (SEED_CONFIG, ["training.seed=-1"], "training.seed must be in [0, 2^32)"),
        (SEED_CONFIG, ["dpo.loss_weights=[-1]"], "dpo.loss_weights must all be > 0"),
        (SEED_CONFIG, ["lora.alpha=-16"], "lora.alpha must be > 0"),
        (SEED_CONFIG, ["lora.dropout=1.5"], "lora.dropout must be in [0, 1)"),
        (SEED_CONFIG, ["data.sft_loss_weight=-1"], "data.sft_loss_weight must be >= 0"),
        (SEED_CONFIG, ["deepspeed.timeout_minutes=0"], "deepspeed.timeout_minutes must be > 0"),
        (SEED_CONFIG, ["export.max_shard_size=banana"], "export.max_shard_size: 'banana' is not a size"),
        (SEED_CONFIG, ["training.peak_tflops=0"], "training.peak_tflops must be a positive number of TFLOP/s"),
        (SEED_CONFIG, ["training"], "must look like section.key=value"),
        ("model: {sft_model: x}\ndpo: {beta: -1}\n", [], "dpo.beta must be > 0"),
        ("dpo: {beta: 0.1}\n", [], "model.base_model is required"),
        ("- a\n- b\n", [], "the top level must be a mapping"),
        (SEED_CONFIG, ["dpo.loss_type=orpo", "reference.mode=precomputed"], "dpo.loss_type=orpo is reference-free"),
        (SEED_CONFIG, ["reference.mode=none"], "dpo.loss_type=sigmoid needs reference log-probs"),
        ("model: {base_model: x}\nreference: {mode: adapter}\n", [], "reference.mode=adapter needs a lora: section"),
        (SEED_CONFIG, ["dpo.label_smoothing=0.5"], "dpo.label_smoothing must be in [0, 0.5)"),
        ("model: [1]\n", [], "model: expected a mapping"),
        (SEED_CONFIG, ["dpo.loss_type=[sigmoid, bco]"], "dpo.loss_type[1]: 'bco' is not one of sigmoid, robust, hinge"),
        (SEED_CONFIG, ["dpo.loss_type=[]"], "dpo.loss_type is an empty list"),
        (SEED_CONFIG, ["dpo.loss_type=[sigmoid, simpo]"], "dpo.loss_type: simpo is reference-free and is used alone"),
        (SEED_CONFIG, ["dpo.loss_type=[sigmoid, sft]", "dpo.loss_weights=[1.0]"],
         "dpo.loss_weights has 1 entries for the 2 of dpo.loss_type (sigmoid, sft)"),
        (SEED_CONFIG, ["dpo.loss_type=exo_pair"], "dpo.loss_type exo_pair needs dpo.label_smoothing > 0"),
        (SEED_CONFIG, ["training.lr_scheduler=constant", "training.min_lr_ratio=0.1"],
         "training.min_lr_ratio=0.1 is where a decay ends, and training.lr_scheduler=constant has none"),
        (SEED_CONFIG, ["dpo.discopop_tau=0"], "dpo.discopop_tau must be > 0"),
        (SEED_CONFIG, ["dpo.loss_type=[sigmoid, bco_pair]", "dpo.f_divergence_type=js_divergence"],
         "dpo.f_divergence_type=js_divergence with dpo.loss_type bco_pair: f-DPO holds only where"),
        (SEED_CONFIG, ["dpo.ld_alpha=1.5"], "dpo.ld_alpha must be in [0, 1]"),
        (SEED_CONFIG, ["dpo.loss_type=[sigmoid, aot]", "dpo.use_weighting=true"],
         "dpo.use_weighting (WPO) with dpo.loss_type aot: these losses sort a micro-batch's pairs"),
        (SEED_CONFIG, ["reference.sync_steps=64"], "reference.sync_steps (TR-DPO) with a lora: section"),
        ("model: {base_model: x}\n", ["reference.sync_steps=64", "reference.mode=precomputed"],
         "reference.sync_steps (TR-DPO) needs a separate reference model that can move; reference.mode=precomputed"),
        ("model: {base_model: x}\n", ["reference.mixup_alpha=0"], "reference.mixup_alpha must be in (0, 1]"),
    ],
)
def test_errors_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, text), overrides)
    assert message in str(err.value)


def test_loss_type_is_one_name_or_a_weighted_list(tmp_path):
    one = load_config(write(tmp_path, SEED_CONFIG), ["dpo.loss_type=ipo"]).dpo  # as every earlier config wrote it
    assert one.loss_type == ["ipo"] and one.weighted_losses == [("ipo", 1.0)]
    mpo = load_config(write(tmp_path, SEED_CONFIG), ["dpo.loss_type=[sigmoid, bco_pair, sft]", "dpo.loss_weights=[0.8, 0.2, 1]"])
    assert mpo.dpo.weighted_losses == [("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)]
    assert mpo.reference_mode == "adapter" and not mpo.dpo.reference_free


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(UserError, match="Did you mean 'learning_rate'"):
        load_config(write(tmp_path, SEED_CONFIG), ["training.lerning_rate=1"])


@pytest.mark.parametrize("text, overrides, message", [
    # TRL's, transformers' and PEFT's names: where they live here (difflib guessed eval_batch_size and 'fused')
    (SEED_CONFIG, ["training.per_device_train_batch_size=2"], "'per_device_train_batch_size' is a TRL, transformers, "
     "PEFT or OpenRLHF name; here it is training.batch_size"),
    (SEED_CONFIG, ["lora.lora_alpha=32"], "here it is lora.alpha"),
    (SEED_CONFIG, ["training.bf16=true"], "here it is model.dtype: bfloat16"),
    (SEED_CONFIG, ["lora.use_dora=true"], "'use_dora' is a TRL, transformers, PEFT or OpenRLHF name; no setting: the adapter is plain LoRA"),
    # a key of another section (difflib guessed keep_best_checkpoint), and a flat config's top-level key
    (SEED_CONFIG, ["training.gradient_checkpointing=true"], "'training.gradient_checkpointing' in the overrides: it is "
     "model.gradient_checkpointing; put it in that section"),
    ("model: {base_model: x}\nbeta: 0.1\n", [], "unknown key 'beta' in "),
    # OpenRLHF's (difflib guessed router_aux_loss_coef, keep_best_checkpoint, 'training' and model.base_model)
    (SEED_CONFIG, ["dpo.nll_loss_coef=0.2"], "here it is dpo.sft_weight"),
    (SEED_CONFIG, ["training.load_checkpoint=true"], "here it is training.resume_from"),
    ("model: {base_model: x}\ntrain: {batch_size: 128}\n", [], "here it is training (OpenRLHF's train.batch_size is "
     "the global batch; training.batch_size is per process and micro-batch"),
    (SEED_CONFIG, ["training.train_batch_size=128"], "here it is training.batch_size x processes x "
     "training.gradient_accumulation_steps, the global batch"),
    (SEED_CONFIG, ["reference.model_name_or_path=/ref"], "here it is model.ref_model"),
    (SEED_CONFIG, ["model.model_name_or_path=/sft"], "here it is model.base_model"),
    (SEED_CONFIG, ["data.prompt_key=question"], "no setting: records hold prompt, chosen and rejected"),
])
def test_unknown_key_says_where_a_known_name_lives(tmp_path, text, overrides, message):
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, text), overrides)
    assert message in str(err.value) and "Did you mean" not in str(err.value)
    if text.endswith("beta: 0.1\n"):
        assert str(err.value).endswith("it is dpo.beta; put it in that section")


def test_foreign_names_point_at_keys_that_exist():
    from dpo_dist.config import FOREIGN_NAMES, SECTIONS

    for name, answer in FOREIGN_NAMES.items():
        if answer.startswith("no setting"):
            continue
        named = answer.split()[0].rstrip(",:")
        if "." not in named:  # a section's name (OpenRLHF's train, ds)
            assert named in SECTIONS, name
            continue
        section, key = named.split(".")
        assert key in {f.name for f in dataclasses.fields(SECTIONS[section])}, name


def test_reference_mode_auto(tmp_path):
    plain = "model: {base_model: x}\n"
    assert load_config(write(tmp_path, plain)).reference_mode == "model"
    assert load_config(write(tmp_path, plain), ["dpo.loss_type=simpo"]).reference_mode == "none"
    assert load_config(write(tmp_path, SEED_CONFIG), ["reference.mode=model"]).reference_mode == "model"
    assert load_config(write(tmp_path, SEED_CONFIG), ["model.ref_model=/other"]).reference_mode == "model"


def test_help_lists_every_key():
    text = describe_keys()
    for key in ("model.ref_model", "training.eval_steps", "data.train_files", "deepspeed.config", "reference.offload", "lora.r"):
        assert key in text


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
    assert {c.name for c in configs} >= {"demo.yaml", "demo_lora.yaml", "qwen3_4b_lora.yaml", "qwen3_8b_full_zero3.yaml"}
    for path in configs:
        load_config(path)
    assert load_config(configs[0].parent / "qwen3_4b_lora.yaml").reference_mode == "adapter"
    assert load_config(configs[0].parent / "qwen3_8b_full_zero3.yaml").reference_mode == "precomputed"
