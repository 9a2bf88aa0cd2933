"""Is the selection reproducible, and what does it cost? Every uncertainty estimator on one real pool.

Two pools, both with SmolLM2-135M-Instruct + LoRA at the first step (policy = reference):
  jeopardy  offline AE-DPO: the first --pairs candidate pairs (correct > abstain > wrong) of the
            J! Archive file, in the order a run with this seed would score them.
  haikus    online AE-Borda-DPO: --prompts haiku prompts of the demo, num_action_samples policy and
            reference answers each, generated once (seeded) and then scored by every estimator.

For each estimator setting, two independent draws (different generator seeds) of the whole pool are
scored through the run's own code path (data_selection.CandidateScorer, the strategy's select), and
printed: the Spearman correlation of the two acquisitions (1 = reproducible, 0 = random), the overlap
of the kept candidates (batch_size of the pool; chance = the kept share), the pool-scoring time
relative to the paper's `head` K=5 (timed before, between and after the others, in one process;
median), and for Borda the share of unsaturated preference probabilities.

Length: the Spearman correlation of the acquisition with the candidate's number of response tokens,
as selected and with length_normalize=true (computed from the same draws).

Ground truth (--truth-k masks of head dropout on the first --truth-sequences sequences): the
deterministic estimators are checked against the Monte Carlo variance they stand for: Spearman of
the spread, mean ratio, Spearman of the AE acquisition (both centred on the deterministic log-prob);
the truth's own split-half Spearman is its noise floor. `laplace` is checked against Monte Carlo from
its own posterior (--laplace-truth-draws shifts of the final hidden state, log pi recomputed exactly),
at the prior and after observing the rest of the pool.

Cost at matched reliability: the authors' formulation (K full passes in train mode with head
dropout and full-vocabulary logits, plus a full-logits reference pass; bench_selection.score_naive)
draws from the same distribution as `head` MC with the same K, so the K it needs for Spearman 0.9 is
read off the `head` K rows; its cost is timed at K=1 and K=3 between two baseline draws (as a multiple
of the baseline, so drift and other load cancel) and extrapolated to --authors-k.
--model tiny runs everything on a few-layer model, to check the script quickly (no figures).

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled .venv/bin/python scripts/bench_reliability.py --task jeopardy
    ... scripts/bench_reliability.py --task haikus
"""
import argparse
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data")

# name -> overrides of the run config; the first is the cost baseline
SETTINGS: Dict[str, List[str]] = {
    "paper: head K=5 p=0.05": ["uncertainty_method=head", "mc_samples=5", "llm_dropout=0.05"],
    "paper: full K=5 p=0.05": ["uncertainty_method=full", "mc_samples=5", "llm_dropout=0.05"],
    "head K=20 p=0.05": ["uncertainty_method=head", "mc_samples=20", "llm_dropout=0.05"],
    "head K=50 p=0.05": ["uncertainty_method=head", "mc_samples=50", "llm_dropout=0.05"],
    "head K=200 p=0.05": ["uncertainty_method=head", "mc_samples=200", "llm_dropout=0.05"],
    "head_analytic p=0.05": ["uncertainty_method=head_analytic", "llm_dropout=0.05"],
    "laplace": ["uncertainty_method=laplace"],
}


def task_overrides(task: str, args) -> List[str]:
    common = [f"model={args.model}", f"cache_dir={args.cache_dir}", f"seed={args.seed}", "exp_name=bench_reliability"]
    if args.model == "tiny":
        common += ["model.architecture.hidden_size=32", "model.architecture.intermediate_size=64",
                   "model.architecture.vocab_size=400"]
    if task == "jeopardy":
        return ["lora=true", "datasets=[jeopardy]",
                f"dataset_files.jeopardy={args.jeopardy_file or os.path.join(args.data_dir, 'jeopardy_clues.json')}", "loss=dpo",
                "loss.beta=0.1", "active=true", "selection_strategy=ae", "selection_ratio=3", "batch_size=8",
                "max_length=96", "max_prompt_length=80", *common]
    return ["experiment=demo", "num_action_samples=4", "selection_ratio=3", "batch_size=8", *common,
            *(["generation.max_new_tokens=8"] if args.model == "tiny" else [])]


