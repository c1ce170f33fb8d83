"""User mistakes end with one `error:` line naming the key, file or line, exit status 2, no traceback."""


import sys

import pytest

from conftest import PLAIN_RECORD, write_jsonl
from launching import python_launch, run, write_config


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0]


def test_unknown_config_key(tiny_policy, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_policy, None, tmp_path / "out")
    assert_clean_error(run(python_launch("train.py", config, "training.lerning_rate=1e-5")), "training.lerning_rate", "learning_rate")


def test_label_smoothing_that_no_loss_reads(tiny_policy, tmp_path):
    """OpenRLHF's label_smoothing (conservative DPO) under TRL 1.16's sigmoid loss, which ignores it: refused, not
    trained on silently as if unset."""
    config = write_config(tmp_path / "c.yaml", tiny_policy, None, tmp_path / "out")
    assert_clean_error(run(python_launch("train.py", config, "dpo.label_smoothing=0.1")),
                       "dpo.label_smoothing=0.1 changes nothing with dpo.loss_type sigmoid", "robust, exo_pair, aot")


@pytest.mark.parametrize("argv, expected", [
    (["--beta", "0.2"], "unrecognized arguments: --beta. Settings are section.key=value words after --config here: "
                        "dpo.beta=0.2"),
    (["--max_len=512"], "here: training.max_seq_length=512"),  # OpenRLHF's name, a key here
    (["--lora-rank", "16"], "here: lora.r=16"),
    (["--adam_offload"], "here; --adam_offload: here it is deepspeed.config with offload_optimizer"),
    (["--ref_offload"], "here: reference.offload=true"),  # a switch given alone turns its key on
    (["--gradient_checkpointing", "dpo.beta=0.2"], "here: model.gradient_checkpointing=true"),  # not the override
    (["--frobnicate"], "here (e.g. training.num_epochs=1; --help lists every key)"),
])
def test_settings_given_as_flags_are_answered_with_the_key(argv, expected, capsys):
    """OpenRLHF's and TRL's scripts take their settings as flags; argparse alone said only "unrecognized"."""
    from dpo_dist.cli import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args("test", ["--config", "c.yaml", *argv])
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err


def test_overrides_may_stand_on_both_sides_of_a_flag():
    """deepspeed's launcher puts --local_rank before the script's own words; overrides after it still count."""
    from dpo_dist.cli import parse_args

    args = parse_args("test", ["--config", "c.yaml", "training.seed=1", "--local_rank=0", "dpo.beta=0.2"])
    assert args.overrides == ["training.seed=1", "dpo.beta=0.2"] and args.local_rank == 0


def test_an_override_without_its_section_names_it():
    from dpo_dist.config import parse_override
    from dpo_dist.errors import UserError

    with pytest.raises(UserError, match=r"override 'beta=0.2': the key must be section.key, e.g. dpo.beta=0.2"):
        parse_override("beta=0.2")


def test_bad_data_line(tiny_policy, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [PLAIN_RECORD, {"prompt": "x", "chosen": "y"}])
    config = write_config(tmp_path / "c.yaml", tiny_policy, None, tmp_path / "out", data={"train_files": [str(data)]})
    assert_clean_error(run(python_launch("train.py", config)), f"{data}:2:", "missing key(s) 'rejected'")


def test_uncached_hub_model_says_what_to_do(tmp_path):
    """Offline mode (HF_HUB_OFFLINE, as the suite runs), and a hub that refuses connections (port 9 of this host)
    without it: one error line each, the second naming the hub that did not answer."""
    config = write_config(tmp_path / "c.yaml", "Qwen/Qwen3-4B", None, tmp_path / "out")
    empty_cache = str(tmp_path / "empty_hf_home")
    result = run(python_launch("train.py", config), HF_HOME=empty_cache)
    assert_clean_error(result, "model 'Qwen/Qwen3-4B' is not a local directory", "HF_HOME")
    result = run(python_launch("train.py", config), HF_HOME=empty_cache, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9",
                 NO_PROXY="*", no_proxy="*")  # a proxy from the environment would answer for port 9
    assert_clean_error(result, "model 'Qwen/Qwen3-4B' is not a local directory", "http://127.0.0.1:9 did not answer",
                       "the Hugging Face cache does not hold it", "HF_HOME")


