"""User mistakes end with one `error:` line naming the key, file or line, exit status 2, no traceback."""


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


def test_bad_data_line(tiny_policy, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [PLAIN_RECORD, {"prompt": "x", "chosen": "y"}])
    config = write_config(tmp_path / "c.yaml", tiny_policy, None, tmp_path / "out", data={"train_files": [str(data)]})
    assert_clean_error(run(python_launch("train.py", config)), f"{data}:2:", "missing key(s) 'rejected'")


def test_unreachable_hub_model_says_what_to_do(tmp_path):
    config = write_config(tmp_path / "c.yaml", "Qwen/Qwen3-4B", None, tmp_path / "out")
    result = run(python_launch("train.py", config), HF_HOME=str(tmp_path / "empty_hf_home"))
    assert_clean_error(result, "model 'Qwen/Qwen3-4B' is not a local directory", "HF_HOME")


def test_global_batch_larger_than_the_data(tiny_policy, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [PLAIN_RECORD] * 3)
    config = write_config(tmp_path / "c.yaml", tiny_policy, None, tmp_path / "out", data={"train_files": [str(data)]})
    assert_clean_error(run(python_launch("train.py", config)), "3 training pairs are fewer than one global batch of 4")


def test_missing_config_file_and_help(tmp_path):
    assert_clean_error(run(python_launch("train.py", tmp_path / "none.yaml")), "none.yaml does not exist")
    result = run(python_launch("train.py", tmp_path / "x.yaml", "--help"))
    assert result.returncode == 0 and "training.eval_steps" in result.stdout and "reference.offload" in result.stdout
