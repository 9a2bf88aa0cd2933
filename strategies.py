"""Which candidates to keep: the acquisition functions (pure tensor math), the selectors that turn
scores into a Selection, the strategy table, and the diagnostics of a selection (acquisition stats,
split-half reliability).

Adding a strategy touches one place: write its `select` function and add one `Strategy` entry to
STRATEGIES. The config check, the batch sources (data_selection.py) and the scoring read what the
entry declares. Nothing here calls a model: every function takes the scores of a pool.
"""
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# Acquisition functions (pure)

def ae_acquisition(mu: torch.Tensor, sigma: torch.Tensor, ref: torch.Tensor, gamma: float) -> torch.Tensor:
    """AE-DPO: width of the confidence interval on the better response's implicit reward.

    mu, sigma, ref: (P, 2) policy centre, spread and reference log-prob of both responses (nats).
    acq = max_i (mu_i + gamma sigma_i - ref_i) - max_i (mu_i - gamma sigma_i - ref_i). Returns (P,).
    """
    upper = (mu + gamma * sigma - ref).max(dim=-1).values
    lower = (mu - gamma * sigma - ref).max(dim=-1).values
    return upper - lower


def us_acquisition(var: torch.Tensor) -> torch.Tensor:
    """US-DPO: mean variance of the two responses. var (P, 2) -> (P,)."""
    return var.mean(dim=-1)


