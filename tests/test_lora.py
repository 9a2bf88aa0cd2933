"""LoRA / QLoRA: one shared base, the reference is exactly the base (or the SFT adapter), adapters
checkpoint in PEFT format and export merged."""
import os

import pytest
import torch

from conftest import compose_config, tiny_overrides, write_synthetic_pairs
from scoring import mc_dropout_logps, response_logps


@pytest.fixture
def pairs(tmp_path):
    return write_synthetic_pairs(tmp_path / "pairs.jsonl")


def build(tmp_path, pairs, *extra):
    from models import add_lora, load_model, load_tokenizer
    config = compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", "exp_name=x", *extra))
    tokenizer = load_tokenizer(config)
    base = load_model(config, tokenizer, "float32", quantize_4bit=bool(config.qlora))
    return config, tokenizer, base, add_lora


def sample_batch(tokenizer, n=4, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tokenizer), (n, t), generator=g)
    labels = ids.clone()
    labels[:, : t // 2] = -100
    return ids, torch.ones_like(ids), labels


def perturb_adapters(model, scale=0.05):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.add_(scale * torch.randn_like(p))


def test_adapter_disabled_reference_equals_base_and_no_second_copy(tmp_path, pairs):
    from scoring import Reference
    config, tokenizer, base, add_lora = build(tmp_path, pairs, "lora=true")
    ids, mask, labels = sample_batch(tokenizer)
    with torch.no_grad():
        expected = response_logps(base, ids, mask, labels)
    n_params = sum(p.numel() for p in base.parameters())
    policy = add_lora(base, config)
    perturb_adapters(policy)
    reference = Reference(policy)
    assert torch.allclose(reference.logps(ids, mask, labels), expected, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(response_logps(policy, ids, mask, labels), expected, atol=1e-3)
    # one copy of the base: LoRA adds only the adapter parameters
    extra = sum(p.numel() for p in policy.parameters()) - n_params
    assert 0 < extra < 0.5 * n_params
    assert reference.model is None


def test_shared_reference_dpo_matches_two_copy_dpo(tmp_path, pairs):
    from omegaconf import OmegaConf
    from trainers import BasicTrainer
    from scoring import Reference
    from preference_datasets import collate, iterate_elements, load_datasets
    config, tokenizer, base, add_lora = build(tmp_path, pairs, "lora=true")
    import copy
    frozen_copy = copy.deepcopy(base).requires_grad_(False)
    policy = add_lora(base, config)
    perturb_adapters(policy)
    assert not policy.training   # dropout off in the training forward (train_dropout=false)
    elements = list(iterate_elements(load_datasets([pairs], "train", silent=True), tokenizer, "train", seed=0, shuffle=False, max_length=64, max_prompt_length=32,
                                     sft_mode=False, n_epochs=1, silent=True))[:6]
    batch = collate(elements, tokenizer.pad_token_id)
    cfg = OmegaConf.create({"loss": {"name": "dpo", "beta": 0.1, "reference_free": False}, "optimizer": "SGD", "lr": 0.1,
                            "warmup_steps": 0, "gradient_accumulation_steps": 1, "max_grad_norm": 1e9,
                            "train_dropout": False, "activation_checkpointing": False, "eval_every": 100, "online": False})
    results = []
    for reference in (Reference(policy), Reference(policy, frozen_copy)):
        trainer = BasicTrainer(policy, reference, tokenizer, cfg, str(tmp_path), None, None, None, "cpu")
        loss, metrics = trainer.batch_metrics(batch, train=True)
        grads = torch.autograd.grad(loss, [p for p in policy.parameters() if p.requires_grad])
        results.append((loss.detach(), metrics["rewards_train/chosen"], torch.cat([g.flatten() for g in grads])))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)


def test_mc_dropout_under_lora_head_and_full(tmp_path, pairs):
    config, tokenizer, base, add_lora = build(tmp_path, pairs, "lora=true", "lora_dropout=0.3")
    policy = add_lora(base, config)
    perturb_adapters(policy)
    ids, mask, labels = sample_batch(tokenizer)
    _, var_head = mc_dropout_logps(policy, ids, mask, labels, k=4, p=0.1, method="head")
    assert torch.all(var_head > 0)
    # full: LoRA dropout alone (p=0 on the head) already makes the passes differ
    _, var_full = mc_dropout_logps(policy, ids, mask, labels, k=4, p=0.0, method="full")
    assert torch.all(var_full > 0)
    assert not policy.training


def test_qlora_forward_backward_generate_on_cpu(tmp_path, pairs):
    from scoring import Reference
    from generation import sample_responses
    from omegaconf import OmegaConf
    # the CPU 4-bit kernels quantise in blocks of 64 along the input dimension
    config, tokenizer, base, add_lora = build(tmp_path, pairs, "qlora=true", "model.architecture.hidden_size=64",
                                              "model.architecture.intermediate_size=128")
    assert any("Linear4bit" in type(m).__name__ for m in base.modules())
    policy = add_lora(base, config)
    ids, mask, labels = sample_batch(tokenizer)
    logps = response_logps(policy, ids, mask, labels)
    logps.sum().backward()
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert torch.isfinite(Reference(policy).logps(ids, mask, labels)).all()
    texts = sample_responses(policy, tokenizer, [ids[0, :5].tolist()], 2,
                             OmegaConf.create({"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 5}), "cpu")
    assert len(texts) == 1 and len(texts[0]) == 2


def test_lora_sft_adapter_becomes_the_dpo_reference_and_exports_merged(tmp_path, pairs):
    """SFT with LoRA, then DPO with LoRA from that checkpoint: the reference log-probs are exactly the
    SFT model's (not the pre-SFT base), the checkpoint holds a PEFT adapter, and the merged export
    reproduces the policy."""
    from models import load_model, load_tokenizer
    from train import main_with
    from scoring import Reference
    from transformers import AutoModelForCausalLM
    sft = main_with(compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=sft", "exp_name=sft", "lora=true",
                                                  "batch_size=8", "n_examples=32", "lr=1e-2")))
    assert os.path.exists(os.path.join(sft["checkpoint"], "adapter", "adapter_config.json"))
    assert not os.path.exists(os.path.join(sft["checkpoint"], "policy.pt"))

    config, tokenizer, base, add_lora = build(tmp_path, pairs, "lora=true", f"model.archive={sft['checkpoint']}")
    policy = add_lora(base, config)
    ids, mask, labels = sample_batch(tokenizer)
    # the SFT model as a full-precision merged model (lora=false folds the adapter in)
    merged_cfg = compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", "exp_name=x",
                                               f"model.archive={sft['checkpoint']}"))
    sft_model = load_model(merged_cfg, load_tokenizer(merged_cfg), "float32")
    with torch.no_grad():
        expected = response_logps(sft_model, ids, mask, labels)
        plain_config = compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", "exp_name=x"))
        pre_sft = response_logps(load_model(plain_config, tokenizer, "float32"), ids, mask, labels)
    perturb_adapters(policy, 0.5)   # training moves the policy; the reference must stay the SFT model
    reference = Reference(policy)
    assert torch.allclose(reference.logps(ids, mask, labels), expected, atol=1e-4)
    assert not torch.allclose(expected, pre_sft, atol=1e-2)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)

    dpo = main_with(compose_config(tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", "exp_name=dpo", "lora=true",
                                                  f"model.archive={sft['checkpoint']}", "batch_size=8", "n_examples=16")))
    out = tmp_path / "merged"
    from scripts.export_merged import export_merged
    export_merged(dpo["checkpoint"], str(out))
    exported = AutoModelForCausalLM.from_pretrained(out)
    config, tokenizer, base, add_lora = build(tmp_path, pairs, "lora=true", f"model.archive={sft['checkpoint']}")
    policy = add_lora(base, config)
    from checkpoints import load_trained_weights
    load_trained_weights(policy, dpo["checkpoint"])
    with torch.no_grad():
        assert torch.allclose(response_logps(exported, ids, mask, labels), response_logps(policy, ids, mask, labels), atol=1e-4)


def test_qlora_offline_ae_run_end_to_end(tmp_path, pairs):
    """The AE-DPO seed command's shape (active=true qlora=true selection_strategy=ae) on the tiny model."""
    from train import main_with
    summary = main_with(compose_config(tiny_overrides(
        tmp_path, f"datasets=[{pairs}]", "loss=dpo", "exp_name=qae", "active=true", "qlora=true", "selection_strategy=ae",
        "pretrain_fraction=0.3", "batch_size=4", "selection_ratio=2", "n_examples=8",
        "model.architecture.hidden_size=64", "model.architecture.intermediate_size=128")))
    assert summary["labels"] == 8 and summary["steps"] == 2
    assert os.path.exists(os.path.join(summary["checkpoint"], "adapter", "adapter_model.safetensors"))