def compose(overrides: List[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    with initialize_config_dir(config_dir=os.path.join(ROOT, "config"), version_base=None):
        return hydra_compose(config_name="config", overrides=overrides)


def build_pool(config, args) -> Tuple[object, object, object, List[Dict], int, int]:
    """(tokenizer, policy, reference, sequences, columns, kept) of the task's first pool."""
    from data_selection import build_source, load_run_data, pair_sequences
    from generation import sample_responses
    from models import build_models
    data = load_run_data(config)
    tokenizer, policy, reference = build_models(config, args.device, data["train"])
    source = build_source(config, data, policy, reference, tokenizer, args.device, tempfile.mkdtemp(), oracle=None)
    if config.active:
        pool = list(itertools.islice(source.make_elements(0), args.pairs))
        sequences, _ = pair_sequences(pool)
        return tokenizer, policy, reference, sequences, 2, len(pool) // 3
    m = int(config.num_action_samples)
    prompts = list(itertools.islice(source.prompts(0), args.prompts))
    prompt_ids = [source.tokens.prompt(name, prompt) for name, prompt, _ in prompts]
    torch.manual_seed(args.seed)
    policy_texts = sample_responses(policy, tokenizer, prompt_ids, m, config.generation, args.device)
    with reference.active() as model:
        reference_texts = sample_responses(model, tokenizer, prompt_ids, m, config.generation, args.device)
    sequences = [source.tokens.response(ids, text) for ids, pol, ref in zip(prompt_ids, policy_texts, reference_texts)
                 for text in list(pol) + list(ref)]
    return tokenizer, policy, reference, sequences, 2 * m, min(int(config.batch_size), len(prompts))


def score_once(config, overrides, policy, reference, tokenizer, sequences, columns, kept, seed, device):
    """(acquisition (P,), selected rows, stats, seconds, scores) of one independent draw."""
    from omegaconf import OmegaConf
    from data_selection import CandidateScorer
    from strategies import STRATEGIES, selection_view
    cfg = OmegaConf.merge(config, OmegaConf.from_dotlist(overrides))
    strategy = STRATEGIES[cfg.selection_strategy]
    scorer = CandidateScorer(strategy, policy, reference, cfg, tokenizer.pad_token_id, device, seed=seed)
    t0 = time.perf_counter()
    scores = scorer(sequences, columns=columns)
    seconds = time.perf_counter() - t0
    n = len(sequences) // columns
    selection = strategy.select(selection_view(scores, cfg), n, kept, cfg, random.Random(0))
    per_token = OmegaConf.merge(cfg, {"length_normalize": True})
    normalised = strategy.select(selection_view(scores, per_token), n, kept, per_token, random.Random(0))
    return selection.acquisition, selection.rows, selection.stats, seconds, scores, normalised.acquisition


def ground_truth(policy, tokenizer, sequences, columns, args, gamma):
    """Head-dropout Monte Carlo (--truth-k masks) against the closed form, on the first sequences."""
    from strategies import ae_acquisition, spearman
    from preference_datasets import collate
    from scoring import analytic_head_dropout, mc_dropout_samples
    n = max(1, args.truth_sequences // columns) * columns
    batch = collate(sequences[:n], tokenizer.pad_token_id)
    ids, mask, labels = (batch[k].to(args.device) for k in ("input_ids", "attention_mask", "labels"))
    generator = torch.Generator(device=args.device).manual_seed(12345)
    t0 = time.perf_counter()
    draws = torch.cat([mc_dropout_samples(policy, ids, mask, labels, k=250, p=args.p, generator=generator)
                       for _ in range(max(1, args.truth_k // 250))])
    truth_seconds = time.perf_counter() - t0
    k = draws.shape[0]
    var = draws.var(0)
    half = spearman(draws[:k // 2].var(0), draws[k // 2:].var(0))
    print(f"\nGround truth: head dropout p={args.p}, {k} Monte Carlo masks on {n} sequences ({truth_seconds:.0f} s); "
          f"its own split-half Spearman of the variance ({k // 2} vs {k // 2} masks): {half:.3f}")
    print("| closed form | Spearman of spread vs truth | mean ratio var / truth | Spearman of AE acquisition |")
    print("|---|---|---|---|")
    for dims in (0, 2, 4, 8, 32):
        moments = analytic_head_dropout(policy, ids, mask, labels, p=args.p, exact_dims=dims)
        mu = moments["logp"]
        row = [spearman(moments["var"], var), float((moments["var"] / var).mean())]
        if columns == 2:
            view = lambda v: v.view(-1, 2)  # noqa: E731
            row.append(spearman(ae_acquisition(view(mu), view(moments["var"].sqrt()), view(mu), gamma),
                                ae_acquisition(view(mu), view(var.sqrt()), view(mu), gamma)))
        else:
            row.append(float("nan"))
        label = "first order only" if dims == 0 else f"{dims} exact dims per token"
        print(f"| {label} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f} |")
    print(f"(mean of the draws minus the deterministic log-prob: {float((draws.mean(0) - mu).mean()):.3f} nats, "
          f"{float(((draws.mean(0) - mu) / var.sqrt()).mean()):.2f} sigma)")


def laplace_ground_truth(config, policy, tokenizer, sequences, columns, args, gamma):
    """`laplace` against Monte Carlo from its own posterior: shifts u ~ N(0, Sigma) of the final hidden
    state, log pi recomputed through the head for each (no linearisation), on the first sequences; first
    at the prior (the first step), then after the posterior has observed the rest of the pool as pairs of
    consecutive sequences (jeopardy: its candidate pairs; haikus: two answers of one model to one prompt)."""
    from strategies import ae_acquisition, spearman
    from preference_datasets import collate
    from scoring import _response_hidden, _sum_per_row, laplace_estimator, token_logps
    n = max(1, args.truth_sequences // columns) * columns
    estimator = laplace_estimator(config)

    def tensors(part):
        batch = collate(part, tokenizer.pad_token_id)
        return [batch[k].to(args.device) for k in ("input_ids", "attention_mask", "labels")]
    ids, mask, labels = tensors(sequences[:n])
    with torch.no_grad():
        hidden, targets, rows, head, transform = _response_hidden(policy.eval(), ids, mask, labels)
    generator = torch.Generator(device=args.device).manual_seed(54321)
    print(f"\nGround truth for laplace (laplace_prior={estimator.prior}): {args.laplace_truth_draws} posterior "
          f"shifts of the final hidden state on {n} sequences, log pi recomputed exactly for each")
    print("| posterior | prior std | Spearman of spread vs truth | mean ratio sigma / truth | "
          "Spearman of AE acquisition | mean of draws - log pi (sigma) |")
    print("|---|---|---|---|---|---|")
    for stage in ("prior (first step)", "after the rest of the pool"):
        if stage != "prior (first step)":
            rest = sequences[n:n + 2 * ((len(sequences) - n) // 2)]
            for start in range(0, len(rest), 2 * args.selection_batch_size):
                psi = estimator(policy, *tensors(rest[start:start + 2 * args.selection_batch_size]))["psi"].T
                estimator.observe(psi[0::2], psi[1::2])
        scores = estimator(policy, ids, mask, labels)
        root = torch.linalg.cholesky(estimator.covariance()).float()
        t0 = time.perf_counter()
        draws = []
        with torch.no_grad():
            for _ in range(args.laplace_truth_draws):
                u = root @ torch.randn(root.shape[0], generator=generator, device=args.device)
                shifted = (hidden.float() + u).to(hidden.dtype)
                draws.append(_sum_per_row(token_logps(shifted, head, targets, None, transform), rows, n))
        draws = torch.stack(draws)
        truth = draws.std(0)
        row = [spearman(scores["sigma"], truth), float((scores["sigma"] / truth).mean())]
        if columns == 2:
            view = lambda v: v.view(-1, 2)  # noqa: E731
            mu = scores["mu"]
            row.append(spearman(ae_acquisition(view(mu), view(scores["sigma"]), view(mu), gamma),
                                ae_acquisition(view(mu), view(truth), view(mu), gamma)))
        else:
            row.append(float("nan"))
        bias = float(((draws.mean(0) - scores["mu"]) / truth).mean())
        print(f"| {stage} | {estimator.prior_std:.3g} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f} | {bias:.2f} |  "
              f"({time.perf_counter() - t0:.0f} s)")


def naive_pass_cost(config, policy, reference, tokenizer, sequences, columns, kept, args) -> Tuple[float, float]:
    """The authors' formulation on the pool, timed between two draws of the baseline (`head` K=5) in the
    same process: (cost at K=1 incl. its reference pass, cost per further pass), in baseline draws."""
    from scripts.bench_selection import score_naive
    baseline = SETTINGS[next(iter(SETTINGS))]
    times = {}
    for step in ("base", 1, 3, "base"):
        t0 = time.perf_counter()
        if step == "base":
            score_once(config, baseline, policy, reference, tokenizer, sequences, columns, kept, 0, args.device)
        else:
            score_naive(policy, sequences, step, args.p, args.selection_batch_size, args.device, tokenizer.pad_token_id)
        times.setdefault(step, []).append(time.perf_counter() - t0)
    base = statistics.mean(times["base"])
    return times[1][0] / base, (times[3][0] - times[1][0]) / 2 / base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("jeopardy", "haikus"), default="jeopardy")
    parser.add_argument("--model", choices=("smollm2-135m", "tiny"), default="smollm2-135m",
                        help="tiny: a few-layer model for a quick check of the script, not for figures")
    parser.add_argument("--jeopardy-file", help="J! Archive JSON (default: <data-dir>/jeopardy_clues.json)")
    parser.add_argument("--pairs", type=int, default=96, help="jeopardy: candidate pairs in the pool")
    parser.add_argument("--prompts", type=int, default=24, help="haikus: prompts in the pool")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), help="names of SETTINGS to run")
    parser.add_argument("--truth-k", type=int, default=2000)
    parser.add_argument("--truth-sequences", type=int, default=48)
    parser.add_argument("--laplace-truth-draws", type=int, default=500,
                        help="posterior draws of the laplace ground truth (0: skip)")
    parser.add_argument("--p", type=float, default=0.05, help="dropout rate of the ground truth and the naive timing")
    parser.add_argument("--selection-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=DATA_DIR)
    parser.add_argument("--cache-dir", default=os.path.join(ROOT, ".cache"))
    parser.add_argument("--authors-k", type=int, nargs="*", default=[5, 50, 200],
                        help="K at which to report the authors' formulation's cost")
    parser.add_argument("--skip-authors", action="store_true", help="do not time the authors' formulation")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every setting, e.g. length_normalize=true")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when the output goes to a file
    torch.set_num_threads(args.threads)
    from strategies import spearman

    config = compose(task_overrides(args.task, args) + list(args.extra))
    tokenizer, policy, reference, sequences, columns, kept = build_pool(config, args)
    n = len(sequences) // columns
    tokens = [sum(1 for t in s["labels"] if t != -100) for s in sequences]
    print(f"\n{args.task}: pool of {n} candidates x {columns} responses ({len(sequences)} sequences, "
          f"{statistics.mean(tokens):.1f} response tokens on average), {kept} kept; {args.threads} threads; "
          f"extra overrides {args.extra or 'none'}")

    baseline = args.settings[0]
    order = [baseline] + [s for name in args.settings[1:] for s in (name, baseline)]
    results: Dict[str, List] = {}
    score_once(config, SETTINGS[baseline], policy, reference, tokenizer, sequences[:2 * columns], columns, 1, 0, args.device)  # warm-up
    for i, name in enumerate(order):
        draws = [score_once(config, SETTINGS[name], policy, reference, tokenizer, sequences, columns, kept,
                            seed=1000 * i + d, device=args.device) for d in (1, 2)]
        results.setdefault(name, []).append(draws)
        print(f"  {name}: draws of {draws[0][3]:.2f} s and {draws[1][3]:.2f} s", flush=True)
    base_time = statistics.median(d[3] for runs in results[baseline] for d in runs)

    print(f"\n| estimator | Spearman between draws | kept overlap (chance {kept / n:.2f}) | pool time (s) | x paper head K=5 | extra |")
    print("|---|---|---|---|---|---|")
    reliability = {}
    length_rows = []
    lengths = torch.tensor(tokens, dtype=torch.float).view(-1, columns).sum(-1)
    for name in args.settings:
        runs = results[name]
        rhos = [spearman(a[0], b[0]) for a, b in runs]
        overlaps = [len(set(a[1]) & set(b[1])) / kept for a, b in runs]
        seconds = statistics.median(d[3] for pair in runs for d in pair)
        stats = runs[0][0][2]
        extra = ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in stats.items())
        spread = runs[0][0][4]["sigma"]
        extra = (extra + ", " if extra else "") + f"mean sigma {float(spread.mean()):.3f}"
        rho = statistics.mean(rhos)
        reliability[name] = rho
        print(f"| {name} | {rho:.3f} | {statistics.mean(overlaps):.2f} | {seconds:.2f} | {seconds / base_time:.2f} | {extra} |")
        length_rows.append((name, spearman(runs[0][0][0], lengths), spearman(runs[0][0][5], lengths),
                            statistics.mean(spearman(a[5], b[5]) for a, b in runs)))
    print("\nLength: Spearman of the acquisition with the candidate's response tokens (summed over its responses), "
          "as selected and with length_normalize=true (per-token scores)")
    print("| estimator | with length, raw | with length, per token | per token: Spearman between draws |")
    print("|---|---|---|---|")
    for name, raw, normalised, rho in length_rows:
        print(f"| {name} | {raw:.3f} | {normalised:.3f} | {rho:.3f} |")

    gamma = float(config.active_beta)
    if args.truth_k > 0:
        ground_truth(policy, tokenizer, sequences, columns, args, gamma)
    if args.laplace_truth_draws > 0 and "laplace" in args.settings:
        laplace_ground_truth(config, policy, tokenizer, sequences, columns, args, gamma)

    if args.skip_authors:
        return
    first, per_pass = naive_pass_cost(config, policy, reference, tokenizer, sequences, columns, kept, args)
    head_k = sorted((int(SETTINGS[s][1].split("=")[1]), reliability[s]) for s in args.settings
                    if SETTINGS[s][0] == "uncertainty_method=head")
    print(f"\nAuthors' formulation (K full passes with full-vocabulary logits + a reference pass), timed between two "
          f"`{baseline}` draws: {first:.2f} draws at K=1, {per_pass:.2f} per further pass.")
    print("head MC reliability by K (the same distribution as the authors' K passes): "
          + ", ".join(f"K={k}: {rho:.3f}" for k, rho in head_k))
    for k in args.authors_k:
        cost = first + (k - 1) * per_pass
        print(f"  authors' K={k}: {cost:.1f} x the baseline draw ({cost * base_time:.0f} s at this run's baseline); "
              + ", ".join(f"{cost / (statistics.median(d[3] for pair in results[n] for d in pair) / base_time):.0f}x {n}"
                          for n in args.settings if SETTINGS[n][0].split("=")[1] in ("head_analytic", "laplace")))

if __name__ == "__main__":
    main()
