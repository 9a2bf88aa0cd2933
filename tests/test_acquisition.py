"""Acquisition functions on hand-made tensors: the candidate that must win, wins."""
import math
import random

import pytest
import torch

from strategies import STRATEGIES, ae_acquisition, borda_acquisition, borda_bounds, top_k, us_acquisition


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


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_borda_bounds_by_hand_with_spread_and_reference_on_both_sides():
    """Every input nonzero, reference samples included: P+ pits the policy's upper bound against the
    reference sample's LOWER bound, P- the policy's lower against the reference's UPPER bound, each
    implicit reward shifted by its own reference log-prob."""
    beta, gamma = 0.5, 2.0
    policy_mu = torch.tensor([[-2.0, -4.0], [-1.0, -1.0]])
    policy_sigma = torch.tensor([[0.5, 1.0], [0.0, 1.0]])
    policy_ref = torch.tensor([[-3.0, -3.0], [-1.0, -2.0]])
    other_mu = torch.tensor([[-5.0, -1.0], [-2.0, -2.0]])
    other_sigma = torch.tensor([[1.0, 0.5], [1.0, 0.0]])
    other_ref = torch.tensor([[-4.0, -2.0], [-1.0, -3.0]])
    b_plus, b_minus = borda_bounds(policy_mu, policy_sigma, policy_ref, other_mu, other_sigma, other_ref, beta, gamma)
    # prompt 0: U(a) - ref = [2, 1], L(a) - ref = [0, -3]; U(a') - ref' = [1, 2], L(a') - ref' = [-3, 0]
    #   P+ = sig(0.5 * [[2 + 3, 2 - 0], [1 + 3, 1 - 0]]), P- = sig(0.5 * [[0 - 1, 0 - 2], [-3 - 1, -3 - 2]])
    # prompt 1: U(a) - ref = [0, 3], L(a) - ref = [0, -1]; U(a') - ref' = [1, 1], L(a') - ref' = [-3, 1]
    #   P+ = sig(0.5 * [[0 + 3, 0 - 1], [3 + 3, 3 - 1]]), P- = sig(0.5 * [[0 - 1, 0 - 1], [-1 - 1, -1 - 1]])
    expected_plus = [[(sig(2.5) + sig(1.0)) / 2, (sig(2.0) + sig(0.5)) / 2],
                     [(sig(1.5) + sig(-0.5)) / 2, (sig(3.0) + sig(1.0)) / 2]]
    expected_minus = [[(sig(-0.5) + sig(-1.0)) / 2, (sig(-2.0) + sig(-2.5)) / 2],
                      [sig(-0.5), sig(-1.0)]]
    assert b_plus.tolist() == [pytest.approx(row, abs=1e-6) for row in expected_plus]
    assert b_minus.tolist() == [pytest.approx(row, abs=1e-6) for row in expected_minus]
    acq = borda_acquisition(b_plus, b_minus)
    assert acq.tolist() == pytest.approx([expected_plus[0][0] - expected_minus[0][0],
                                          expected_plus[1][1] - expected_minus[1][0]], abs=1e-6)


def test_select_borda_keeps_the_widest_gaps_and_sends_the_best_policy_sample_against_a_seeded_draw():
    """select_borda on hand-made (P, 2m) scores, policy samples in columns 0..m-1: prompt 0 is certain
    (gap 0), prompt 1's policy sample 2 and prompt 2's policy sample 1 are uncertain (prompt 1 more).
    The reference columns carry their own spread, at other positions, so reading the wrong half moves
    the chosen sample."""
    from omegaconf import OmegaConf
    from strategies import select_borda
    m = 3
    mu, ref = torch.zeros(3, 2 * m), torch.zeros(3, 2 * m)
    sigma = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                          [0.0, 0.0, 3.0, 1.0, 0.0, 0.0],
                          [0.0, 1.0, 0.0, 0.0, 0.0, 2.0]])
    config = OmegaConf.create({"loss": {"beta": 1.0}, "active_beta": 1.0, "online": True})
    rng = random.Random(7)
    selection = select_borda({"mu": mu, "sigma": sigma, "ref": ref}, 3, 2, config, rng)
    draws = random.Random(7)
    expected_ref = [draws.randrange(m), draws.randrange(m)]
    assert expected_ref != [0, 0]   # the seeded draws are not the constant a bug would return
    assert selection.rows == [1, 2]
    assert selection.responses == [(2, expected_ref[0]), (1, expected_ref[1])]
    assert rng.getstate() == draws.getstate()   # exactly one draw per kept prompt
    # prompt 1 by hand (beta = gamma = 1, mu = ref = 0): U = [0, 0, 3], L = [0, 0, -3];
    # reference U' = [1, 0, 0], L' = [-1, 0, 0]
    b_plus = (sig(4.0) + 2 * sig(3.0)) / 3
    b_minus = (sig(-1.0) + 2 * sig(0.0)) / 3
    assert selection.acquisition[0].item() == pytest.approx(0.0, abs=1e-7)
    assert selection.acquisition[1].item() == pytest.approx(b_plus - b_minus, abs=1e-6)


