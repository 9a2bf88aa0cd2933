"""The batch sources that feed the trainer: plain data, offline active selection (score a pool of
labelled pairs without their labels, keep what the strategy picks), and the online generate -> score
-> select -> label -> batch loop; plus the candidate scorer and the wiring from the config.

Scores come from scoring.score_sequences (one call for every selector: the policy's centre and spread
from the configured estimator, one reference pass), and the reference log-probs computed there are
handed to the DPO step so it never recomputes them. What to keep is decided in strategies.py.
"""
import copy
import itertools
import os
import random
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm

import distributed
from generation import CandidatesJournal, Generator, PromptTokens, journal_path
from oracles.base import Query
from oracles.ledger import LEDGER_FILENAME, Ledger, judge_with_budget
from utils import RunPaused
from preference_datasets import (Datasets, collate, iterate_elements, iterate_prompts, load_datasets, pair_element,
                                 truncation_mode_for, unlabelled_files)
from scoring import ESTIMATORS, RowSeeds, SamplingStates, head_features, policy_logps, score_sequences
from strategies import (STRATEGIES, ReliabilityLog, Strategy, scores_policy, selection_stats, selection_view,
                        split_half_spearman)

# ----------------------------------------------------------------------------------------------
# Scoring candidates (model calls)

def pair_sequences(elements: List[Dict]) -> Tuple[List[Dict], List[bool]]:
    """Flatten pairs into sequences [e0.first, e0.second, e1.first, ...] for scoring, where the two
    responses of a pair are put in a canonical order (by token ids), not in label order: the selector
    cannot learn which one was preferred, not even through which dropout mask met which response.
    Returns the sequences and, per pair, whether 'first' is the rejected response."""
    seqs, flipped = [], []
    for e in elements:
        flip = e["rejected_input_ids"] < e["chosen_input_ids"]
        flipped.append(flip)
        for side in (("rejected", "chosen") if flip else ("chosen", "rejected")):
            seqs.append({"input_ids": e[f"{side}_input_ids"], "attention_mask": e[f"{side}_attention_mask"],
                         "labels": e[f"{side}_labels"]})
    return seqs, flipped


def candidate_seed(base: int, index: int) -> int:
    """The dropout seed of the candidate at `index` of a pool scored under the call seed `base`."""
    return random.Random(f"{base}|{index}").getrandbits(62)


def swap_responses(element: Dict) -> None:
    """Exchange the chosen and rejected sides of a pair element (texts, token ids, reference log-probs)."""
    for suffix in ("", "_input_ids", "_attention_mask", "_labels"):
        element[f"chosen{suffix}"], element[f"rejected{suffix}"] = element[f"rejected{suffix}"], element[f"chosen{suffix}"]
    if "reference_chosen_logps" in element:
        element["reference_chosen_logps"], element["reference_rejected_logps"] = (
            element["reference_rejected_logps"], element["reference_chosen_logps"])


def response_lengths(sequences: List[Dict]) -> torch.Tensor:
    """Response tokens (labels other than -100) of each sequence, (S,) float, as score_sequences counts them."""
    return torch.tensor([sum(1 for t in seq["labels"][1:] if t != -100) for seq in sequences], dtype=torch.float32)


