"""Load the tokenizer, the policy and the reference from HF-format checkpoints.

Under ZeRO-3 a model is created inside DeepSpeed's `zero.Init` (transformers does this while an
`HfDeepSpeedConfig` for a stage-3 config is alive), so each rank only ever holds its shard and a
model larger than one device never materialises whole. A name that is not a local directory is
looked up in the Hugging Face cache / hub; when it cannot be found the error says so plainly.
When the hub cannot be reached (an air-gapped node without HF_HUB_OFFLINE), a hub name is read from the cache
alone: huggingface_hub would otherwise try the hub for every file (five times, with backoff, for the optional
ones the cache does not hold; revision look-ups without a timeout), minutes before a cached model loads or the
error comes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch
from torch import nn

from dpo_dist.checkpoint import ENGINE_TAG, TRAINER_STATE
from dpo_dist.config import LoRAConfig, ModelConfig
from dpo_dist.errors import UserError
from dpo_dist.lean_ops import apply_lean_activations, apply_liger_kernels
from dpo_dist.lora_ops import fuse_lora_layers


def _looks_local(name: str) -> bool:
    """A name meant as a path (a hub id is `org/name`, relative, one slash)."""
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def _missing_model_error(name: str, err: Exception) -> UserError:
    if _looks_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            return UserError(f"model checkpoint {name} does not exist: give a checkpoint directory (config.json, the "
                             "weights, the tokenizer files) or a hub name such as Qwen/Qwen3-4B")
        if (path / TRAINER_STATE).is_file() or (path / ENGINE_TAG).is_dir():  # checkpoint.py's layout
            return UserError(f"model checkpoint {name} is a dpo-dist training checkpoint (DeepSpeed state, not a Hugging "
                             f"Face model): export it with python launch/export.py --checkpoint {name} and give its "
                             "hf/ directory, or give the run's output_dir/final")
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():  # a LoRA run's final/
            merged = f": {path / 'merged'}" if (path / "merged" / "config.json").is_file() else (
                ": export.merge: true writes one beside the adapter, python launch/export.py --checkpoint "
                "<output_dir>/checkpoint-N --merge from a checkpoint")
            return UserError(f"model checkpoint {name} is a LoRA adapter, not a whole model: give the model with the "
                             f"adapter merged{merged}")
        if path.is_dir() and not (path / "config.json").is_file():
            return UserError(f"model checkpoint {name} has no config.json: give a Hugging Face checkpoint directory "
                             "(config.json, the weights, the tokenizer files), e.g. what save_pretrained writes")
        return UserError(f"model checkpoint {name}: cannot load it as a Hugging Face model ({' '.join(str(err).split())})")
    unreachable = _hub_unreachable()
    where = (f"the hub cannot be reached ({unreachable}) and the Hugging Face cache does not hold it"
             if unreachable else f"could not be loaded from the Hugging Face cache or hub ({type(err).__name__})")
    return UserError(
        f"model '{name}' is not a local directory and {where}. Download it where the hub is reachable "
        f"(huggingface-cli download {name}), point HF_HOME at a cache that holds it, or give a local checkpoint directory"
    )


@functools.cache
def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub does not answer, or None when it does (or offline mode is set, where
    huggingface_hub never asks it). Asked once per process, with huggingface_hub's own session (its proxies) and its
    metadata timeout (HF_HUB_ETAG_TIMEOUT), a second time if the first try fails (a passing stall); any HTTP answer,
    a redirect or an error status included, counts as reachable."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return None
    session = get_session()
    # httpx (huggingface_hub >= 1) follows redirects unless told not to; requests' head() does not by default
    no_redirects = {"follow_redirects": False} if hasattr(session, "follow_redirects") else {}
    failure = None
    for _ in range(2):
        try:
            session.head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT, **no_redirects)
            return None
        except Exception as err:  # a refused or timed-out connection, an unknown host, a proxy or TLS failure
            if getattr(err, "response", None) is not None:  # a session hook raised on the status: the hub answered
                return None
            failure = err
    return f"{constants.ENDPOINT} did not answer: {' '.join(str(failure).split()) or type(failure).__name__}"


def _lookup_options(name: str) -> dict:
    """from_pretrained's options for `name`: the cache alone for a hub name while the hub cannot be reached (what
    huggingface_hub falls back to after its retries), nothing otherwise."""
    if _looks_local(name) or _hub_unreachable() is None:
        return {}
    return {"local_files_only": True}


def causal_lm_from_pretrained(name: str, **kwargs) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(name, **kwargs)` with `_lookup_options`: while the hub cannot be
    reached, no look-up of the hub is left. The auto class's look-up of a PEFT adapter config in the repo takes no
    `local_files_only` from its caller (transformers 4.57.1 and 5.24) and would retry the hub for
    adapter_config.json. transformers 5 takes it in `adapter_kwargs`; transformers 4's model class passes its own
    beside those (it would get it twice), so there the model class is called directly: its look-up takes it."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    options = _lookup_options(name)
    if not options:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if int(transformers.__version__.split(".")[0]) >= 5:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs, **options, adapter_kwargs=dict(options))
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    hf_config = AutoConfig.from_pretrained(name, **options)
    if type(hf_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:  # the ValueError the auto class raises here
        raise ValueError(f"{name}: its config ({type(hf_config).__name__}) has no causal language model class in "
                         f"transformers {transformers.__version__}")
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)].from_pretrained(name, config=hf_config, **kwargs, **options)


@contextlib.contextmanager
def hub_offline_while_unreachable(name: str):
    """HF_HUB_OFFLINE=1 in the environment while a hub name cannot be reached: for peft's adapter save, which asks
    the hub whether the base model's config exists (to detect a resized vocabulary) unless that variable is set."""
    if not _lookup_options(name):
        yield
        return
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = before