def borda_probabilities(policy_mu: torch.Tensor, policy_sigma: torch.Tensor, policy_ref: torch.Tensor,
                        other_mu: torch.Tensor, other_sigma: torch.Tensor, other_ref: torch.Tensor,
                        beta: float, gamma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Optimistic and pessimistic preference probabilities of the policy's samples over the reference's.

    policy_*: (P, m) for the policy samples a_i; other_*: (P, m) for the reference samples a'_j.
    mu/sigma are the policy's log-prob centre/spread, ref the reference log-prob (nats).
    Returns P+[i,j] = sigmoid(beta ((U(a_i) - ref(a_i)) - (L(a'_j) - ref(a'_j)))) and P- with U and L
    swapped, each (P, m, m), where U/L = mu +/- gamma sigma.
    """
    upper_a = policy_mu + gamma * policy_sigma - policy_ref
    lower_a = policy_mu - gamma * policy_sigma - policy_ref
    upper_b = other_mu + gamma * other_sigma - other_ref
    lower_b = other_mu - gamma * other_sigma - other_ref
    p_plus = torch.sigmoid(beta * (upper_a[:, :, None] - lower_b[:, None, :]))
    p_minus = torch.sigmoid(beta * (lower_a[:, :, None] - upper_b[:, None, :]))
    return p_plus, p_minus


def borda_bounds(*args, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Borda bounds b+ = mean_j P+[i,j] and b- = mean_j P-[i,j], each (P, m); arguments as borda_probabilities."""
    p_plus, p_minus = borda_probabilities(*args, **kwargs)
    return p_plus.mean(-1), p_minus.mean(-1)


def unsaturated_share(probabilities: torch.Tensor, margin: float = 0.05) -> float:
    """Share of preference probabilities inside (margin, 1 - margin): near 0, the Borda bounds are
    saturated (every comparison reads as certain) and the acquisition carries little signal."""
    return float(((probabilities > margin) & (probabilities < 1 - margin)).float().mean())


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two (N,) vectors (ties get their average rank); NaN when either is
    constant or N < 3."""
    def ranks(x):
        x = x.double()
        return (x[:, None] > x[None, :]).sum(1) + 0.5 * ((x[:, None] == x[None, :]).sum(1) - 1)
    if a.numel() < 3:
        return float("nan")
    ra, rb = ranks(a.flatten()), ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def borda_acquisition(b_plus: torch.Tensor, b_minus: torch.Tensor) -> torch.Tensor:
    """AE-Borda: max_i b+ - max_i b-. (P, m) each -> (P,)."""
    return b_plus.max(-1).values - b_minus.max(-1).values


def top_k(acquisition: torch.Tensor, k: int) -> List[int]:
    """Indices of the k largest values, ties broken by position (stable, so deterministic)."""
    order = sorted(range(len(acquisition)), key=lambda i: (-float(acquisition[i]), i))
    return order[:k]


# ----------------------------------------------------------------------------------------------
# Selectors: scores in, the kept candidates out

@dataclass
class Selection:
    """rows: kept candidates (pairs offline, prompts online), best first. responses (online): per kept
    prompt, (index of the policy sample, index of the reference sample) to send to the oracle.
    acquisition: (P,) value of every candidate, None for strategies that score nothing."""
    rows: List[int]
    responses: Optional[List[Tuple[int, int]]] = None
    acquisition: Optional[torch.Tensor] = None
    stats: Dict[str, float] = field(default_factory=dict)


def select_first(scores, n: int, want: int, config, rng: random.Random) -> Selection:
    """Uniform / Uniform-DPO: the first `want` of the n candidates of the seeded shuffle; online, the
    first policy sample against the first reference sample."""
    rows = list(range(min(want, n)))
    return Selection(rows, [(0, 0)] * len(rows) if config.online else None)


def select_us(scores, n: int, want: int, config, rng) -> Selection:
    """US-DPO: scores (P, 2); the pairs with the largest mean variance."""
    acquisition = us_acquisition(scores["sigma"] ** 2)
    return Selection(top_k(acquisition, want), acquisition=acquisition)


def select_ae(scores, n: int, want: int, config, rng) -> Selection:
    """AE-DPO: scores (P, 2); the pairs with the widest interval on the better response's implicit reward."""
    acquisition = ae_acquisition(scores["mu"], scores["sigma"], scores["ref"], float(config.active_beta))
    return Selection(top_k(acquisition, want), acquisition=acquisition)


def dpo_losses(mu: torch.Tensor, ref: torch.Tensor, first_is_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """The current DPO loss of each pair: mu, ref (P, 2) policy and reference log-probs of the two
    responses in scoring order, first_is_rejected (P,) bool (the labels). Returns (P,)."""
    margin = (mu[:, 0] - ref[:, 0]) - (mu[:, 1] - ref[:, 1])
    margin = torch.where(first_is_rejected, -margin, margin)
    return -torch.nn.functional.logsigmoid(beta * margin)


def select_headroom(scores, n: int, want: int, config, rng) -> Selection:
    """Headroom check, NOT deployable: reads the labels. The pairs with the largest current DPO loss
    (those the policy misranks most), to measure how much any selection could beat uniform."""
    acquisition = dpo_losses(scores["mu"], scores["ref"], scores["first_is_rejected"], float(config.loss.beta))
    return Selection(top_k(acquisition, want), acquisition=acquisition)


def expected_gradient_norm(mu: torch.Tensor, ref: torch.Tensor, psi: torch.Tensor, beta: float) -> torch.Tensor:
    """Expected length of a pair's DPO gradient with respect to a shift of the final hidden state, under the
    policy's own preference (label-blind). mu, ref (P, 2) log-probs of the two responses; psi (H, P, 2)
    their features (scoring.head_features). With h the implicit-reward logit of the first response and
    p = sigmoid(beta h), the gradient's length is beta (1 - p) |d| if the first wins and beta p |d| if it
    loses, d = psi_1 - psi_2; its expectation is 2 beta p (1 - p) |d|. Returns (P,)."""
    p = torch.sigmoid(beta * ((mu[:, 0] - ref[:, 0]) - (mu[:, 1] - ref[:, 1])))
    return 2 * beta * p * (1 - p) * (psi[..., 0] - psi[..., 1]).norm(dim=0)


def select_gradnorm(scores, n: int, want: int, config, rng) -> Selection:
    """Ablation: the pairs with the largest expected DPO gradient (expected_gradient_norm), i.e. the
    biggest updates, with no notion of what is still uncertain."""
    acquisition = expected_gradient_norm(scores["mu"], scores["ref"], scores["psi"], float(config.loss.beta))
    return Selection(top_k(acquisition, want), acquisition=acquisition)


def select_length(scores, n: int, want: int, config, rng) -> Selection:
    """Ablation: the pairs with the most response tokens (both responses together), scores['n_tokens'] (P, 2)."""
    acquisition = scores["n_tokens"].sum(-1)
    return Selection(top_k(acquisition, want), acquisition=acquisition)


def select_borda(scores, n: int, want: int, config, rng: random.Random) -> Selection:
    """AE-Borda: scores (P, 2m), the m policy samples first. Keeps the `want` prompts with the largest
    Borda gap; per prompt, the policy sample with the largest b+ against a uniformly drawn reference sample."""
    m = scores["mu"].shape[1] // 2
    mu, sigma, ref = scores["mu"], scores["sigma"], scores["ref"]
    p_plus, p_minus = borda_probabilities(mu[:, :m], sigma[:, :m], ref[:, :m], mu[:, m:], sigma[:, m:], ref[:, m:],
                                          beta=float(config.loss.beta), gamma=float(config.active_beta))
    b_plus, b_minus = p_plus.mean(-1), p_minus.mean(-1)
    acquisition = borda_acquisition(b_plus, b_minus)
    rows = top_k(acquisition, want)
    stats = {"selection/borda_unsaturated": unsaturated_share(torch.cat([p_plus.flatten(), p_minus.flatten()])),
             "selection/mean_b_plus": float(b_plus.mean()), "selection/mean_b_minus": float(b_minus.mean())}
    return Selection(rows, [(int(b_plus[i].argmax()), rng.randrange(m)) for i in rows], acquisition, stats)


@dataclass(frozen=True)
class Strategy:
    """select(scores, n, want, config, rng) -> Selection, where scores holds (n, columns) tensors mu,
    sigma, ref (whichever the strategy needs; empty when it needs none) for n candidates.
    mode: 'offline' (pairs from a labelled set) or 'online' (generated responses, oracle labels).
    needs_spread: reads the estimator's centre and spread of log pi (an MC estimator then needs mc_samples >= 2).
    needs_reference: reads reference log-probs. scores_pool: draws batch_size * selection_ratio
    candidates (False: exactly batch_size, the ratio has no effect). one_sample: online, one policy and
    one reference sample per prompt instead of num_action_samples. ratio_one: requires selection_ratio=1.
    needs_policy: reads the policy's deterministic log-probs 'mu' without a spread. uses_labels: reads
    the pool's labels ('first_is_rejected'), so it is a measuring stick, never a deployable selector;
    no other strategy is handed the labels. needs_features: reads the features 'psi' (scoring.head_features)
    and the policy's 'mu'. needs_lengths: reads only the response lengths 'n_tokens' (no model call)."""
    mode: str
    select: Callable[..., Selection]
    needs_spread: bool = False
    needs_policy: bool = False
    uses_labels: bool = False
    needs_reference: bool = False
    needs_features: bool = False
    needs_lengths: bool = False
    scores_pool: bool = True
    one_sample: bool = False
    ratio_one: bool = False


STRATEGIES: Dict[str, Strategy] = {
    "uniform": Strategy("offline", select_first, scores_pool=False),
    "us": Strategy("offline", select_us, needs_spread=True),
    "ae": Strategy("offline", select_ae, needs_spread=True, needs_reference=True),
    "gradnorm": Strategy("offline", select_gradnorm, needs_features=True, needs_reference=True),   # ablation
    "length": Strategy("offline", select_length, needs_lengths=True),                              # ablation
    "headroom": Strategy("offline", select_headroom, needs_policy=True, needs_reference=True, uses_labels=True),
    "uniref": Strategy("online", select_first, scores_pool=False, one_sample=True, ratio_one=True),
    "borda": Strategy("online", select_borda, needs_spread=True, needs_reference=True),
}


def scores_policy(strategy: Strategy) -> bool:
    return strategy.needs_spread or strategy.needs_policy or strategy.needs_features


def selection_view(scores: Dict[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """What the selector sees: the scores, per response token when config.length_normalize (log-probs,
    spreads and reference log-probs divided by each response's token count, so long responses are not
    favoured for their length alone). The raw reference log-probs still go to the DPO step."""
    if not config.length_normalize or "n_tokens" not in scores:
        return scores
    n = scores["n_tokens"].clamp(min=1)
    return {k: (v / n if k in ("mu", "sigma", "ref", "mu_halves", "sigma_halves") else v) for k, v in scores.items()}


def strategy_names(mode: str) -> List[str]:
    """The strategies of a mode, the default (baseline) first."""
    return [name for name, s in STRATEGIES.items() if s.mode == mode]


def selection_stats(selection: Selection, scores: Dict[str, torch.Tensor], n: int) -> Dict[str, float]:
    """Acquisition values of selected vs rejected candidates and the mean spread (wandb/metrics.jsonl)."""
    out = {}
    if selection.acquisition is not None:
        rejected = sorted(set(range(n)) - set(selection.rows))
        for name, idx in (("selected", selection.rows), ("rejected", rejected)):
            if idx:
                values = selection.acquisition[idx].float()
                out[f"acquisition/{name}_mean"] = float(values.mean())
                out[f"acquisition/{name}_min"] = float(values.min())
                out[f"acquisition/{name}_max"] = float(values.max())
    if "sigma" in scores:
        out["selection/mean_sigma"] = float(scores["sigma"].mean())
    if "sigma_prior" in scores:   # how far the posterior has moved from its prior on this pool
        out["selection/sigma_vs_prior"] = float(scores["sigma"].mean() / scores["sigma_prior"].mean().clamp(min=1e-30))
    out.update(selection.stats)
    return out


def split_half_spearman(strategy: Strategy, scores: Dict[str, torch.Tensor], n: int, want: int, config) -> Optional[float]:
    """How reproducible the acquisition ranking is: the Spearman correlation between the acquisitions
    computed from two independent half estimates of the policy's uncertainty (None when the estimator
    gives no halves). Its expectation for a strategy that ranks at random is 0; the full estimate's
    reliability is higher (Spearman-Brown: 2r / (1 + r))."""
    if "mu_halves" not in scores:
        return None
    acquisitions = []
    for h in (0, 1):
        half = dict(scores, mu=scores["mu_halves"][h], sigma=scores["sigma_halves"][h])
        acquisitions.append(strategy.select(half, n, want, config, random.Random(0)).acquisition)
    r = spearman(*acquisitions)
    return None if r != r else r


class ReliabilityLog:
    """Per-step split-half reliability of the selection: metrics for the step, a warning the first time
    the ranking is indistinguishable from random (r below two standard errors of a random ranking,
    2 / sqrt(n - 1)), and the run's mean for the summary."""

    def __init__(self):
        self.values: List[float] = []
        self.warned = False

    def step(self, r: Optional[float], n: int) -> Dict[str, float]:
        if r is None:
            return {}
        self.values.append(r)
        chance = 2 / math.sqrt(max(n - 1, 1))
        if r < chance and not self.warned:
            self.warned = True
            tqdm.write(f"WARNING: the acquisition ranking is indistinguishable from random (split-half Spearman {r:.2f} "
                       f"< {chance:.2f}, two standard errors of a random ranking of {n} candidates): selection is not "
                       "reproducible at these settings (mc_samples, llm_dropout, uncertainty_method)")
        return {"selection/split_half_spearman": r, "selection/reliability": 2 * r / (1 + r) if r > -1 else -1.0}

    def summary(self) -> Dict[str, float]:
        return {"selection_split_half_spearman": sum(self.values) / len(self.values)} if self.values else {}

    def state_dict(self) -> Dict:
        return {"reliability": list(self.values), "reliability_warned": self.warned}

    def load_state_dict(self, state: Dict) -> None:
        self.values, self.warned = list(state.get("reliability", [])), bool(state.get("reliability_warned", False))
