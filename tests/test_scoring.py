"""The scoring path against the model's own forward (logit scaling), and the seeded estimators."""
import pytest
import torch

from conftest import make_tiny_model
from scoring import ESTIMATORS, calibrate_logit_transform, mc_dropout_logps, response_logps
from utils import ConfigError


def forward_logps(model, ids, labels):
    """Summed log-probs of the labelled tokens from the model's own forward (the ground truth)."""
    with torch.no_grad():
        logp = model(input_ids=ids).logits.float().log_softmax(-1)
    shifted = labels[:, 1:]
    mask = shifted != -100
    picked = logp[:, :-1].gather(-1, shifted.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * mask).sum(-1)


def granite(scale):
    from transformers import GraniteConfig, GraniteForCausalLM
    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=4, logits_scaling=scale, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    return GraniteForCausalLM(config).eval()


def cohere(scale):
    from transformers import CohereConfig, CohereForCausalLM
    torch.manual_seed(0)
    config = CohereConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=4, logit_scale=scale, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    return CohereForCausalLM(config).eval()


@pytest.mark.parametrize("build, scale", [(granite, 4.0), (cohere, 0.25)])
def test_log_probs_follow_the_models_own_logit_scaling(build, scale):
    model = build(scale)
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100
    truth = forward_logps(model, ids, labels)
    # without calibration the head's raw logits are off by the scale
    assert (response_logps(model, ids, torch.ones_like(ids), labels) - truth).abs().max() > 0.05
    transform = calibrate_logit_transform(model, ids[:1])
    assert transform.scale == pytest.approx(1 / scale if build is granite else scale, rel=1e-4)
    assert torch.allclose(response_logps(model, ids, torch.ones_like(ids), labels), truth, atol=1e-4)


def test_plain_head_keeps_its_logits_untouched(tokenizer):
    model = make_tiny_model(tokenizer)
    ids = torch.randint(3, len(tokenizer), (1, 8), generator=torch.Generator().manual_seed(2))
    assert calibrate_logit_transform(model, ids).scale == 1.0


def test_a_forward_that_is_no_rescaling_is_refused_in_one_line(tokenizer):
    model = make_tiny_model(tokenizer)
    forward = model.forward

    def odd_forward(*args, **kwargs):   # a per-position bias no scale can reproduce
        out = forward(*args, **kwargs)
        out.logits = out.logits + torch.linspace(0, 3, out.logits.shape[-1])
        return out

    model.forward = odd_forward
    ids = torch.randint(3, len(tokenizer), (1, 8), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ConfigError, match="not supported") as info:
        calibrate_logit_transform(model, ids)
    assert "\n" not in str(info.value)


def test_full_mc_dropout_draws_from_the_generator_it_is_given(tokenizer):
    model = make_tiny_model(tokenizer, seed=4, dropout=0.3)
    ids = torch.randint(3, len(tokenizer), (3, 12), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[:, :4] = -100
    mask = torch.ones_like(ids)
    draws = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed * 100)   # the global RNG differs between calls and must not matter
        before = torch.get_rng_state()
        draws.append(mc_dropout_logps(model, ids, mask, labels, k=4, p=0.1, method="full",
                                      generator=torch.Generator().manual_seed(seed)))
        assert torch.equal(torch.get_rng_state(), before)   # the global RNG is left alone
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert not torch.equal(draws[0][0], draws[2][0])
    assert not model.training


def test_estimators_return_centre_spread_and_two_independent_halves(tokenizer):
    from omegaconf import OmegaConf
    from scoring import mc_dropout_samples, mean_and_variance
    model = make_tiny_model(tokenizer, seed=6)
    ids = torch.randint(3, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(6))
    labels = ids.clone()
    labels[:, :3] = -100
    mask = torch.ones_like(ids)
    gen = lambda: torch.Generator().manual_seed(9)
    scores = ESTIMATORS["head"](OmegaConf.create({"mc_samples": 5, "llm_dropout": 0.2}))(model, ids, mask, labels, generator=gen())
    samples = mc_dropout_samples(model, ids, mask, labels, k=5, p=0.2, generator=gen())
    mu, var = mean_and_variance(samples)
    assert torch.equal(scores["mu"], mu) and torch.allclose(scores["sigma"], var.sqrt())
    # halves: draws 0-1 and 2-4, disjoint, so two independent estimates
    first, second = mean_and_variance(samples[:2]), mean_and_variance(samples[2:])
    assert torch.allclose(scores["mu_halves"], torch.stack([first[0], second[0]]))
    assert torch.allclose(scores["sigma_halves"], torch.stack([first[1].sqrt(), second[1].sqrt()]))
    small = ESTIMATORS["full"](OmegaConf.create({"mc_samples": 3, "llm_dropout": 0.2}))(model, ids, mask, labels, generator=gen())
    assert set(small) == {"mu", "sigma"}   # too few draws to split