def test_spearman_by_hand_with_ties():
    from strategies import spearman
    assert spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3): Pearson of the ranks
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 5.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(spearman(torch.ones(5), torch.arange(5.0)))


@pytest.mark.parametrize("icc", [0.2, 0.8])
def test_split_half_reliability_recovers_a_known_intraclass_correlation(icc):
    """Two half estimates = a per-pair signal plus independent noise with ICC = var(signal) / var(total):
    the halves' Spearman is (6 / pi) asin(ICC / 2) for Gaussian scores."""
    from strategies import split_half_spearman
    g = torch.Generator().manual_seed(0)
    n = 4000
    signal = torch.randn(n, generator=g)
    noise_sd = math.sqrt(1 / icc - 1)
    halves = torch.stack([signal + noise_sd * torch.randn(n, generator=g) for _ in range(2)])   # (2, n)
    # US reads the mean variance of the pair: make it exp(half score), a monotone map, for both responses
    sigma_halves = torch.exp(halves / 2)[..., None].expand(2, n, 2)
    scores = {"mu": torch.zeros(n, 2), "sigma": torch.ones(n, 2), "mu_halves": torch.zeros(2, n, 2), "sigma_halves": sigma_halves}
    cfg = type("C", (), {"active_beta": 2.0, "online": False})
    r = split_half_spearman(STRATEGIES["us"], scores, n, 8, cfg)
    assert r == pytest.approx(6 / math.pi * math.asin(icc / 2), abs=0.04)
    assert split_half_spearman(STRATEGIES["us"], {k: v for k, v in scores.items() if "halves" not in k}, n, 8, cfg) is None


def test_reliability_log_warns_once_when_selection_is_random(capsys):
    from strategies import ReliabilityLog
    log = ReliabilityLog()
    assert log.step(0.9, 100) == {"selection/split_half_spearman": 0.9, "selection/reliability": pytest.approx(1.8 / 1.9)}
    assert "WARNING" not in capsys.readouterr().out
    log.step(0.1, 100)   # 2 / sqrt(99) = 0.20: indistinguishable from a random ranking
    log.step(0.05, 100)
    assert capsys.readouterr().out.count("indistinguishable from random") == 1
    assert log.summary() == {"selection_split_half_spearman": pytest.approx(0.35)}


def test_borda_saturation_share_by_hand():
    from strategies import unsaturated_share
    assert unsaturated_share(torch.tensor([0.01, 0.5, 0.97, 0.2])) == pytest.approx(0.5)


def test_headroom_picks_the_pairs_the_policy_misranks_most_and_reads_the_labels():
    from omegaconf import OmegaConf
    # implicit-reward margin of the chosen response over the rejected one, per pair: 0, -1, -3, -2
    mu = torch.tensor([[0.0, 0.0], [-1.0, 0.0], [0.0, -3.0], [2.0, 0.0]])
    first_is_rejected = torch.tensor([False, False, True, True])
    cfg = OmegaConf.create({"loss": {"beta": 1.0}})
    scores = {"mu": mu, "ref": torch.zeros(4, 2), "first_is_rejected": first_is_rejected}
    selection = STRATEGIES["headroom"].select(scores, 4, 2, cfg, None)
    assert selection.rows == [2, 3]
    assert selection.acquisition.tolist() == pytest.approx([-math.log(torch.sigmoid(torch.tensor(m)).item())
                                                            for m in (0.0, -1.0, -3.0, -2.0)], abs=1e-5)
    flipped = STRATEGIES["headroom"].select(dict(scores, first_is_rejected=~first_is_rejected), 4, 2, cfg, None)
    assert flipped.rows == [0, 1]       # other labels, other pairs: it is not a deployable selector
    assert [name for name, s in STRATEGIES.items() if s.uses_labels] == ["headroom"]


