"""DPO/IPO/SFT losses against hand computations, and the log-prob scoring path."""
import math

import pytest
import torch

from conftest import make_tiny_model
from scoring import mc_dropout_logps, response_logps, token_logps
from trainers import concatenated_inputs, preference_loss, sft_loss, split_batch


def test_dpo_loss_and_rewards_match_hand_computation():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0])
    losses, cr, rj = preference_loss(pc, pr, rc, rr, beta=0.1)
    # pair 0: logits = (-10 + 12) - (-11 + 11) = 2; loss = -log sigmoid(0.2)
    # pair 1: logits = (-4 + 3) - 0 = -1;            loss = -log sigmoid(-0.1)
    expected = [-math.log(1 / (1 + math.exp(-0.2))), -math.log(1 / (1 + math.exp(0.1)))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert cr.tolist() == pytest.approx([0.1 * 1.0, 0.0], abs=1e-6)
    assert rj.tolist() == pytest.approx([0.1 * -1.0, 0.1 * 1.0], abs=1e-6)


def test_reference_free_and_ipo():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-3.0])
    rc, rr = torch.tensor([-5.0]), torch.tensor([-0.5])
    losses, cr, _ = preference_loss(pc, pr, rc, rr, beta=0.5, reference_free=True)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))  # logits 2, beta 0.5
    assert cr.item() == pytest.approx(-0.5)
    ipo, _, _ = preference_loss(pc, pr, rc, rr, beta=0.5, ipo=True)
    logits = 2.0 - (-5.0 + 0.5)
    assert ipo.item() == pytest.approx((logits - 1.0) ** 2)


def test_sft_loss_is_mean_negative_sum_logp():
    assert sft_loss(torch.tensor([-4.0, -6.0])).item() == pytest.approx(5.0)


