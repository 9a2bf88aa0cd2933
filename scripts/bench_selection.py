"""Offline selection must not waste forward passes: cost of scoring a candidate pool for AE-DPO.

Measured: wall time (s) to score one pool of P candidate pairs (2P sequences of prompt_len +
response_len tokens, cut from Anthropic-HH prompts and responses) for the AE acquisition, two ways,
same model, same pool, same minibatches of --selection-batch-size sequences:

  ours   scoring.score_sequences: per sequence one trunk pass, K dropout masks (rate p) on the
         final hidden state of the response positions only, each projected by the output head
         (scoring.mc_dropout_logps, method='head'), plus one reference pass (scoring.Reference.logps);
         log-probs are computed at response positions only, in chunks.
  naive  the authors' research code: K full network passes in train mode with dropout (rate p) on the
         final hidden state of every position (a hook on the output head), full-vocabulary logits
         log_softmax'ed at every position then gathered, plus a separate full-logits reference pass.

Here the reference network is the policy network itself (no LoRA): only the cost is compared.
Printed: each run's time, the median per method, naive / ours, and the agreement of the two:
at p=0 both are deterministic, so the MC mean mu and the reference log-prob ref (nats) must agree
to float32 rounding (~1e-3 nats on sums of hundreds of nats; checked on the first --check-pairs
pairs with K=2); at p>0 the timed runs' mean MC std sigma and mean AE acquisition must roughly
agree (they are random draws of the same distribution).
Target: naive / ours >= 2.5 with the defaults (SmolLM2-135M-Instruct, K=5, p=0.05, 24 pairs x
(128 + 128) tokens, CPU).

--calibrate prints instead the MC std sigma (nats) of log pi(response | prompt) for p in
{0.01, 0.02, 0.05, 0.1} (mean over the pool), to choose llm_dropout.

Timing: one warm-up of both methods on one minibatch, then the methods alternate (ours, naive, ours
for --repeats 3; --start-with naive gives naive, ours, naive), all in one process because this
machine's speed drifts over a process's first minutes; the median of each method's runs is reported.

Run (from the repository root):
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled .venv/bin/python scripts/bench_selection.py
    ... scripts/bench_selection.py --calibrate
    ... scripts/bench_selection.py --device cuda

The helpers above main() (config, fixed-length HH pairs, timing) are shared by bench_memory.py and
bench_step.py.
"""
import argparse
import contextlib
import os
import shlex
import statistics
import sys
import time
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HH_SAMPLE = os.path.join(os.path.dirname(ROOT), "shared", "data", "hh_sample.jsonl")  # ../shared/data beside the checkout
MODELS = ("tiny", "smollm2-135m")

Pair = Tuple[List[int], List[int], List[int]]  # prompt ids, chosen ids, rejected ids


# ----------------------------------------------------------------------------------------------
# Shared helpers

def command_line() -> str:
    """The exact command that ran this script, for the printed report."""
    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT)] + sys.argv)


