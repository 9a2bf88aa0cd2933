"""Acquisition functions on hand-made tensors: the candidate that must win, wins."""
import math

import pytest
import torch

from data_selection import (STRATEGIES, ae_acquisition, borda_acquisition, borda_bounds, top_k,
                            us_acquisition)


def test_ae_picks_the_widest_interval_on_the_better_response():
    mu = torch.tensor([[-10.0, -12.0], [-10.0, -12.0], [-10.0, -10.0]])
    sigma = torch.tensor([[1.0, 0.5], [3.0, 0.5], [0.1, 0.1]])
    ref = torch.zeros(3, 2)
    acq = ae_acquisition(mu, sigma, ref, gamma=2.0)
    # pair 0: upper max(-8, -11) = -8, lower max(-12, -13) = -12 -> 4
    # pair 1: upper max(-4, -11) = -4, lower max(-16, -13) = -13 -> 9
    # pair 2: upper -9.8, lower -10.2 -> 0.4
    assert acq.tolist() == pytest.approx([4.0, 9.0, 0.4], abs=1e-5)
    assert top_k(acq, 1) == [1]


def test_ae_uses_reference_to_shift_rewards():
    mu = torch.tensor([[-5.0, -20.0]])
    sigma = torch.tensor([[1.0, 5.0]])
    # the reference makes response 2's implicit reward the larger one: its interval decides
    ref = torch.tensor([[-5.0, -30.0]])
    acq = ae_acquisition(mu, sigma, ref, gamma=1.0)
    upper = max(-5 + 1 + 5, -20 + 5 + 30)   # 15
    lower = max(-5 - 1 + 5, -20 - 5 + 30)   # 5
    assert acq.item() == pytest.approx(upper - lower)


def test_us_picks_the_most_uncertain_pair():
    var = torch.tensor([[1.0, 1.0], [0.1, 5.0], [2.0, 2.5]])
    assert us_acquisition(var).tolist() == pytest.approx([1.0, 2.55, 2.25])
    assert top_k(us_acquisition(var), 2) == [1, 2]


def test_selection_is_symmetric_in_the_pair_so_labels_are_never_read():
    torch.manual_seed(0)
    mu, sigma, ref = torch.randn(10, 2) * 5, torch.rand(10, 2) * 3, torch.randn(10, 2)
    cfg = type("C", (), {"active_beta": 2.0, "online": False})
    for name in ("ae", "us"):
        s = {"mu": mu, "sigma": sigma, "ref": ref}
        swapped = {k: v.flip(-1) for k, v in s.items()}
        a = STRATEGIES[name].select(s, 10, 4, cfg, None)
        b = STRATEGIES[name].select(swapped, 10, 4, cfg, None)
        assert torch.allclose(a.acquisition, b.acquisition)
        assert a.rows == b.rows


def test_borda_bounds_by_hand_and_prompt_with_widest_gap_wins():
    beta, gamma = 1.0, 1.0
    # prompt 0: certain samples; prompt 1: one very uncertain policy sample
    policy_mu = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    policy_sigma = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    zeros = torch.zeros(2, 2)
    b_plus, b_minus = borda_bounds(policy_mu, policy_sigma, zeros, zeros, zeros, zeros, beta, gamma)
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert b_plus[0].tolist() == pytest.approx([0.5, 0.5])
    assert b_plus[1].tolist() == pytest.approx([sig(2.0), 0.5])
    assert b_minus[1].tolist() == pytest.approx([sig(-2.0), 0.5])
    acq = borda_acquisition(b_plus, b_minus)
    assert acq.tolist() == pytest.approx([0.0, sig(2.0) - 0.5])
    assert top_k(acq, 1) == [1]
    assert int(b_plus[1].argmax()) == 0   # the response sent to the oracle is the argmax of b+


def test_borda_bounds_average_over_reference_samples():
    policy_mu = torch.tensor([[1.0]])
    other_mu = torch.tensor([[0.0, 2.0]])
    z1, z2 = torch.zeros(1, 1), torch.zeros(1, 2)
    b_plus, _ = borda_bounds(policy_mu, z1, z1, other_mu, z2, z2, beta=1.0, gamma=1.0)
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert b_plus.item() == pytest.approx((sig(1.0) + sig(-1.0)) / 2)


def test_top_k_is_stable_on_ties():
    assert top_k(torch.tensor([1.0, 3.0, 3.0, 0.0]), 3) == [1, 2, 0]


def test_score_sequences_returns_scores_in_input_order(tokenizer):
    """Scoring sorts by length for padding; results must come back in the caller's order."""
    from omegaconf import OmegaConf
    from conftest import make_tiny_model
    from scoring import ESTIMATORS, Reference, response_logps, score_sequences
    model, ref_model = make_tiny_model(tokenizer, seed=0), make_tiny_model(tokenizer, seed=1)
    g = torch.Generator().manual_seed(0)
    sequences = []
    for length in (9, 4, 12, 6, 4, 10):
        ids = torch.randint(3, len(tokenizer), (length,), generator=g).tolist()
        sequences.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * 2 + ids[2:]})
    cfg = OmegaConf.create({"selection_batch_size": 4, "mc_samples": 3, "llm_dropout": 0.0, "uncertainty_method": "head"})
    scores = score_sequences(model, Reference(model, ref_model), sequences, estimator=ESTIMATORS["head"](cfg),
                             pad_token_id=tokenizer.pad_token_id, batch_size=4, device="cpu")
    for i, s in enumerate(sequences):
        t = lambda key: torch.tensor([s[key]])
        assert scores["mu"][i].item() == pytest.approx(response_logps(model, t("input_ids"), t("attention_mask"), t("labels")).item(), abs=1e-4)
        assert scores["ref"][i].item() == pytest.approx(response_logps(ref_model, t("input_ids"), t("attention_mask"), t("labels")).item(), abs=1e-4)
