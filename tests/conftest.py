"""Shared fixtures: a tokenizer trained in-process and tiny Llama models built from a config (offline, CPU)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(2)

FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: needs a real vLLM server from .venv-vllm (make test-vllm)")

CORPUS = [
    "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for nine minutes.",
    "Write a haiku (three lines of 5, 7 and 5 syllables) that includes the words: snow, moon.",
    "silent snow falling\nthe moon hides behind the pines\nwinter night is long",
    "HISTORY, for $200: This man was the first president of the United States. George Washington",
    "Science, for $400: The chemical symbol for gold. Au. gold silver copper iron",
] * 20


@pytest.fixture(scope="session")
def tokenizer():
    from models import build_tiny_tokenizer
    import tempfile
    return build_tiny_tokenizer(CORPUS, 600, tempfile.mkdtemp())


def make_tiny_model(tokenizer, seed=0, hidden=32, layers=2, dropout=0.0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256,
                         attention_dropout=dropout, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_model(tokenizer)


def compose_config(overrides):
    """The config `python train.py OVERRIDES` would run with."""
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=os.path.join(ROOT, "config"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def write_synthetic_pairs(path, n=48):
    """A preference set a tiny model learns in a few steps: the answer to 'colour of X' is preferred
    when it names a colour. Returns the path."""
    import json
    things = ["sky", "grass", "snow", "coal", "blood", "sun", "sea", "leaf", "cloud", "night", "rose", "lemon"]
    colours = ["blue", "green", "white", "black", "red", "yellow", "blue", "green", "grey", "black", "red", "yellow"]
    with open(path, "w") as f:
        for i in range(n):
            j = i % len(things)
            f.write(json.dumps({"prompt": f"Q{i}: what colour is the {things[j]}?\nA:",
                                "chosen": f" the {things[j]} is {colours[j]}.", "rejected": " I do not know."}) + "\n")
    return str(path)


def tiny_overrides(tmp_path, *extra):
    return ["model=tiny", f"local_dirs=[{tmp_path}/runs]", f"cache_dir={tmp_path}/cache", "wandb.enabled=false",
            "model.architecture.hidden_size=32", "model.architecture.intermediate_size=64", "model.architecture.vocab_size=400",
            "optimizer=AdamW", "lr=3e-3", "warmup_steps=0", "max_length=64", "max_prompt_length=32",
            "eval_batch_size=16", *extra]


PROMPTS = ["Write a haiku about snow", "What is the capital of France?", "HISTORY, for $200:", "gold"]


@pytest.fixture
def lora_policy(tmp_path):
    """(tokenizer, PEFT policy with non-zero adapters, its Reference, prompt ids)."""
    from models import add_lora, load_model, load_tokenizer
    from scoring import Reference
    pairs = write_synthetic_pairs(tmp_path / "pairs.jsonl")
    config = compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", "exp_name=g", "lora=true"))
    tokenizer = load_tokenizer(config)
    policy = add_lora(load_model(config, tokenizer, "float32"), config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5 * torch.randn_like(p))
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    return tokenizer, policy, Reference(policy), ids


def add_reference_adapter(policy) -> None:
    """A frozen second adapter named 'reference' (as an SFT stage's adapter is), with non-zero weights."""
    from peft import LoraConfig
    policy.add_adapter("reference", LoraConfig(**{**policy.peft_config["default"].to_dict(), "peft_type": None,
                                                   "task_type": "CAUSAL_LM"}))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name and ".reference." in name:
                p.add_(0.5 * torch.randn_like(p))
    policy.set_adapter("default")


def make_reward_model(tokenizer, hidden=16, layers=0, seed=0):
    """A tiny Llama sequence classifier with one output. With layers=0 the score at a position is the
    head applied to the normalised embedding of that position's token, so its preference is set by hand."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=256, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForSequenceClassification(config).eval()


@pytest.fixture
def reward_model_dir(tmp_path, tokenizer):
    """A saved tiny reward model (1 layer) and its tokenizer: what oracle.model points at."""
    path = tmp_path / "reward_model"
    make_reward_model(tokenizer, layers=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