@contextlib.contextmanager
def _hub_errors_only():
    """huggingface_hub logs a warning for each of its five retries when the hub cannot be reached (~25 s of
    them); the error that follows says what to do in one line, so the retries' lines only bury it."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


# The shape keys a config.json must set: transformers fills missing ones with its defaults (32 layers, ...),
# which would plan and size buckets for another model.
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def load_tokenizer(name: str):
    """The policy's tokenizer; a pad token is required for batching (Qwen's is <|endoftext|>)."""
    from transformers import AutoTokenizer

    try:
        with _hub_errors_only():
            tokenizer = AutoTokenizer.from_pretrained(name, **_lookup_options(name))
    except (OSError, ValueError) as err:
        raise _missing_model_error(name, err) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise UserError(f"tokenizer of {name} has no EOS token; plain-string completions need one")
    return tokenizer


def read_model_config(name: str):
    """The HF config alone (no weights): hidden size for DeepSpeed buckets, shapes for the planner."""
    from transformers import AutoConfig, PretrainedConfig

    try:
        with _hub_errors_only():
            raw, _ = PretrainedConfig.get_config_dict(name, **_lookup_options(name))
        if not raw:  # transformers 5 reads a directory without config.json as an empty one
            raise OSError(f"no config.json in {name}")
    except (OSError, ValueError) as err:
        raise _missing_model_error(name, err) from None
    missing = [key for key in SHAPE_KEYS if key not in raw and key not in raw.get("text_config", {})]
    if missing:
        raise UserError(f"{name}: config.json does not set {', '.join(missing)}; dpo-dist reads the model's shape from "
                        "it (transformers' defaults would describe another model). Use the checkpoint's own config.json")
    try:
        return AutoConfig.from_pretrained(name, **_lookup_options(name))
    except Exception as err:  # a config.json transformers refuses (its validators raise their own types) is the user's file
        raise _missing_model_error(name, err) from None


@contextlib.contextmanager
def zero3_init_scope(ds_config: dict | None):
    """While active, transformers builds models partitioned (zero.Init) for a stage-3 `ds_config`."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    stage = (ds_config or {}).get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        yield
        return
    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        del keep_alive
        unset_hf_deepspeed_config()


def load_causal_lm(name: str, model_config: ModelConfig, dtype: torch.dtype, ds_config: dict | None) -> nn.Module:
    """An `AutoModelForCausalLM` from `name`, partitioned at creation when `ds_config` is ZeRO-3."""
    with zero3_init_scope(ds_config):
        try:
            with _hub_errors_only():
                model = causal_lm_from_pretrained(name, dtype=dtype,
                                                  attn_implementation=model_config.attn_implementation)
        except (OSError, ValueError) as err:
            raise _missing_model_error(name, err) from None
        except ImportError as err:  # e.g. flash_attention_2 requested without the package
            raise UserError(f"model.attn_implementation={model_config.attn_implementation}: {err}") from None
    model.config.use_cache = False
    if model_config.liger_kernels:  # keeps what the lean ops keep, in fused kernels
        apply_liger_kernels(model)
    elif model_config.lean_activations or model_config.recompute_elementwise:  # the rebuilds need the lean ops
        apply_lean_activations(model)
    if model_config.compile:
        compile_decoder_layers(model)
    return model