def test_global_batch_larger_than_the_data(tiny_policy, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [PLAIN_RECORD] * 3)
    config = write_config(tmp_path / "c.yaml", tiny_policy, None, tmp_path / "out", data={"train_files": [str(data)]})
    assert_clean_error(run(python_launch("train.py", config)), "3 training pairs are fewer than one global batch of 4")


def test_missing_config_file_and_help(tmp_path):
    assert_clean_error(run(python_launch("train.py", tmp_path / "none.yaml")), "none.yaml does not exist")
    result = run(python_launch("train.py", tmp_path / "x.yaml", "--help"))
    assert result.returncode == 0 and "training.eval_steps" in result.stdout and "reference.offload" in result.stdout


def test_export_refuses_paths_it_would_get_wrong_or_destroy(tmp_path):
    """export.py writes --out whole (a temp dir renamed over it): pointed at a run's output_dir, a model or the
    checkpoint itself it would delete them. Those, a non-checkpoint --checkpoint (the output_dir, a directory
    with only a config.yaml) and `--out .` are one error line each, before any weights are read; the default
    <checkpoint>/hf and a new or empty directory pass."""
    import pytest
    import runpy

    from dpo_dist.errors import UserError
    from launching import ROOT

    check_paths = runpy.run_path(str(ROOT / "launch" / "export.py"))["check_paths"]
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoint-12"
    (checkpoint / "engine").mkdir(parents=True)
    for path in (run_dir / "config.yaml", checkpoint / "config.yaml", run_dir / "metrics.jsonl"):
        path.write_text("x")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    default = checkpoint / "hf"
    for given, out, expected in [
        (run_dir, run_dir / "hf", f"{run_dir}: not a dpo-dist checkpoint (no config.yaml and engine/); give "
                                  "output_dir/checkpoint-<step> (this directory holds checkpoint-12)"),
        (checkpoint, checkpoint, "the export would replace the checkpoint it reads"),
        (checkpoint, run_dir, "the export would replace the checkpoint it reads"),
        (checkpoint, tmp_path / "model", "exists and is not empty, and export replaces the whole directory"),
    ]:
        with pytest.raises(UserError) as err:
            check_paths(given, out, given / "hf")
        assert expected in str(err.value), str(err.value)
    for out in (default, tmp_path / "new", tmp_path / "empty"):
        check_paths(checkpoint, out, default)
    default.mkdir()
    (default / "config.json").write_text("{}")  # an earlier export in the default place is replaced
    check_paths(checkpoint, default, default)
    # `--out .` in the run directory, through the script: one line, exit 2
    result = run(["bash", "-c", f"cd {run_dir} && {sys.executable} {ROOT / 'launch' / 'export.py'} --checkpoint {checkpoint} --out ."])
    assert_clean_error(result, "--out .: the export would replace the checkpoint it reads")


def test_a_lora_adapter_given_as_the_model_says_where_the_merged_model_is(tiny_policy, tmp_path):
    """A LoRA run's final/ holds the adapter (and with export.merge its merged/ model): as model.sft_model it is
    not a model, and the error says which directory is."""
    final = tmp_path / "final"
    (final / "merged").mkdir(parents=True)
    (final / "adapter_config.json").write_text("{}")
    config = write_config(tmp_path / "c.yaml", str(final), None, tmp_path / "out")
    assert_clean_error(run(python_launch("train.py", config)), f"model checkpoint {final} is a LoRA adapter, not a whole "
                       "model", "export.merge: true writes one beside the adapter")
    from dpo_dist.models import _missing_model_error  # the same message once merged/ holds a model, in-process

    (final / "merged" / "config.json").write_text("{}")
    assert f"give the model with the adapter merged: {final / 'merged'}" in str(_missing_model_error(str(final), OSError()))
