"""The uncertainty estimators beyond the paper's MC dropout: head dropout in closed form (against Monte
Carlo), and the Laplace posterior that shrinks with the labels bought."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_tiny_model
from scoring import (ESTIMATORS, LaplaceEstimator, LogitTransform, analytic_head_dropout, exact_dimension_variance,
                     response_logps)


def batch(tokenizer, seed, rows=4, length=12, prompt=4):
    ids = torch.randint(3, len(tokenizer), (rows, length), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :prompt] = -100
    return ids, torch.ones_like(ids), labels


def test_exact_dimension_variance_by_hand():
    """A 2-word vocabulary, one hidden dimension: dropping it (probability p) leaves logits 0, 0 (log p = log 1/2);
    keeping it scales h by 1/(1-p), logits (2h/(1-p), 0). Var = p (1-p) (difference)^2."""
    p, h = 0.2, 0.5
    weight = torch.tensor([[2.0], [0.0]])                      # (V=2, H=1)
    hidden = torch.tensor([[h]])
    raw = hidden @ weight.T
    var = exact_dimension_variance(raw, hidden, weight, torch.tensor([0]), torch.tensor([[0]]), p, LogitTransform())
    kept = 2 * h / (1 - p)
    f_kept = kept - math.log(math.exp(kept) + 1)
    f_dropped = math.log(0.5)
    assert var.shape == (1, 1)
    assert var.item() == pytest.approx(p * (1 - p) * (f_kept - f_dropped) ** 2, rel=1e-5)


def head_dropout_draws(model, ids, mask, labels, p, k, seed):
    """Ground truth written out independently of scoring.py: k inverted-dropout masks on the final hidden
    state, full log-softmax, summed over the labelled tokens. (k, B)."""
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        keep = targets != -100
        generator = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(k // 1000):
            masks = torch.empty((1000,) + hidden.shape).bernoulli_(1 - p, generator=generator)
            logp = model.lm_head(hidden * masks / (1 - p)).log_softmax(-1)
            picked = logp.gather(-1, targets.clamp(min=0)[None, ..., None].expand(1000, -1, -1, 1)).squeeze(-1)
            out.append((picked * keep).sum(-1))
    return torch.cat(out)


def test_analytic_head_dropout_matches_monte_carlo(tokenizer):
    """The closed form against 20000 head-dropout masks on a tiny model: every sequence's variance within
    12% (the Monte Carlo error of a variance from 20000 draws is ~1-3% here), the centre equal to the
    deterministic log-prob, and zero variance without dropout."""
    model = make_tiny_model(tokenizer, seed=3)
    ids, mask, labels = batch(tokenizer, seed=3)
    p = 0.1
    moments = analytic_head_dropout(model, ids, mask, labels, p=p, exact_dims=32)
    truth = head_dropout_draws(model, ids, mask, labels, p, 20000, seed=0).var(0)
    assert torch.allclose(moments["var"], truth, rtol=0.12), (moments["var"], truth)
    assert torch.allclose(moments["logp"], response_logps(model, ids, mask, labels), atol=1e-5)
    assert torch.equal(analytic_head_dropout(model, ids, mask, labels, p=0.0)["var"], torch.zeros(4))


def test_head_analytic_estimator_is_deterministic_and_centred(tokenizer):
    model = make_tiny_model(tokenizer, seed=4)
    ids, mask, labels = batch(tokenizer, seed=4)
    estimate = ESTIMATORS["head_analytic"](OmegaConf.create({"llm_dropout": 0.1}))
    a = estimate(model, ids, mask, labels, generator=torch.Generator().manual_seed(1))
    b = estimate(model, ids, mask, labels, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a["sigma"], b["sigma"]) and (a["sigma"] > 0).all()
    assert torch.allclose(a["mu"], response_logps(model, ids, mask, labels), atol=1e-5)
    assert "mu_halves" not in a          # nothing random to split: its reliability is 1


def test_laplace_features_are_the_first_order_effect_of_a_hidden_shift(tokenizer):
    """psi(a) is d log pi(a) / d u for a shift u of the final hidden state: a small shift moves log pi by u . psi."""
    model = make_tiny_model(tokenizer, seed=5)
    ids, mask, labels = batch(tokenizer, seed=5)
    prior = 0.5
    scores = LaplaceEstimator(prior_std=prior, beta=0.1)(model, ids, mask, labels)
    psi = scores["psi"].T                                          # (B, H)
    u = torch.randn(psi.shape[1], generator=torch.Generator().manual_seed(0)) * 1e-2
    handle = model.model.norm.register_forward_hook(lambda module, inputs, output: output + u)
    try:
        shifted = response_logps(model, ids, mask, labels)
    finally:
        handle.remove()
    assert torch.allclose(shifted - scores["mu"], psi @ u, rtol=2e-2, atol=2e-5)
    # before any label the spread is the prior's: prior_std * |psi|
    assert torch.allclose(scores["sigma"], prior * psi.norm(dim=-1), rtol=1e-4)
    # no prior uncertainty, no spread
    assert LaplaceEstimator(prior_std=1e-9, beta=0.1)(model, ids, mask, labels)["sigma"].abs().max() < 1e-6


def test_laplace_spread_shrinks_along_the_pairs_bought_and_not_elsewhere():
    """Hand-made features: buying pairs whose responses differ along e1 shrinks the spread of a response
    along e1 and leaves one along e2 at its prior; the orientation of a pair (its label) does not matter."""
    estimator = LaplaceEstimator(prior_std=1.0, beta=1.0)
    estimator.observe(torch.zeros(1, 3), torch.zeros(1, 3))      # sizes the posterior, adds nothing
    e1, e2 = torch.eye(3)[0], torch.eye(3)[1]
    before = torch.stack([e1 @ estimator.covariance().float() @ e1, e2 @ estimator.covariance().float() @ e2])
    estimator.observe(torch.stack([2 * e1] * 5), torch.zeros(5, 3))
    swapped = LaplaceEstimator(prior_std=1.0, beta=1.0)
    swapped.observe(torch.zeros(5, 3), torch.stack([2 * e1] * 5))
    after = torch.stack([e1 @ estimator.covariance().float() @ e1, e2 @ estimator.covariance().float() @ e2])
    assert after[0] == pytest.approx(1 / (1 + 5 * 4 / 4)) and after[1] == pytest.approx(before[1].item())
    assert torch.equal(estimator.precision, swapped.precision)


def test_laplace_on_a_model_shrinks_the_bought_pairs_more_than_unrelated_ones(tokenizer):
    """On a tiny model: after buying the pairs of one batch, the spread of their responses' difference
    falls far more than the spread of pairs from an unrelated batch."""
    model = make_tiny_model(tokenizer, seed=7)
    estimator = LaplaceEstimator(prior_std=1000.0, beta=1.0)   # a weak prior: the labels decide
    bought, other = batch(tokenizer, seed=7, rows=8), batch(tokenizer, seed=8, rows=8)

    def pair_spread(b):
        psi = estimator(model, *b)["psi"].T.double()
        d = psi[0::2] - psi[1::2]
        return ((d @ estimator.covariance()) * d).sum(-1).sqrt()

    before_bought, before_other = pair_spread(bought), pair_spread(other)
    psi = estimator(model, *bought)["psi"].T
    estimator.observe(psi[0::2], psi[1::2])
    shrink_bought = (pair_spread(bought) / before_bought).mean()
    shrink_other = (pair_spread(other) / before_other).mean()
    assert shrink_bought < 0.2 and shrink_other > 2 * shrink_bought


def test_laplace_state_round_trips():
    estimator = LaplaceEstimator(prior_std=2.0, beta=0.5)
    estimator.observe(torch.randn(3, 4), torch.randn(3, 4))
    copy = LaplaceEstimator(prior_std=2.0, beta=0.5)
    copy.load_state_dict(estimator.state_dict())
    assert torch.equal(copy.covariance(), estimator.covariance())


def toy_labels(n, hidden_size, prior_std, beta, seed=0, margin_scale=0.0):
    """Pairs whose labels come from a known shift u ~ N(0, prior_std^2 I): d ~ N(0, I), P(first wins) =
    sigmoid(beta (margin + d . u))."""
    g = torch.Generator().manual_seed(seed)
    u = prior_std * torch.randn(hidden_size, generator=g)
    d = torch.randn(n, hidden_size, generator=g)
    margins = margin_scale * torch.randn(n, generator=g)
    first_won = torch.rand(n, generator=g) < torch.sigmoid(beta * (margins + d @ u))
    return u, d, margins, first_won


def test_evidence_recovers_the_prior_scale_the_labels_were_drawn_from():
    from scoring import evidence_prior_std
    for true_std in (0.5, 3.0):
        u, d, margins, first_won = toy_labels(300, 4, true_std, beta=1.0, seed=3)
        fitted = evidence_prior_std(d, margins, first_won, beta=1.0)
        # the best any estimator can do from one draw of u is its own scale, |u| / sqrt(H)
        assert fitted == pytest.approx(float(u.norm()) / 2, rel=0.35)


def test_evidence_shrinks_the_prior_when_the_policy_already_predicts_the_labels():
    """Labels drawn from the margins alone (no shift): the evidence wants almost no prior spread."""
    from scoring import evidence_prior_std
    _, d, margins, first_won = toy_labels(300, 4, 0.0, beta=1.0, seed=4, margin_scale=3.0)
    assert evidence_prior_std(d, margins, first_won, beta=1.0) < 0.05


def test_buying_labels_shrinks_the_evidence_posterior_by_the_stated_amount():
    """The toy's labels support a prior std near 2. The estimator's prior moves there from its start at
    0.25; after n pairs with d ~ N(0, I) (sum d d^T ~ n I) the spread of any direction is
    1 / sqrt(1 + n beta^2 s^2 / 4) of its prior's: 0.1 at n = 400, beta = 0.5, s = 2, where the fixed prior
    at 0.25 keeps 0.62 of it."""
    beta, n, hidden = 0.5, 400, 3
    u, d, margins, first_won = toy_labels(n, hidden, 2.0, beta=beta, seed=5)
    psi = torch.randn(50, hidden, generator=torch.Generator().manual_seed(6))
    ratios = {}
    for prior in ("evidence", "fixed"):
        estimator = LaplaceEstimator(prior_std=0.25, beta=beta, prior=prior)
        for start in range(0, n, 200):     # bought in batches, refitted after each
            part = slice(start, start + 200)
            estimator.observe(d[part], torch.zeros_like(d[part]), margins[part], first_won[part])
        sigma = ((psi.double() @ estimator.covariance()) * psi.double()).sum(-1).sqrt()
        ratios[prior] = (sigma / (estimator.prior_std * psi.double().norm(dim=-1))).mean().item()
        s = estimator.prior_std
        assert ratios[prior] == pytest.approx(1 / math.sqrt(1 + n * beta ** 2 * s ** 2 / 4), rel=0.15)
    assert estimator.prior_std == 0.25 and ratios["fixed"] > 0.55
    assert ratios["evidence"] < 0.2


def test_laplace_evidence_state_round_trips_and_legacy_precision_loads():
    estimator = LaplaceEstimator(prior_std=0.5, beta=1.0, prior="evidence")
    _, d, margins, first_won = toy_labels(40, 4, 1.0, beta=1.0, seed=7)
    estimator.observe(d, torch.zeros_like(d), margins, first_won)
    copy = LaplaceEstimator(prior_std=0.5, beta=1.0, prior="evidence")
    copy.load_state_dict(estimator.state_dict())
    assert copy.prior_std == estimator.prior_std != 0.5
    assert torch.equal(copy.covariance(), estimator.covariance())
    copy.observe(d[:4], torch.zeros_like(d[:4]), margins[:4], first_won[:4])   # goes on from the saved pairs
    assert copy.n_observed == 44
    legacy = LaplaceEstimator(prior_std=2.0, beta=1.0)
    legacy.load_state_dict({"laplace_precision": torch.eye(4, dtype=torch.float64) / 4 + torch.diag(torch.arange(4.0).double())})
    assert torch.allclose(legacy.fisher, torch.diag(torch.arange(4.0)).double())
    with pytest.raises(ValueError, match="needs the margins"):
        LaplaceEstimator(prior_std=1.0, beta=1.0, prior="evidence").observe(d, d)


def test_unit_logit_prior_is_set_once_from_the_first_pairs_and_each_pair_then_shrinks_by_a_quarter():
    """d = 3 e1 and 4 e2 (rms |d| = sqrt(12.5)), beta = 0.1: s = 1 / (0.1 sqrt(12.5)); the variance along e1
    falls from s^2 to 1 / (1 / s^2 + beta^2 / 4 * 9) = s^2 / (1 + 9 / 50), whatever the labels."""
    e = torch.eye(3)
    estimator = LaplaceEstimator(prior_std=0.25, beta=0.1, prior="unit_logit")
    estimator.observe(torch.stack([3 * e[0], 4 * e[1]]), torch.zeros(2, 3))
    s = 1 / (0.1 * math.sqrt(12.5))
    assert estimator.prior_std == pytest.approx(s)
    assert float(estimator.covariance()[0, 0]) == pytest.approx(s ** 2 / (1 + 9 / 50))
    assert float(estimator.covariance()[2, 2]) == pytest.approx(s ** 2)           # untouched direction
    # a pair of typical size (|d| = rms) shrinks its direction's variance by 1 / 1.25
    estimator.observe(math.sqrt(12.5) * e[2:], torch.zeros(1, 3))
    assert estimator.prior_std == pytest.approx(s)                                  # set once
    assert float(estimator.covariance()[2, 2]) == pytest.approx(s ** 2 / 1.25)
    assert estimator.stats() == {"selection/laplace_prior_std": pytest.approx(s), "selection/laplace_pairs": 3.0}
    copy = LaplaceEstimator(prior_std=0.25, beta=0.1, prior="unit_logit")
    copy.load_state_dict(estimator.state_dict())
    assert copy.stats() == estimator.stats() and torch.equal(copy.covariance(), estimator.covariance())