# DPO's reward is the policy's log-prob minus the reference's, and at the first step they are the same model: the
# policy's compiled graph (grad, adapter on) and the reference's (no grad, adapter off; or a separate model) must
# compute the same numbers. In bf16 a last-bit difference anywhere in a layer is passed on by every later rounding,
# and a sequence's log-prob (a sum over ~1,000 tokens) moves by about a nat. Two inductor options, per compile:
# - emulate_precision_casts: round a fused kernel's bf16 intermediates where eager does. By default inductor keeps
#   them in fp32, so the graphs round in different places: on an H200 a compiled 4B LoRA run's loss fell from 0.68
#   to 0.02 in one step at lr 1e-6 where TRL's stayed near ln 2.
# - deterministic: pick each reduction kernel's block size and warps by inductor's rule instead of timing them on
#   the device (it also turns off a few other timing-based choices). The block sets the order RMSNorm sums its
#   squares in, and timing picks per graph, by noise: with the casts alone the same H200 run began at loss 0.7315,
#   the policy's and reference's per-sequence log-probs up to 2.4 nats apart (bench/compile_parity.py); with both,
#   within 0.016 (run-to-run noise: 0.009) and loss ln 2 + 3.7e-5, no slower in one run each (bench/RESULTS.md).
#   Observed, not guaranteed: the rule picks by each kernel's sizes and features, which a differently fused kernel
#   can change. On CPU no kernel is timed; the CPU compile tests pass unchanged with it.
EAGER_ROUNDING = {"emulate_precision_casts": True}


def inductor_options() -> dict:
    """The options each decoder layer compiles with: EAGER_ROUNDING and, where this torch has it, inductor's
    deterministic mode (torch 2.11 on the H200 and 2.13 here do)."""
    import torch._inductor.config as inductor_config

    options = dict(EAGER_ROUNDING)
    if hasattr(inductor_config, "deterministic"):
        options["deterministic"] = True
    return options


COMPILED_LAYERS = "dpo_dist_compiled_layers"  # set on a decoder whose layers compile_decoder_layers compiled


def has_compiled_layers(causal_lm: nn.Module) -> bool:
    return getattr(causal_lm.get_decoder(), COMPILED_LAYERS, False)


def compile_decoder_layers(model: nn.Module, options: dict | None = None) -> None:
    """Compile each decoder layer's forward in place, as torchtune and TorchTitan do, not the whole model.

    The log-prob step around the decoder selects a data-dependent number of positions (a new shape every
    batch), and a whole-model graph would take DeepSpeed's ZeRO-3 gather/release hooks of every layer into
    one trace. A layer is one small graph that all layers share (their parameters are graph inputs, not
    constants), compiled on the first forward; PEFT's adapters and gradient checkpointing wrap or enter it
    unchanged. The forward is compiled, not the module's call, so hooks on the layer itself (ZeRO-3's
    whole-layer gather and release) run eagerly around the graph. Dynamic from the start: sequence
    lengths change every batch, and a first static graph would only cost one more compile (measured: 2
    compiles in all, grad and no-grad, instead of 5).

    Python floats are specialized (a process-wide dynamo setting; dpo-dist compiles nothing else). By default
    (torch 2.13) dynamo passes each float a layer reads (four RMSNorm epsilons, attention's scaling and dropout)
    into the graph as a new 0-d tensor on every call: host work per layer per pass for values that are the
    model's constants, alike in every layer (bench/RESULTS.md: 2 to 6 ms per forward and backward of a 4-layer
    toy model on CPU, 14-26%).

    `options`: inductor's, `inductor_options()` unless given (bench/compile_parity.py compares without
    deterministic mode).
    """
    torch._dynamo.config.specialize_float = True
    options = inductor_options() if options is None else options
    decoder = model.get_decoder()
    for layer in decoder.layers:
        layer.forward = torch.compile(layer.forward, dynamic=True, options=options)
    setattr(decoder, COMPILED_LAYERS, True)