class CandidateScorer:
    """Scores candidate sequences for one strategy: the estimator's centre/spread under the policy when
    the strategy reads them, the reference log-prob when it reads that. Owns the seeded generator of
    the estimator's randomness (saved with checkpoints) and warns once when every spread is zero."""

    def __init__(self, strategy: Strategy, policy, reference, config, pad_token_id: int, device, seed: int):
        self.strategy, self.policy, self.reference, self.config = strategy, policy, reference, config
        self.pad_token_id, self.device = pad_token_id, device
        self.estimator = (ESTIMATORS[config.uncertainty_method](config) if strategy.needs_spread
                          else head_features if strategy.needs_features
                          else policy_logps if strategy.needs_policy else None)
        # an estimator that fits its prior to the labels bought reads the policy's implicit reward of each pair
        self.needs_reference = strategy.needs_reference or bool(getattr(self.estimator, "prior", None) == "evidence")
        # the same on every rank: each call draws one seed from it, and each candidate its masks from
        # that seed and its index in the pool, so the chosen pairs do not depend on the world size
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.warned_zero_spread = False
        # one process only: grouping by prompt gives each rank its own number of forward calls (under
        # FSDP each is a collective), and 2-rank gloo runs aborted at exit in 2 of 8 tries with it
        # (scripts/bench_online.py also turns it off, to time the path without it)
        self.share_prompts = distributed.world_size() == 1

    def __call__(self, sequences: List[Dict], columns: int, states: Optional[SamplingStates] = None) -> Dict[str, torch.Tensor]:
        """Scores of `sequences` viewed as (len // columns, columns) per key. Under torchrun each rank
        scores its share of the sequences and every rank gets all the scores. states: what sampling them
        kept (one process), read instead of computed."""
        share, real = distributed.sharded(sequences)
        base = int(torch.randint(0, 2 ** 62, (1,), generator=self.generator, device=self.generator.device))
        first = distributed.rank() * len(share)          # the pool index of this rank's first sequence
        seeds = RowSeeds([candidate_seed(base, first + i) for i in range(len(share))])
        scores = score_sequences(self.policy, self.reference if self.needs_reference else None, share,
                                 estimator=self.estimator, pad_token_id=self.pad_token_id,
                                 batch_size=int(self.config.selection_batch_size), device=self.device,
                                 generator=seeds, share_prompts=self.share_prompts,
                                 states=states if self.share_prompts else None)
        scores = distributed.gathered_tensors({k: v[..., :real] for k, v in scores.items()})
        scores = {k: v.view(*v.shape[:-1], -1, columns) for k, v in scores.items()}
        if "sigma" in scores and not self.warned_zero_spread and float(scores["sigma"].abs().max()) == 0.0:
            self.warned_zero_spread = True
            tqdm.write("WARNING: every uncertainty spread is zero (no dropout active: llm_dropout=0 and "
                       "uncertainty_method=head?); the acquisition ranks ties, i.e. selection is not active.")
        return scores

    def observe(self, scores: Dict[str, torch.Tensor], pairs: List[Tuple[int, int, int]], first_won: List[bool]) -> None:
        """Tell an estimator that learns from bought labels (laplace) which pairs were bought: (row, column
        of one response, column of the other) into the scores' (P, columns) view, and whether the first of
        the two won. It reads their features and, to fit its prior (laplace_prior=evidence), the policy's
        implicit-reward margin of each pair and its label: only ever of pairs already bought."""
        if pairs and hasattr(self.estimator, "observe") and "psi" in scores:
            psi = scores["psi"]                                   # (H, P, columns)
            reward = scores["mu"] - scores["ref"] if "ref" in scores else scores["mu"]
            self.estimator.observe(torch.stack([psi[:, r, a] for r, a, _ in pairs]),
                                   torch.stack([psi[:, r, b] for r, _, b in pairs]),
                                   margins=torch.stack([reward[r, a] - reward[r, b] for r, a, b in pairs]),
                                   first_won=torch.tensor(first_won, dtype=torch.bool))

    def stats(self) -> Dict[str, float]:
        """The estimator's own per-step figures (laplace: its current prior std and the pairs it has seen)."""
        return self.estimator.stats() if hasattr(self.estimator, "stats") else {}

    def state_dict(self) -> Dict:
        state = {"generator": self.generator.get_state()}
        if hasattr(self.estimator, "state_dict"):
            state.update(self.estimator.state_dict())
        return state

    def load_state_dict(self, state: Dict) -> None:
        self.generator.set_state(state["generator"])
        if hasattr(self.estimator, "load_state_dict"):
            self.estimator.load_state_dict(state)



