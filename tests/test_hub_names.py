"""A model given by hub name (`org/name`) while the hub cannot be reached and HF_HUB_OFFLINE is not set (an
air-gapped node): read from the Hugging Face cache after one probe of the hub, without huggingface_hub's tries
(five, with backoff, for each optional file the cache lacks: about two minutes for a cached model's config,
tokenizer and weights where the hub's host name does not resolve, more than ten behind a firewall that drops)."""

import json
import socket
import subprocess
import sys
import threading

from safetensors.torch import load_file

from launching import ROOT

LOAD_BY_NAME = """
import json, sys, torch
from dpo_dist.checkpoint import export_hf
from dpo_dist.config import LoRAConfig, ModelConfig
from dpo_dist.engine import DistInfo
from dpo_dist.models import load_causal_lm, load_tokenizer, prepare_policy, read_model_config
name = "Qwen/Qwen3-4B"
config = read_model_config(name)
tokenizer = load_tokenizer(name)
model = load_causal_lm(name, ModelConfig(base_model=name), torch.float32, None)
weights = {key: value.sum().item() for key, value in model.state_dict().items()}
# A LoRA policy's export: peft's adapter save and the merged copy, both of which look at the base model by name.
policy = prepare_policy(model, ModelConfig(base_model=name), LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
export_hf(policy, tokenizer, sys.argv[1], DistInfo(0, 1, 0, torch.device("cpu")), merge=True)
print()
json.dump({"layers": config.num_hidden_layers, "weights": weights}, sys.stdout)
"""


class SilentHub:
    """A listening socket that reads each request's first line and never answers: a hub behind a firewall that
    lets connections through and drops the rest, which huggingface_hub meets with a timeout per try."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.connections: list[socket.socket] = []
        self.requests: list[str] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:  # closed
                return
            self.connections.append(connection)
            connection.settimeout(5)
            try:
                self.requests.append(connection.recv(4096).decode(errors="replace").split("\r\n")[0])
            except OSError:
                self.requests.append("")

    def close(self) -> None:
        self.server.close()
        for connection in self.connections:
            connection.close()


def cache_under_hub_name(checkpoint, hf_home, repo="Qwen/Qwen3-4B", commit="0123456789abcdef0123456789abcdef01234567"):
    """The Hugging Face cache's layout (what `huggingface-cli download` leaves), holding `checkpoint` as `repo`."""
    repo_dir = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in checkpoint.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


def test_a_cached_hub_model_loads_and_exports_by_name_after_one_probe_of_a_silent_hub(tiny_policy, tmp_path):
    hf_home = tmp_path / "hf_home"
    cache_under_hub_name(tiny_policy, hf_home)
    hub = SilentHub()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(hf_home), "HF_ENDPOINT": hub.endpoint,
           "HF_HUB_ETAG_TIMEOUT": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        result = subprocess.run([sys.executable, "-c", LOAD_BY_NAME, str(tmp_path / "export")], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=180)  # without the probe, the look-ups' retries ran past 600 s
        requests = list(hub.requests)
    finally:
        hub.close()
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.splitlines()[-1])
    saved = load_file(tiny_policy / "model.safetensors")  # the checkpoint as written (lm_head tied: not in it)
    assert loaded["layers"] == json.loads((tiny_policy / "config.json").read_text())["num_hidden_layers"]
    assert {key: loaded["weights"][key] for key in saved} == {key: value.sum().item() for key, value in saved.items()}
    assert (tmp_path / "export" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "export" / "merged" / "model.safetensors").is_file()
    # The probe, and no look-up of the model's files: huggingface_hub tries the hub for each (five times for those the
    # cache lacks), peft's adapter save asks whether the base's config.json exists.
    # huggingface_hub 2.4 also sends requests of its own (GET /api/agent-harnesses, once): not a look-up.
    assert requests.count("HEAD / HTTP/1.1") == 2, requests  # the probe's two tries, each timed out
    assert not [request for request in requests if "Qwen3-4B" in request], requests