def test_length_normalize_ranks_by_per_token_spread():
    from omegaconf import OmegaConf
    from strategies import selection_view
    # pair 0: long responses, larger total spread; pair 1: short ones, larger spread per token
    scores = {"mu": torch.tensor([[-40.0, -40.0], [-2.0, -2.0]]), "sigma": torch.tensor([[4.0, 4.0], [1.0, 1.0]]),
              "ref": torch.tensor([[-40.0, -40.0], [-2.0, -2.0]]), "n_tokens": torch.tensor([[40.0, 40.0], [2.0, 2.0]])}
    for normalize, winner in ((False, 0), (True, 1)):
        cfg = OmegaConf.create({"length_normalize": normalize, "active_beta": 2.0, "online": False})
        view = selection_view(scores, cfg)
        for name in ("ae", "us"):
            assert STRATEGIES[name].select(view, 2, 1, cfg, None).rows == [winner]
    view = selection_view(scores, OmegaConf.create({"length_normalize": True}))
    assert torch.allclose(view["sigma"], torch.tensor([[0.1, 0.1], [0.5, 0.5]])) and view["n_tokens"] is scores["n_tokens"]


def test_gradnorm_is_the_expected_dpo_gradient_length_by_hand():
    """Pair 0: implicit-reward logit h = 0, so p = 1/2 and E|grad| = 2 beta (1/4) |d| = beta |d| / 2; pair 1:
    the policy is sure (h = 40, p ~ 1), its expected gradient vanishes though |d| is larger."""
    from strategies import expected_gradient_norm
    beta = 0.5
    mu = torch.tensor([[-3.0, -3.0], [-1.0, -21.0]])
    ref = torch.zeros(2, 2)
    psi = torch.zeros(2, 2, 2)                  # (H, P, 2)
    psi[:, 0, 0], psi[:, 0, 1] = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0])      # |d| = 5
    psi[:, 1, 0], psi[:, 1, 1] = torch.tensor([30.0, 0.0]), torch.tensor([0.0, 40.0])    # |d| = 50
    acq = expected_gradient_norm(mu, ref, psi, beta)
    p = 1 / (1 + math.exp(-beta * 20.0))
    assert acq.tolist() == pytest.approx([beta * 5 / 2, 2 * beta * p * (1 - p) * 50], rel=1e-3)
    cfg = type("C", (), {"loss": type("L", (), {"beta": beta})})
    assert STRATEGIES["gradnorm"].select({"mu": mu, "ref": ref, "psi": psi}, 2, 1, cfg, None).rows == [0]


def test_length_keeps_the_pairs_with_the_most_response_tokens():
    n_tokens = torch.tensor([[3.0, 4.0], [10.0, 1.0], [2.0, 2.0], [6.0, 6.0]])
    selection = STRATEGIES["length"].select({"n_tokens": n_tokens}, 4, 2, None, None)
    assert selection.rows == [3, 1] and selection.acquisition.tolist() == [7.0, 11.0, 4.0, 12.0]


def test_ablations_do_not_read_the_pair_order():
    torch.manual_seed(1)
    scores = {"mu": torch.randn(6, 2) * 3, "ref": torch.randn(6, 2), "psi": torch.randn(5, 6, 2),
              "n_tokens": torch.randint(1, 20, (6, 2)).float()}
    cfg = type("C", (), {"loss": type("L", (), {"beta": 0.1})})
    for name in ("gradnorm", "length"):
        a = STRATEGIES[name].select(scores, 6, 3, cfg, None)
        b = STRATEGIES[name].select({k: v.flip(-1) for k, v in scores.items()}, 6, 3, cfg, None)
        assert torch.allclose(a.acquisition, b.acquisition) and a.rows == b.rows