def judged_on_main(oracle, queries: List[Query], ledger: Optional[Ledger], max_queries) -> List:
    """Rank 0 alone pays for labels and writes the ledger; every rank gets its verdicts, and every rank
    raises RunPaused when the oracle paused the run (a labelling round waits for people)."""
    result = None
    if distributed.is_main():
        try:
            result = judge_with_budget(oracle, queries, ledger, max_queries)
        except RunPaused as paused:
            result = paused
    distributed.after_main("oracle")
    result = distributed.broadcast(result)
    if isinstance(result, RunPaused):
        raise result
    return result


class StepStart:
    """The state a source had when its current step began, for a checkpoint taken while the step waits
    on an oracle that paused the run (taken only for such oracles: it copies the estimator state)."""

    def __init__(self, source, oracle):
        self.source, self.enabled, self.state = source, bool(oracle is not None and oracle.pauses_run), None

    def begin(self) -> None:
        if self.enabled:
            self.state = None     # the source's state_dict answers with this snapshot while one is held
            self.state = copy.deepcopy(self.source.state_dict())

    def end(self) -> None:
        self.state = None


# ----------------------------------------------------------------------------------------------
# Batch sources: iterators of (collated batch, info) with a resumable position

class PlainSource:
    """Every element in data order, `batch_size` at a time (SFT, plain DPO)."""

    def __init__(self, make_elements: Callable[[int], Iterator[Dict]], config, pad_token_id: int):
        self.make_elements, self.config, self.pad_token_id = make_elements, config, pad_token_id
        self.consumed = 0

    def __iter__(self):
        elements = self.make_elements(self.consumed)
        while True:
            batch = list(itertools.islice(elements, int(self.config.batch_size)))
            if not batch:
                return
            self.consumed += len(batch)
            yield collate(batch, self.pad_token_id), {"labels": len(batch)}

    def progress(self) -> Dict:
        return {}

    def summary(self) -> Dict:
        return {}

    def state_dict(self) -> Dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: Dict) -> None:
        self.consumed = state["consumed"]