def test_response_logps_masks_prompt_and_includes_eos(tokenizer, tiny_model):
    # prompt of 3 tokens, response of 2 tokens + EOS, 1 padding position
    eos = tokenizer.eos_token_id
    ids = torch.tensor([[5, 6, 7, 8, 9, eos, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, eos, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    got = response_logps(tiny_model, ids, mask, labels)
    with torch.no_grad():
        logp = tiny_model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    expected = logp[0, 2, 8] + logp[0, 3, 9] + logp[0, 4, eos]
    assert got.item() == pytest.approx(expected.item(), abs=1e-4)


def test_chunked_log_probs_equal_full_projection_with_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    chunked = token_logps(hidden, head, targets, chunk_size=8)
    full = head(hidden).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(chunked, full, atol=1e-5)
    g1, = torch.autograd.grad(chunked.sum(), hidden)
    g2, = torch.autograd.grad(full.sum(), hidden)
    assert torch.allclose(g1, g2, atol=1e-5)


def test_mc_dropout_head_zero_variance_without_dropout(tokenizer, tiny_model):
    ids = torch.randint(3, len(tokenizer), (3, 10))
    labels = ids.clone()
    labels[:, :5] = -100
    mask = torch.ones_like(ids)
    mu, var = mc_dropout_logps(tiny_model, ids, mask, labels, k=5, p=0.0)
    assert torch.all(var == 0)
    assert torch.allclose(mu, response_logps(tiny_model, ids, mask, labels), atol=1e-5)
    mu, var = mc_dropout_logps(tiny_model, ids, mask, labels, k=5, p=0.2)
    assert torch.all(var > 0)


def test_mc_dropout_head_matches_full_in_distribution(tokenizer):
    """On a model whose only dropout is the head dropout, `head` (one trunk pass) and `full`
    (K network passes) estimate the same distribution: compare their means over many draws."""
    model = make_tiny_model(tokenizer, seed=5)
    torch.manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    mask = torch.ones_like(ids)
    gen = torch.Generator().manual_seed(0)
    head_mu, head_var = mc_dropout_logps(model, ids, mask, labels, k=400, p=0.1, method="head", generator=gen)
    torch.manual_seed(1)
    full_mu, full_var = mc_dropout_logps(model, ids, mask, labels, k=400, p=0.1, method="full")
    # standard error of a mean of 400 draws is sigma/20; allow 4 standard errors
    tol = 4 * (head_var.sqrt() / 20)
    assert torch.all((head_mu - full_mu).abs() < tol), (head_mu, full_mu, tol)
    assert torch.all((head_var / full_var - 1).abs() < 0.35), (head_var, full_var)
    assert not model.training


def test_concatenated_inputs_and_split():
    batch = {"chosen_input_ids": torch.ones(2, 3, dtype=torch.long), "chosen_attention_mask": torch.ones(2, 3, dtype=torch.long),
             "chosen_labels": torch.ones(2, 3, dtype=torch.long), "rejected_input_ids": torch.ones(2, 5, dtype=torch.long),
             "rejected_attention_mask": torch.ones(2, 5, dtype=torch.long), "rejected_labels": torch.ones(2, 5, dtype=torch.long),
             "prompt": ["a", "b"]}
    concat = concatenated_inputs(batch)
    assert concat["input_ids"].shape == (4, 5)
    assert concat["labels"][0, 3:].tolist() == [-100, -100]
    parts = split_batch(batch, 2)
    assert [p["prompt"] for p in parts] == [["a"], ["b"]]


def test_mean_and_variance_is_the_unbiased_estimator():
    from scoring import mean_and_variance
    # K = 2 draws of B = 2 sequences: column 0 is {1, 3}, column 1 is {2, 6}
    mean, var = mean_and_variance(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    assert mean.tolist() == pytest.approx([2.0, 4.0])
    # sum of squared deviations / (K - 1): (1 + 1) / 1 = 2 and (4 + 4) / 1 = 8 (the biased estimator gives 1 and 4)
    assert var.tolist() == pytest.approx([2.0, 8.0])
    mean, var = mean_and_variance(torch.tensor([[1.0, 2.0], [2.0, 2.0], [6.0, 2.0]]))
    assert mean.tolist() == pytest.approx([3.0, 2.0])
    assert var.tolist() == pytest.approx([(4.0 + 1.0 + 9.0) / 2, 0.0])
    mean, var = mean_and_variance(torch.tensor([[-4.0, 7.0]]))   # one draw: no spread to estimate
    assert mean.tolist() == [-4.0, 7.0] and var.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("n, steps", [(33, 2), (5, 3)])
def test_gradient_accumulation_with_unequal_microbatches_equals_one_batch(tokenizer, n, steps):
    """33 pairs in 2 microbatches are 16 + 17 (5 in 3 are 2 + 1 + 2): each microbatch's mean loss must be
    weighted by its share of the batch, not by 1 / gradient_accumulation_steps, for the update to equal
    the one-batch update."""
    from omegaconf import OmegaConf
    from trainers import BasicTrainer
    from scoring import Reference
    assert len({len(p["prompt"]) for p in split_batch({"prompt": list(range(n))}, steps)}) == 2   # unequal parts
    torch.manual_seed(2)
    t = 9
    ids = torch.randint(3, len(tokenizer), (n, t))
    labels = ids.clone()
    labels[:, :4] = -100
    # the rejected responses are random too, so the per-pair gradients differ from microbatch to microbatch
    rejected = torch.randint(3, len(tokenizer), (n, t))
    rejected_labels = rejected.clone()
    rejected_labels[:, :4] = -100
    batch = {"chosen_input_ids": ids, "chosen_attention_mask": torch.ones_like(ids), "chosen_labels": labels,
             "rejected_input_ids": rejected, "rejected_attention_mask": torch.ones_like(ids), "rejected_labels": rejected_labels}
    updates, losses = [], []
    for accumulation in (1, steps):
        policy = make_tiny_model(tokenizer, seed=3)
        reference = make_tiny_model(tokenizer, seed=4)
        before = torch.cat([p.detach().flatten().clone() for p in policy.parameters()])
        cfg = OmegaConf.create({"loss": {"name": "dpo", "beta": 0.1, "reference_free": False}, "optimizer": "SGD", "lr": 1.0,
                                "warmup_steps": 0, "gradient_accumulation_steps": accumulation, "max_grad_norm": 1e9,
                                "train_dropout": False, "activation_checkpointing": False, "do_first_eval": False,
                                "eval_every": 100, "online": False})
        trainer = BasicTrainer(policy, Reference(policy, reference), tokenizer, cfg, "/tmp", None, None, None, "cpu")
        losses.append(trainer.train_step(dict(batch))["loss/train"])
        updates.append(torch.cat([p.detach().flatten() for p in policy.parameters()]) - before)
    assert updates[0].abs().max() > 1e-3
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)   # the logged loss is the mean over all n pairs
    assert torch.allclose(updates[0], updates[1], atol=1e-6, rtol=0)


def test_chosen_and_rejected_read_their_prompt_once_with_the_same_loss_and_gradients(tokenizer):
    """In one process the DPO step runs the trunk once over each prompt and continues both responses
    from its cache: the loss, the reference log-probs and every gradient are those of whole sequences,
    while the trunk reads fewer tokens. Responses of unequal lengths (right padding) included."""
    from omegaconf import OmegaConf
    from trainers import BasicTrainer
    from scoring import Reference
    torch.manual_seed(5)
    n, prompt, t = 4, 6, 12
    chosen = torch.randint(3, len(tokenizer), (n, t))
    rejected = torch.randint(3, len(tokenizer), (n, t))
    rejected[:, :prompt] = chosen[:, :prompt]
    masks = {"chosen": torch.ones(n, t, dtype=torch.long), "rejected": torch.ones(n, t, dtype=torch.long)}
    masks["rejected"][0, 9:] = 0      # a shorter rejected response, padded on the right
    masks["chosen"][2, 10:] = 0
    batch = {}
    for key, ids in (("chosen", chosen), ("rejected", rejected)):
        labels = ids.masked_fill(masks[key] == 0, -100)
        labels[:, :prompt] = -100
        batch.update({f"{key}_input_ids": ids.masked_fill(masks[key] == 0, tokenizer.pad_token_id),
                      f"{key}_attention_mask": masks[key], f"{key}_labels": labels})
    cfg = OmegaConf.create({"loss": {"name": "dpo", "beta": 0.1, "reference_free": False}, "optimizer": "SGD", "lr": 1.0,
                            "warmup_steps": 0, "train_dropout": False, "activation_checkpointing": False,
                            "eval_every": 100, "online": False})
    results = {}
    for share in (False, True):
        policy = make_tiny_model(tokenizer, seed=3)
        trainer = BasicTrainer(policy, Reference(policy, make_tiny_model(tokenizer, seed=4)), tokenizer, cfg, "/tmp",
                               None, None, None, "cpu")
        assert trainer.share_prompts
        trainer.share_prompts = share
        read = []
        hook = policy.model.register_forward_hook(lambda m, args, kwargs, out: read.append(kwargs["input_ids"].numel()),
                                                  with_kwargs=True)
        policy.train()
        loss, metrics = trainer.batch_metrics({k: v.clone() for k, v in batch.items()}, train=True)
        loss.backward()
        hook.remove()
        results[share] = (loss.item(), metrics, {k: p.grad.clone() for k, p in policy.named_parameters()}, sum(read))
    (loss_a, metrics_a, grads_a, read_a), (loss_b, metrics_b, grads_b, read_b) = results[False], results[True]
    assert loss_b == pytest.approx(loss_a, abs=1e-6)
    for key in metrics_a:
        assert torch.allclose(metrics_a[key], metrics_b[key], atol=1e-5), key
    assert max(float((grads_a[k] - grads_b[k]).abs().max()) for k in grads_a) < 1e-6
    assert max(float(g.abs().max()) for g in grads_a.values()) > 1e-4
    assert read_b < read_a
