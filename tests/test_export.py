"""A LoRA policy's merged export computes what was trained, also where the adapter sits on a tied lm_head."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_dist.checkpoint import export_hf
from dpo_dist.config import LoRAConfig, ModelConfig
from dpo_dist.engine import DistInfo
from dpo_dist.models import prepare_policy


@pytest.mark.parametrize("targets, tied_after", [(["q_proj"], True), (["q_proj", "lm_head"], False)])
def test_merged_export_scores_as_the_adapted_policy(tiny_policy, tmp_path, targets, tied_after):
    base = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    assert base.lm_head.weight is base.model.embed_tokens.weight  # tied, as Qwen3 up to 4B
    policy = prepare_policy(base, ModelConfig(base_model=str(tiny_policy)), LoRAConfig(r=4, alpha=8, target_modules=targets))
    generator = torch.Generator().manual_seed(0)
    for name, param in policy.named_parameters():
        if "lora_B" in name:  # as after training: lora_B starts at zero, where the adapter changes nothing
            param.data = 0.05 * torch.randn(param.shape, generator=generator)
    export_hf(policy, AutoTokenizer.from_pretrained(tiny_policy), tmp_path / "export", DistInfo(0, 1, 0, torch.device("cpu")),
              merge=True)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged", dtype=torch.float32).eval()
    input_ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=generator)
    with torch.no_grad():
        trained = policy.eval()(input_ids=input_ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32).eval()(input_ids=input_ids).logits
        torch.testing.assert_close(merged(input_ids=input_ids).logits, trained, atol=1e-5, rtol=0)
    assert (trained - plain).abs().max() > 1e-2  # the adapter changes the scores: the comparison can fail
    # Only an adapted lm_head unties the copy: merged into the shared matrix it would move the embeddings too
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied_after
    assert merged.config.tie_word_embeddings == tied_after