class OfflineActiveSource:
    """Each step: a pool of batch_size * selection_ratio candidate pairs from the non-SFT share,
    scored without their labels; the strategy keeps batch_size of them for the DPO batch.
    `n_examples` counts the selected pairs (labels used), not candidates scored.

    With an oracle (an unlabelled pool: elements marked 'unlabelled', response_a/response_b in the
    chosen/rejected keys) the selected pairs are labelled by it, as online: rank 0 asks, through the
    ledger and the budget, and every rank orients each pair by the verdict; pairs it could not label
    are dropped and counted, and `n_examples` counts labels bought."""

    def __init__(self, make_elements, strategy: Strategy, scorer: CandidateScorer, config, pad_token_id,
                 oracle=None, ledger: Optional[Ledger] = None):
        self.make_elements, self.strategy, self.scorer = make_elements, strategy, scorer
        self.config, self.pad_token_id = config, pad_token_id
        self.oracle, self.ledger = oracle, ledger
        self.step_start = StepStart(self, oracle)
        self.consumed = self.labels = self.scored = self.failures = 0
        self.warned_short_pool = False
        self.rng = random.Random(int(config.seed) + 2)
        self.reliability = ReliabilityLog()

    def __iter__(self):
        cfg = self.config
        elements = self.make_elements(self.consumed)
        batch_size = int(cfg.batch_size)
        pool_size = batch_size * int(cfg.selection_ratio) if self.strategy.scores_pool else batch_size
        budget = cfg.n_examples
        while budget is None or self.labels < budget:
            want = batch_size if budget is None else min(batch_size, budget - self.labels)
            self.step_start.begin()
            pool = list(itertools.islice(elements, pool_size))
            if not pool:
                return
            self.consumed += len(pool)
            if len(pool) < want and not self.warned_short_pool:
                self.warned_short_pool = True
                tqdm.write(f"data exhausted: the last pool has {len(pool)} candidates (< batch_size={want}); "
                           "training one last step on all of them")
            t0 = time.time()
            scores: Dict[str, torch.Tensor] = {}
            flipped: List[bool] = []
            if scores_policy(self.strategy) or self.strategy.needs_reference:
                sequences, flipped = pair_sequences(pool)
                scores = self.scorer(sequences, columns=2)
                self.scored += len(pool)
            elif self.strategy.needs_lengths:
                sequences, flipped = pair_sequences(pool)
                scores = {"n_tokens": response_lengths(sequences).view(-1, 2)}
            view = selection_view(scores, cfg)
            if self.strategy.uses_labels:
                view = dict(view, first_is_rejected=torch.tensor(flipped, dtype=torch.bool))
            selection = self.strategy.select(view, len(pool), want, cfg, self.rng)
            if "ref" in scores:
                for i in selection.rows:
                    first, second = float(scores["ref"][i, 0]), float(scores["ref"][i, 1])
                    pool[i]["reference_chosen_logps"], pool[i]["reference_rejected_logps"] = (
                        (second, first) if flipped[i] else (first, second))
            rows, swapped, budget_spent = list(selection.rows), set(), False
            if self.oracle is not None:
                rows, swapped, budget_spent = self._buy_labels(pool, rows)
            if flipped:   # whether each kept pair's canonical first response is the preferred one
                self.scorer.observe(scores, [(i, 0, 1) for i in rows], [(not flipped[i]) != (i in swapped) for i in rows])
            selected = [pool[i] for i in rows]
            self.labels += len(selected)
            info = {**selection_stats(selection, view, len(pool)), **self.scorer.stats()}
            info.update(self.reliability.step(split_half_spearman(self.strategy, view, len(pool), want, cfg), len(pool)))
            if self.strategy.uses_labels:
                info["selection/uses_labels"] = 1.0
            info.update({"labels": len(selected), "selection/time_s": time.time() - t0,
                         "counters/candidates_scored": self.scored, "counters/labels_used": self.labels})
            if self.oracle is not None:
                info.update({"counters/labels_bought": self.labels, "counters/oracle_failures": self.failures})
            self.step_start.end()
            if selected:
                yield collate(selected, self.pad_token_id), info
            if budget_spent:
                tqdm.write(f"oracle budget oracle.max_queries={cfg.oracle.max_queries} spent; stopping")
                return

    def _buy_labels(self, pool: List[Dict], rows: List[int]) -> Tuple[List[int], set, bool]:
        """Ask the oracle about the selected unlabelled pairs (response_a first) and orient each by its
        verdict (the winner becomes 'chosen'); returns the rows it labelled, those where response_b won
        (swapped), and whether the budget ran out."""
        queries = [Query(prompt=pool[i]["source_prompt"], response_a=pool[i]["chosen"], response_b=pool[i]["rejected"],
                         reference=pool[i]["reference"], keywords=pool[i]["keywords"]) for i in rows]
        judgments = judged_on_main(self.oracle, queries, self.ledger, self.config.oracle.get("max_queries"))
        kept, swapped, budget_spent = [], set(), False
        for i, judgment in zip(rows, judgments):
            if judgment.winner is None:
                self.failures += 1
                budget_spent |= judgment.error == "budget"
                continue
            if judgment.winner == "B":
                swap_responses(pool[i])
                swapped.add(i)
            pool[i]["unlabelled"] = False
            kept.append(i)
        return kept, swapped, budget_spent

    def progress(self) -> Dict:
        return {"labels": self.labels, "scored": self.scored, **({"failed": self.failures} if self.oracle else {})}

    def summary(self) -> Dict:
        return {**self.progress(), **self.reliability.summary(),
                **({"selection_uses_labels": True} if self.strategy.uses_labels else {})}

    def state_dict(self) -> Dict:
        if self.step_start.state is not None:
            return self.step_start.state
        return {"consumed": self.consumed, "labels": self.labels, "scored": self.scored, "failures": self.failures,
                "rng": list(self.rng.getstate()[1]), "rng_pos": self.rng.getstate()[2], **self.scorer.state_dict(),
                **self.reliability.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        self.consumed, self.labels, self.scored = state["consumed"], state["labels"], state["scored"]
        self.failures = state.get("failures", 0)   # checkpoints from before unlabelled pools
        self.rng.setstate((3, tuple(state["rng"]), state["rng_pos"]))
        self.scorer.load_state_dict(state)
        self.reliability.load_state_dict(state)


class OnlineSource:
    """Each step: generate -> score -> select -> label -> batch. batch_size * selection_ratio prompts;
    m policy and m reference samples each (tokenised once); the strategy keeps batch_size prompts and
    one (policy, reference) pair per prompt; the oracle labels the pairs; pairs it could not label
    are dropped and counted. `n_examples` counts labels bought. Under torchrun the ranks share the
    generation and the scoring; rank 0 asks the oracle (ledger: None on the other ranks). The journal
    keeps each step's samples, so a resumed run replays the steps it repeats."""

    def __init__(self, prompts: Callable[[int], Iterator], strategy: Strategy, scorer: CandidateScorer,
                 generator: Generator, tokens: PromptTokens, config, device, oracle, ledger: Ledger,
                 journal: CandidatesJournal):
        self.prompts, self.strategy, self.scorer, self.generator = prompts, strategy, scorer, generator
        self.tokens, self.config, self.device = tokens, config, device
        self.oracle, self.ledger, self.journal = oracle, ledger, journal
        self.step_start = StepStart(self, oracle)
        self.consumed = self.labels = self.failures = self.scored = self.steps = 0
        self.rng = random.Random(int(config.seed) + 2)
        self.reliability = ReliabilityLog()

    def __iter__(self):
        cfg = self.config
        prompts = self.prompts(self.consumed)
        batch_size = int(cfg.batch_size)
        budget = cfg.n_examples
        m = 1 if self.strategy.one_sample else int(cfg.num_action_samples)
        tokenizer = self.tokens.tokenizer
        while budget is None or self.labels < budget:
            want = batch_size if budget is None else min(batch_size, budget - self.labels)
            self.step_start.begin()
            pool = list(itertools.islice(prompts, want * int(cfg.selection_ratio)))
            if not pool:
                return
            self.consumed += len(pool)
            times: Dict[str, float] = {}

            t0 = time.time()
            start = self.consumed - len(pool)
            prompt_ids = [self.tokens.prompt(name, prompt) for name, prompt, _ in pool]
            replay = self.journal.lookup(start, m)
            if replay is None:
                policy_texts, reference_texts = self.generator.sample(prompt_ids, m, start, step=self.steps)
                self.journal.record(start, m, policy_texts, reference_texts)
            else:
                policy_texts, reference_texts = replay
            # candidates[p][c]: (text, sequence); columns 0..m-1 the policy's samples, m..2m-1 the reference's
            candidates = [[(text, self.tokens.response(ids, text)) for text in list(pol) + list(ref)]
                          for ids, pol, ref in zip(prompt_ids, policy_texts, reference_texts)]
            times["time/generation_s"] = time.time() - t0

            t0 = time.time()
            scores: Dict[str, torch.Tensor] = {}
            if scores_policy(self.strategy) or self.strategy.needs_reference:
                scores = self.scorer([seq for row in candidates for _, seq in row], columns=2 * m,
                                     states=getattr(self.generator, "states", None) if replay is None else None)
                self.scored += len(pool) * 2 * m
            view = selection_view(scores, cfg)
            selection = self.strategy.select(view, len(pool), want, cfg, self.rng)
            times["time/scoring_s"] = time.time() - t0

            t0 = time.time()
            picked = [(i, i_pol, m + i_ref) for i, (i_pol, i_ref) in zip(selection.rows, selection.responses)]
            queries = [Query(prompt=pool[i][1], response_a=candidates[i][a][0], response_b=candidates[i][b][0],
                             reference=pool[i][2].reference, keywords=pool[i][2].keywords) for i, a, b in picked]
            judgments = judged_on_main(self.oracle, queries, self.ledger, cfg.oracle.get("max_queries"))
            times["time/oracle_s"] = time.time() - t0

            elements, labelled, bought, first_won, budget_spent = [], [], [], [], False
            for (i, a, b), judgment in zip(picked, judgments):
                if judgment.winner is None:
                    self.failures += 1
                    budget_spent |= judgment.error == "budget"
                    continue
                bought.append((i, a, b))
                first_won.append(judgment.winner == "A")
                winner, loser = (a, b) if judgment.winner == "A" else (b, a)
                element = pair_element(pool[i][1], prompt_ids[i], {"chosen": candidates[i][winner], "rejected": candidates[i][loser]})
                if "ref" in scores:
                    element["reference_chosen_logps"] = float(scores["ref"][i, winner])
                    element["reference_rejected_logps"] = float(scores["ref"][i, loser])
                labelled.append([pool[i][1], element["chosen"], element["rejected"]])
                elements.append(element)
            self.labels += len(elements)
            self.scorer.observe(scores, bought, first_won)
            self.steps += 1
            info = {**selection_stats(selection, view, len(pool)), **self.scorer.stats(), **self.generator.stats()}
            info.update(self.reliability.step(split_half_spearman(self.strategy, view, len(pool), want, cfg), len(pool)))
            info.update(times)
            info.update({"labels": len(elements), "pairs": labelled, "counters/labels_bought": self.labels,
                         "counters/oracle_failures": self.failures, "counters/prompts_seen": self.consumed,
                         "counters/candidates_scored": self.scored, "counters/steps_replayed": int(replay is not None)})
            self.step_start.end()
            if elements:
                yield collate(elements, tokenizer.pad_token_id), info
            if budget_spent:
                tqdm.write(f"oracle budget oracle.max_queries={cfg.oracle.max_queries} spent; stopping")
                return

    def progress(self) -> Dict:
        return {"labels": self.labels, "failed": self.failures, "scored": self.scored}

    def summary(self) -> Dict:
        return {**self.progress(), **self.reliability.summary()}

    def state_dict(self) -> Dict:
        if self.step_start.state is not None:
            return self.step_start.state
        return {"consumed": self.consumed, "labels": self.labels, "failures": self.failures, "scored": self.scored,
                "steps": self.steps, "rng": list(self.rng.getstate()[1]), "rng_pos": self.rng.getstate()[2], **self.scorer.state_dict(),
                **self.reliability.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        self.consumed, self.labels, self.failures, self.scored = state["consumed"], state["labels"], state["failures"], state["scored"]
        self.steps = state.get("steps", 0)   # checkpoints from before the vLLM backend
        self.rng.setstate((3, tuple(state["rng"]), state["rng_pos"]))
        self.scorer.load_state_dict(state)
        self.reliability.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# Wiring from the config

def prompt_subset(config) -> str:
    """The SFT stage trains on the first pretrain_fraction share of prompts; DPO (active or not) on the rest."""
    if float(config.pretrain_fraction) <= 0 or config.online:
        return "all"
    return "sft" if config.loss.name == "sft" else "pool"


def load_run_data(config) -> Dict[str, Datasets]:
    """Every dataset of the run, parsed once per split ({'train': ..., 'test': ...}) and handed to the
    parts that read it; a missing file or wrong columns fails here in one line, before models load."""
    return {split: load_datasets(list(config.datasets), split, seed=int(config.seed), split_seed=int(config.split_seed),
                                 data_files=dict(config.dataset_files), cache_dir=config.cache_dir, silent=split == "test")
            for split in ("train", "test")}


def data_kwargs(config, tokenizer) -> Dict:
    return dict(seed=int(config.seed), split_seed=int(config.split_seed), max_length=int(config.max_length),
                max_prompt_length=int(config.max_prompt_length), prompt_format=prompt_formatter(config, tokenizer))


def prompt_tokens(config, tokenizer) -> PromptTokens:
    return PromptTokens(tokenizer, int(config.max_length), int(config.max_prompt_length), prompt_formatter(config, tokenizer))


def prompt_formatter(config, tokenizer) -> Optional[Callable[[str], str]]:
    """Instruction-tuned presets (model.chat_template=true) see each prompt as one user turn. Long
    prompts are cut *before* templating (to max_prompt_length minus the template's own tokens), so
    truncation never removes the assistant header the model answers after."""
    if not config.model.get("chat_template"):
        return None
    def template(text: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)

    overhead = len(tokenizer(template(""), add_special_tokens=False).input_ids)
    budget = max(1, int(config.max_prompt_length) - overhead)
    keep_end = truncation_mode_for(config.datasets[0]) == "keep_end"

    def fmt(prompt: str) -> str:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        if len(ids) > budget:
            prompt = tokenizer.decode(ids[-budget:] if keep_end else ids[:budget])
        return template(prompt)

    return fmt


def build_source(config, data: Dict[str, Datasets], policy, reference, tokenizer, device, run_dir: str, oracle=None):
    """The batch source the trainer consumes, chosen by active/online/selection_strategy; data from load_run_data."""
    kwargs = data_kwargs(config, tokenizer)
    if config.online or config.active:
        strategy = STRATEGIES[config.selection_strategy]
        if strategy.uses_labels:
            tqdm.write(f"NOTE: selection_strategy={config.selection_strategy} reads the pool's labels: a headroom check "
                       "(how much any selection could beat uniform), not a method you can deploy")
        scorer = CandidateScorer(strategy, policy, reference, config, tokenizer.pad_token_id, device, seed=int(config.seed) + 1)
    if config.online:
        # online budgets count labels bought, so the prompt stream cycles until the budget is spent
        epochs = int(config.n_epochs) if config.n_examples is None else 1_000_000

        def prompts(skip):
            return itertools.islice(iterate_prompts(data["train"], "train", seed=int(config.seed), shuffle=True,
                                                    n_epochs=epochs), skip, None)

        ledger = Ledger(os.path.join(run_dir, LEDGER_FILENAME)) if distributed.is_main() else None
        if config.generation.backend == "vllm":
            from vllm_backend import VLLMGenerator
            generator = VLLMGenerator(policy, reference, tokenizer, config.generation, device, int(config.seed), run_dir)
        else:
            generator = Generator(policy, reference, tokenizer, config.generation, device, seed=int(config.seed))
        journal = CandidatesJournal(journal_path(run_dir), write=distributed.is_main())
        return OnlineSource(prompts, strategy, scorer, generator, prompt_tokens(config, tokenizer), config, device,
                            oracle, ledger, journal)

    sft_mode = config.loss.name == "sft"
    limit = {"n_examples": int(config.n_examples)} if config.n_examples is not None and not config.active else {"n_epochs": int(config.n_epochs)}
    unlabelled = bool(config.active and unlabelled_files(data["train"]))

    def make_elements(skip):
        return itertools.islice(iterate_elements(data["train"], tokenizer, "train", shuffle=True, sft_mode=sft_mode,
                                                 prompt_subset=prompt_subset(config), pretrain_fraction=float(config.pretrain_fraction),
                                                 unlabelled=unlabelled, **limit, **kwargs), skip, None)

    if config.active:
        ledger = Ledger(os.path.join(run_dir, LEDGER_FILENAME)) if unlabelled and distributed.is_main() else None
        return OfflineActiveSource(make_elements, strategy, scorer, config, tokenizer.pad_token_id,
                                   oracle=oracle if unlabelled else None, ledger=ledger)
    return PlainSource(make_elements, config, tokenizer.pad_token_id)