def three_prompts_three_responses(tokenizer, seed):
    """Sequences (input_ids, attention_mask, labels) of 3 random prompts of 3, 7 and 5 tokens, each with
    responses of 2, 6 and 4 tokens, in that order."""
    g = torch.Generator().manual_seed(seed)
    sequences = []
    for prompt_len in (3, 7, 5):
        prompt = torch.randint(3, len(tokenizer), (prompt_len,), generator=g).tolist()
        for response_len in (2, 6, 4):
            response = torch.randint(3, len(tokenizer), (response_len,), generator=g).tolist()
            sequences.append({"input_ids": prompt + response, "attention_mask": [1] * (prompt_len + response_len),
                              "labels": [-100] * prompt_len + response})
    return sequences


@pytest.mark.parametrize("method", ["head", "head_analytic", "laplace", None])
def test_shared_prompts_score_as_whole_sequences(tokenizer, method):
    """Three prompts of different lengths, three responses each: reading each prompt once and the
    responses from its cache gives the scores of whole sequences, and each prompt is read once per model."""
    from omegaconf import OmegaConf
    from conftest import make_tiny_model
    from scoring import ESTIMATORS, Reference, policy_logps, prompt_groups, score_sequences
    model, ref_model = make_tiny_model(tokenizer, seed=0), make_tiny_model(tokenizer, seed=1)
    sequences = three_prompts_three_responses(tokenizer, seed=0)
    cfg = OmegaConf.create({"mc_samples": 4, "llm_dropout": 0.0, "laplace_prior_std": 1.0, "laplace_prior": "fixed",
                            "loss": {"beta": 0.1}})
    estimator = ESTIMATORS[method](cfg) if method else policy_logps
    assert [sorted(len(sequences[i]["input_ids"]) for i in b) for b in prompt_groups(sequences, 6)] == [[5, 7, 7, 9, 9, 11], [9, 11, 13]]
    kwargs = dict(estimator=estimator, pad_token_id=tokenizer.pad_token_id, batch_size=6, device="cpu")
    calls = []
    hook = model.model.register_forward_hook(lambda module, args, kw_out=None: calls.append(1))
    shared = score_sequences(model, Reference(model, ref_model), sequences, share_prompts=True, **kwargs)
    shared_calls = len(calls)
    hook.remove()
    plain = score_sequences(model, Reference(model, ref_model), sequences, share_prompts=False, **kwargs)
    assert shared_calls == 4     # 2 minibatches x (prompts, then responses) for the policy
    assert set(shared) == set(plain)
    for key in plain:
        assert torch.allclose(shared[key], plain[key], atol=1e-4, rtol=1e-4), key


def test_head_masks_follow_the_candidate_not_its_batch_or_rank(tokenizer):
    """With one seed per candidate (RowSeeds) a candidate's MC-dropout draws are the same whether the pool
    is scored in one batch, in batches of 2 with shared prompts, or split between two ranks as
    distributed.sharded splits it; a single generator for the pool gives other draws when batched otherwise."""
    from omegaconf import OmegaConf
    from conftest import make_tiny_model
    from data_selection import candidate_seed
    from scoring import ESTIMATORS, RowSeeds, score_sequences
    model = make_tiny_model(tokenizer, seed=0)
    sequences = three_prompts_three_responses(tokenizer, seed=1)
    estimator = ESTIMATORS["head"](OmegaConf.create({"mc_samples": 4, "llm_dropout": 0.2}))
    seeds = RowSeeds([candidate_seed(7, i) for i in range(len(sequences))])
    score = lambda seqs, generator, batch_size, share: score_sequences(
        model, None, seqs, estimator=estimator, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size,
        device="cpu", generator=generator, share_prompts=share)
    whole = score(sequences, seeds, 9, False)
    assert float(whole["sigma"].min()) > 0
    for other in (score(sequences, seeds, 2, True),
                  {k: torch.cat([score(sequences[:5], seeds.take(range(5)), 9, False)[k],
                                 score(sequences[5:], seeds.take(range(5, 9)), 9, False)[k]], dim=-1) for k in whole}):
        for key in ("mu", "sigma"):
            assert torch.allclose(other[key], whole[key], atol=1e-5), key
    one_generator = lambda batch_size: score(sequences, torch.Generator().manual_seed(0), batch_size, False)["mu"]
    assert not torch.allclose(one_generator(9), one_generator(2), atol=1e-3)