def _requires_grad_only_with_grad(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.requires_grad_(True) if torch.is_grad_enabled() else output.detach()


def embeddings_output_requires_grad(model: nn.Module) -> None:
    """Mark the input embeddings' output as requiring grad in grad mode (frozen embeddings: LoRA), once.

    Then every decoder layer's input requires grad, layer 0's too, at the cost of an input gradient for
    layer 0 that nobody reads. Two things need it: a compiled layer (else layer 0 is a graph of its own),
    and ZeRO-3 whole-layer gathering (engine.gather_whole_layers: its per-layer gradient hook needs layer
    0's input in the graph). Only in grad mode: the
    hooks transformers and PEFT add for checkpointing mark it always, which gives the reference's no-grad
    forward two compiled graphs (layer 0's input, then the others'); this hook runs after theirs and undoes
    that without grad."""
    embeddings = model.get_input_embeddings()
    if not getattr(embeddings, "_dpo_dist_requires_grad_hook", False):
        embeddings.register_forward_hook(_requires_grad_only_with_grad)
        embeddings._dpo_dist_requires_grad_hook = True


def limit_checkpointed_layers(model: nn.Module, count: int | None) -> None:
    """Keep gradient checkpointing on the first `count` decoder layers only (None: all).

    Backward runs from the last layer to the first, so by the time it recomputes the first layers the
    later ones' activations are gone: the peak stays at the start of backward, `count` layer inputs plus
    the other layers' full activations. transformers reads the flag per layer at each call."""
    if count is None:
        return
    layers = model.get_decoder().layers
    if count > len(layers):
        raise UserError(f"model.checkpointed_layers={count}, but the model has {len(layers)} decoder layers")
    for layer in layers[count:]:
        layer.gradient_checkpointing = False


def enable_checkpointing(model: nn.Module, checkpoint_kwargs: dict) -> None:
    """Turn on transformers' per-layer activation checkpointing. transformers 5.24 renamed the method
    (gradient_checkpointing_enable warns that it goes in v6); older versions only have the old name."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


def unmatched_targets(names: list[str], targets: list[str]) -> list[str]:
    """The targets no name matches as PEFT matches a list: the whole name, or its end after a dot."""
    return [target for target in targets if not any(name == target or name.endswith("." + target) for name in names)]


def check_target_modules(model: nn.Module, lora: LoRAConfig) -> None:
    """Every name in lora.target_modules must name a module. PEFT itself only refuses a list none of which matches:
    a misspelt name beside a right one (v_projj) would train without that adapter, silently."""
    if lora.all_linear:
        return
    modules = [name for name, _ in model.named_modules() if name]
    # transformers 5's fused MoE experts are parameters, which PEFT adapts by the projections' names: a fused
    # gate_up_proj stands for gate_proj and up_proj (planner.adapted_expert_weights), down_proj for itself
    fused = [name.removesuffix("gate_up_proj") for name, _ in model.named_parameters() if name.endswith(".gate_up_proj")]
    experts = [prefix + projection for prefix in fused for projection in ("gate_proj", "up_proj", "down_proj")]
    unmatched = unmatched_targets(modules + experts, lora.target_modules)
    if unmatched:
        leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                  if isinstance(module, (nn.Linear, nn.Embedding))}
        leaves |= {name.rsplit(".", 1)[-1] for name in experts}
        raise UserError(f"lora.target_modules: {', '.join(unmatched)} name no module of this model (names, or their "
                        f"ends after a dot; not regular expressions); its linear and embedding modules are "
                        f"{', '.join(sorted(leaves))} (or all-linear alone)")


def prepare_policy(model: nn.Module, model_config: ModelConfig, lora: LoRAConfig | None) -> nn.Module:
    """Gradient checkpointing and, when configured, a PEFT LoRA adapter on the policy."""
    if model_config.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA) and with ZeRO-3's parameter hooks.
        enable_checkpointing(model, {"use_reentrant": False})
        limit_checkpointed_layers(model, model_config.checkpointed_layers)
    if lora is None:
        return model
    check_target_modules(model, lora)
    from peft import LoraConfig, get_peft_model

    adapter = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.peft_target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, adapter)
    except ValueError as err:
        raise UserError(f"lora (target_modules, r, alpha, dropout): PEFT refuses it: {' '.join(str(err).split())}") from None
    if lora.fused:
        fuse_lora_layers(peft_model)
    if model_config.compile:  # one compiled graph for all layers (the first step with its compile: 23-28 s on an H200)
        embeddings_output_requires_grad(model)
    # PEFT creates adapters in fp32; under ZeRO-3 they are made after zero.Init and would stay fp32
    # beside bf16 base weights (under ZeRO-2 DeepSpeed casts them). Cast them to the model's dtype so
    # every stage trains the same thing: DeepSpeed's bf16/fp16 optimizer keeps fp32 master copies.
    dtype = model.config.dtype if isinstance(getattr(model.config, "dtype", None), torch.dtype) else None
    if dtype is not None:
        for name, param in peft_model.named_parameters():
            if "lora_" in name and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return peft_model
