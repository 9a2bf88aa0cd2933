"""Our DPO loss, log-probs and gradients against TRL's DPOTrainer on the same token ids (fp32)."""
import tempfile

import pytest
import torch

from conftest import make_tiny_model
from preference_datasets import collate
from scoring import response_logps
from trainers import concatenated_inputs, preference_loss

trl = pytest.importorskip("trl", reason="trl is a test requirement (requirements.txt)")


def test_dpo_loss_and_gradients_match_trl(tokenizer):
    from datasets import Dataset
    beta = 0.1
    g = torch.Generator().manual_seed(0)
    eos = tokenizer.eos_token_id
    pairs = []
    for i in range(4):   # prompts and responses of unequal lengths, so padding is exercised on both sides
        prompt = torch.randint(3, len(tokenizer), (5 + i,), generator=g).tolist()
        chosen = torch.randint(3, len(tokenizer), (3 + i,), generator=g).tolist() + [eos]
        rejected = torch.randint(3, len(tokenizer), (6 - i,), generator=g).tolist() + [eos]
        pairs.append((prompt, chosen, rejected))

    def models():
        return make_tiny_model(tokenizer, seed=0), make_tiny_model(tokenizer, seed=1).requires_grad_(False)

    # TRL: its collator and compute_loss on the very token ids
    policy, reference = models()
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, beta=beta,
                         precompute_ref_log_probs=False, bf16=False, max_length=None, report_to="none", use_cpu=True,
                         logging_strategy="no", save_strategy="no", disable_tqdm=True)
    texts = Dataset.from_dict({"prompt": ["a"] * 4, "chosen": [" b"] * 4, "rejected": [" c"] * 4})
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=texts, processing_class=tokenizer)
    inputs = trainer.data_collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs])
    policy.eval()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in policy.parameters()]

    # ours
    policy, reference = models()
    elements = []
    for prompt, chosen, rejected in pairs:
        element = {}
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            element[f"{side}_input_ids"] = prompt + response
            element[f"{side}_attention_mask"] = [1] * (len(prompt) + len(response))
            element[f"{side}_labels"] = [-100] * len(prompt) + response
        elements.append(element)
    concat = concatenated_inputs(collate(elements, tokenizer.pad_token_id))
    with torch.no_grad():
        ref = response_logps(reference, concat["input_ids"], concat["attention_mask"], concat["labels"])
    logps = response_logps(policy, concat["input_ids"], concat["attention_mask"], concat["labels"])
    losses, _, _ = preference_loss(logps[:4], logps[4:], ref[:4], ref[4:], beta=beta)
    ours = losses.mean()
    ours.backward()

    assert abs(ours.item() - trl_loss.item()) < 1e-5, (ours.item(), trl_loss.item())
    assert ours.item() != pytest.approx(0.6931, abs=1e-3)   # the reference differs: a real comparison
    worst = max(float((p.grad - t).abs().max()) for p, t in zip(policy.parameters(), trl_grads))
    scale = max(float(t.abs().max()) for t in trl_grads)
    assert worst < 1e-5 and scale > 1e-3, (worst, scale)