def add_common_arguments(parser: argparse.ArgumentParser, default_model: str, pairs: int, seq_len: int,
                         pairs_help: str = "batch size (pairs)") -> None:
    """Flags every benchmark shares: device, model, data, cache, threads and the fixed batch shape."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=MODELS, default=default_model)
    parser.add_argument("--data", default=HH_SAMPLE, help="Anthropic-HH jsonl ({chosen, rejected} dialogues), read in place")
    parser.add_argument("--cache-dir", default=os.path.join(ROOT, ".cache"),
                        help="converted SmolLM2 and built tokenizers (the config's cache_dir)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads (1 is far steadier than 2 when other jobs share the cores)")
    parser.add_argument("--pairs", type=int, default=pairs, help=pairs_help)
    parser.add_argument("--prompt-len", type=int, default=seq_len, help="prompt tokens per sequence")
    parser.add_argument("--response-len", type=int, default=seq_len, help="response tokens per sequence")


def compose_config(args, *overrides: str):
    """The config `train.py model=... exp_name=bench OVERRIDES` would run with, reading HH from --data."""
    from hydra import compose, initialize_config_dir
    base = [f"model={args.model}", "exp_name=bench", "datasets=[hh]", f"dataset_files.hh={args.data}",
            f"cache_dir={args.cache_dir}"]
    with initialize_config_dir(config_dir=os.path.join(ROOT, "config"), version_base=None):
        return compose(config_name="config", overrides=base + list(overrides))


def load_tokenizer_and_model(config, quantize_4bit: bool = False):
    from models import load_model, load_tokenizer
    tokenizer = load_tokenizer(config)
    return tokenizer, load_model(config, tokenizer, config.model.policy_dtype, quantize_4bit=quantize_4bit)


def fixed_length_pairs(tokenizer, data_file: str, n_pairs: int, prompt_len: int, response_len: int) -> List[Pair]:
    """The first n_pairs HH preference pairs (train split, file order) long enough to be cut to exactly
    prompt_len prompt tokens (its last ones: the end of the dialogue, as keep_end truncation does) and
    response_len tokens of each response (their first ones). Exits with a message if there are too few."""
    from preference_datasets import get_dataset
    data = get_dataset("hh", "train", data_file=data_file, silent=True)
    pairs: List[Pair] = []
    for prompt, entry in data.items():
        for i, j in entry.pairs:
            ids = [tokenizer(text, add_special_tokens=False)["input_ids"]
                   for text in (prompt, entry.responses[i], entry.responses[j])]
            if len(ids[0]) >= prompt_len and min(len(ids[1]), len(ids[2])) >= response_len:
                pairs.append((ids[0][len(ids[0]) - prompt_len:], ids[1][:response_len], ids[2][:response_len]))
                if len(pairs) == n_pairs:
                    return pairs
    sys.exit(f"{data_file}: only {len(pairs)} pairs have >= {prompt_len} prompt and >= {response_len} response "
             f"tokens; {n_pairs} are needed (use shorter lengths or more data)")


def pair_element(pair: Pair) -> Dict[str, List[int]]:
    """A training element as preference_datasets.tokenize_element makes it (token fields only)."""
    prompt, chosen, rejected = pair
    element = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side, response in (("chosen", chosen), ("rejected", rejected)):
        element[f"{side}_input_ids"] = prompt + response
        element[f"{side}_attention_mask"] = [1] * (len(prompt) + len(response))
        element[f"{side}_labels"] = [-100] * len(prompt) + response
    return element


def full_logits_logps(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """The research code's log-probs: full-vocabulary logits at every position, log_softmax, gather
    the next tokens, sum over response positions (labels != -100). (B,) fp32."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    targets = labels[:, 1:].clone()
    mask = targets != -100
    targets[~mask] = 0
    per_token = torch.gather(logits[:, :-1].log_softmax(-1), dim=2, index=targets.unsqueeze(2)).squeeze(2)
    return (per_token * mask).sum(-1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def measure(device: torch.device, record: Dict[str, float]) -> Iterator[None]:
    """Wall time (s) of the block after the device is idle; on CUDA also its peak allocated memory (MiB)."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    record["seconds"] = time.perf_counter() - start
    if device.type == "cuda":
        record["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20


def alternate(names: Sequence[str], repeats: int, start_with: str) -> List[str]:
    """The run order A-B-A-... of two methods, `repeats` runs in all, starting with `start_with`."""
    first, second = (names[0], names[1]) if start_with == names[0] else (names[1], names[0])
    return [first if i % 2 == 0 else second for i in range(repeats)]


def fmt_runs(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


# ----------------------------------------------------------------------------------------------
# The two ways of scoring a pool

@contextlib.contextmanager
def head_dropout(model, p: float) -> Iterator[None]:
    """The research code's MC-dropout wrapper: dropout (rate p, always on) on the input of the output
    head, i.e. on the final hidden state of every position."""
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda module, inputs: (F.dropout(inputs[0], p=p, training=True),))
    try:
        yield
    finally:
        handle.remove()


def score_ours(model, sequences: List[Dict], k: int, p: float, batch_size: int, device, pad_token_id: int,
               generator: torch.Generator) -> Dict[str, torch.Tensor]:
    from omegaconf import OmegaConf
    from scoring import ESTIMATORS, Reference, score_sequences
    estimator = ESTIMATORS["head"](OmegaConf.create({"mc_samples": k, "llm_dropout": p}))
    return score_sequences(model, Reference(model, model), sequences, estimator=estimator, pad_token_id=pad_token_id,
                           batch_size=batch_size, device=device, generator=generator)


@torch.no_grad()
def score_naive(model, sequences: List[Dict], k: int, p: float, batch_size: int, device, pad_token_id: int
                ) -> Dict[str, torch.Tensor]:
    from preference_datasets import collate
    from scoring import mean_and_variance
    out = {"mu": [], "sigma": [], "ref": []}
    for start in range(0, len(sequences), batch_size):
        batch = collate(sequences[start:start + batch_size], pad_token_id)
        ids, mask, labels = (batch[key].to(device) for key in ("input_ids", "attention_mask", "labels"))
        model.train()
        with head_dropout(model, p):
            samples = torch.stack([full_logits_logps(model, ids, mask, labels) for _ in range(k)])
        model.eval()
        mu, var = mean_and_variance(samples)
        out["mu"].append(mu.cpu())
        out["sigma"].append(var.sqrt().cpu())
        out["ref"].append(full_logits_logps(model, ids, mask, labels).cpu())
    return {key: torch.cat(values) for key, values in out.items()}


def ae_values(scores: Dict[str, torch.Tensor], gamma: float) -> torch.Tensor:
    from strategies import ae_acquisition
    return ae_acquisition(scores["mu"].view(-1, 2), scores["sigma"].view(-1, 2), scores["ref"].view(-1, 2), gamma)


def pool_sequences(pairs: List[Pair]) -> List[Dict]:
    from data_selection import pair_sequences
    sequences, _ = pair_sequences([pair_element(pair) for pair in pairs])
    return sequences


# ----------------------------------------------------------------------------------------------

def calibrate(args, model, sequences, device, pad_token_id) -> None:
    print(f"\nMC std of log pi(response | prompt), K={args.k}, {len(sequences)} sequences of "
          f"{args.response_len} response tokens (mean over the pool), method=head")
    print(f"{'llm_dropout':>11} | {'mean sigma (nats)':>17} | {'median sigma':>12} | {'sigma / token':>13} | "
          f"{'mean AE acq (gamma=' + str(args.gamma) + ')':>24}")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for p in (0.01, 0.02, 0.05, 0.1):
        scores = score_ours(model, sequences, args.k, p, args.selection_batch_size, device, pad_token_id, generator)
        sigma = scores["sigma"]
        print(f"{p:>11} | {sigma.mean():17.4f} | {sigma.median():12.4f} | {sigma.mean() / args.response_len:13.5f} | "
              f"{ae_values(scores, args.gamma).mean():24.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_model="smollm2-135m", pairs=24, seq_len=128,
                         pairs_help="candidate pairs in the pool (2 sequences each)")
    parser.add_argument("--k", type=int, default=5, help="MC-dropout samples K")
    parser.add_argument("--p", type=float, default=0.05, help="dropout rate of the timed runs (llm_dropout)")
    parser.add_argument("--gamma", type=float, default=2.0, help="active_beta of the AE acquisition")
    parser.add_argument("--selection-batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs in all, methods alternating")
    parser.add_argument("--start-with", choices=("ours", "naive"), default="ours")
    parser.add_argument("--check-pairs", type=int, default=4, help="pairs of the deterministic (p=0, K=2) agreement check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibrate", action="store_true", help="print the MC std per llm_dropout instead of timing")
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats must be >= 2 (each method runs at least once)")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tokenizer, model = load_tokenizer_and_model(compose_config(args))
    model.to(device).eval()
    pairs = fixed_length_pairs(tokenizer, args.data, args.pairs, args.prompt_len, args.response_len)
    sequences = pool_sequences(pairs)
    pad = tokenizer.pad_token_id
    print(f"command: {command_line()}")
    print(f"model {args.model} on {args.device} ({torch.get_num_threads()} threads), pool {args.pairs} pairs = "
          f"{len(sequences)} sequences x ({args.prompt_len} + {args.response_len}) tokens, K={args.k}, "
          f"selection_batch_size={args.selection_batch_size}")
    if args.calibrate:
        calibrate(args, model, sequences, device, pad)
        return

    generator = torch.Generator(device=device).manual_seed(args.seed)
    methods: Dict[str, Callable[[List[Dict], int, float], Dict[str, torch.Tensor]]] = {
        "ours": lambda seqs, k, p: score_ours(model, seqs, k, p, args.selection_batch_size, device, pad, generator),
        "naive": lambda seqs, k, p: score_naive(model, seqs, k, p, args.selection_batch_size, device, pad),
    }
    warmup = sequences[:min(len(sequences), args.selection_batch_size)]
    for name, method in methods.items():
        method(warmup, args.k, args.p)

    runs: Dict[str, List[Dict[str, float]]] = {name: [] for name in methods}
    last_scores: Dict[str, Dict[str, torch.Tensor]] = {}
    for name in alternate(list(methods), args.repeats, args.start_with):
        record: Dict[str, float] = {}
        with measure(device, record):
            last_scores[name] = methods[name](sequences, args.k, args.p)
        runs[name].append(record)
        print(f"  run: {name:5s} {record['seconds']:8.2f} s", flush=True)

    check = sequences[:2 * args.check_pairs]
    exact = {name: method(check, 2, 0.0) for name, method in methods.items()}

    print(f"\n{'method':6} | {'runs (s)':24} | {'median (s)':>10} | {'sequences/s':>11}"
          + (f" | {'peak GPU MiB':>12}" if device.type == "cuda" else ""))
    medians = {}
    for name, records in runs.items():
        medians[name] = statistics.median(r["seconds"] for r in records)
        line = (f"{name:6} | {fmt_runs([r['seconds'] for r in records]):24} | {medians[name]:10.2f} | "
                f"{len(sequences) / medians[name]:11.2f}")
        if device.type == "cuda":
            line += f" | {max(r['peak_mib'] for r in records):12.0f}"
        print(line)
    ratio = medians["naive"] / medians["ours"]
    print(f"naive / ours = {ratio:.2f}x  (target >= 2.5x: {'MET' if ratio >= 2.5 else 'NOT MET'})")

    diff = {key: (exact["ours"][key] - exact["naive"][key]).abs().max().item() for key in ("mu", "ref")}
    scale = exact["naive"]["mu"].abs().mean().item()
    print(f"\nagreement at p=0 (deterministic), K=2, first {args.check_pairs} pairs: max |d mu| = {diff['mu']:.2e} nats, "
          f"max |d ref| = {diff['ref']:.2e} nats; relative to mean |mu| = {scale:.1f} nats: "
          f"{max(diff.values()) / scale:.1e} (float32 rounding; the AE/US acquisitions are 0 at p=0)")
    print(f"agreement at p={args.p}, K={args.k}, whole pool (random draws: close, not equal):")
    for name, scores in last_scores.items():
        print(f"  {name:5s}: mean sigma {scores['sigma'].mean():.4f}   mean mu {scores['mu'].mean():.3f}   "
              f"mean AE acquisition {ae_values(scores, args.gamma).mean():.4f}")


if __name__ == "__main__":
    main()
