"""Losses, the BasicTrainer loop, evaluation and checkpoints.

The trainer does not know where its batches come from: it consumes a *batch source* (plain data,
an offline selector, or the online generate-select-label loop; see data_selection.py), an
iterator of `(batch, info)` where `batch` is a collated dict (see preference_datasets.collate) and
`info['labels']` is how many preference labels (or SFT examples) the batch spends from the budget.
"""
import contextlib
import json
import os
import shutil
import time
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from scoring import response_logps
from utils import ConfigError, append_jsonl, atomic_write_text, pad_to_length, read_jsonl, rng_state, set_rng_state


# ----------------------------------------------------------------------------------------------
# Losses (pure functions)

def preference_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
                    beta: float, reference_free: bool = False, ipo: bool = False
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (or IPO) loss for a batch of pairs. All inputs (B,) summed response log-probs.

    logits = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)); DPO loss = -log sigmoid(beta * logits),
    IPO loss = (logits - 1/(2 beta))^2. Returns losses (B,), chosen rewards (B,), rejected rewards (B,)
    with reward = beta * (log pi - log ref), detached.
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = torch.zeros_like(pi_logratios) if reference_free else reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    if ipo:
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * logits)
    ref_chosen = torch.zeros_like(policy_chosen_logps) if reference_free else reference_chosen_logps
    ref_rejected = torch.zeros_like(policy_rejected_logps) if reference_free else reference_rejected_logps
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def sft_loss(policy_chosen_logps: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the SFT targets: (B,) summed token log-probs -> scalar mean over batch."""
    return -policy_chosen_logps.mean()


def concatenated_inputs(batch: Dict) -> Dict[str, torch.Tensor]:
    """Stack chosen and rejected into one (2B, T) batch so the policy runs one forward per step."""
    max_len = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    out = {}
    for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        out[key] = torch.cat([pad_to_length(batch[f"chosen_{key}"], max_len, pad),
                              pad_to_length(batch[f"rejected_{key}"], max_len, pad)], dim=0)
    return out


def split_batch(batch: Dict, n_parts: int) -> List[Dict]:
    """Split a collated batch into `n_parts` microbatches along the batch dimension."""
    size = len(batch["prompt"]) if "prompt" in batch else next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
    bounds = [round(i * size / n_parts) for i in range(n_parts + 1)]
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            parts.append({k: v[lo:hi] for k, v in batch.items()})
    return parts


# ----------------------------------------------------------------------------------------------
# Reference model access

@contextlib.contextmanager
def adapters_disabled(model):
    """Inside, a PEFT model computes as the reference: its frozen 'reference' adapter (the SFT stage's
    adapter) if it has one, else the base with adapters off."""
    if "reference" in model.peft_config:
        active = model.active_adapter
        model.set_adapter("reference")
        try:
            yield
        finally:
            model.set_adapter(active)  # also restores requires_grad: only the active adapter trains
    else:
        with model.disable_adapter():
            yield


class Reference:
    """Deterministic reference log-probs: a separate frozen model, or the policy's own base with
    adapters disabled under LoRA (no second copy of the weights). Always eval mode, no grad."""

    def __init__(self, policy, reference_model=None):
        if reference_model is None and not hasattr(policy, "disable_adapter"):
            raise ValueError("a reference model is required unless the policy is a PEFT model")
        self.policy = policy
        self.model = reference_model

    @contextlib.contextmanager
    def active(self):
        model = self.model if self.model is not None else self.policy
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), (adapters_disabled(model) if self.model is None else contextlib.nullcontext()):
                yield model
        finally:
            model.train(was_training)

    def logps(self, input_ids, attention_mask, labels) -> torch.Tensor:
        with self.active() as model:
            return response_logps(model, input_ids, attention_mask, labels)


# ----------------------------------------------------------------------------------------------
# Trainer

def _to(batch: Dict, device) -> Dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class BasicTrainer:
    """One policy, one reference, one batch source. `train()` runs until the source is exhausted or
    the label budget is spent, evaluating every `eval_every` labels and saving a checkpoint then.

    loss_name: 'sft' | 'dpo' | 'ipo'.
    """

    def __init__(self, policy, reference: Optional[Reference], tokenizer, config, run_dir: str,
                 batch_source, eval_batches: List[Dict], logger, device, sampler=None):
        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.config, self.run_dir, self.batch_source = config, run_dir, batch_source
        self.eval_batches, self.logger, self.device, self.sampler = eval_batches, logger, device, sampler
        # online_loss=sft_winner reproduces the original research code: NLL of the oracle's winner only
        self.loss_name = "sft" if config.online and config.online_loss == "sft_winner" else config.loss.name
        trainable = [p for p in policy.parameters() if p.requires_grad]
        optimizer_cls = getattr(torch.optim, config.optimizer)
        self.optimizer = optimizer_cls(trainable, lr=config.lr)
        warmup = max(int(config.warmup_steps), 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        self.step = 0
        self.example_counter = 0
        self.next_eval = int(config.eval_every)

    # -- one step --------------------------------------------------------------------------------

    def batch_metrics(self, batch: Dict, train: bool) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Loss (scalar, mean over the microbatch) and per-example metrics for one microbatch."""
        split = "train" if train else "eval"
        metrics = {}
        if self.loss_name == "sft":
            logps = response_logps(self.policy, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
            loss = sft_loss(logps)
            n_tokens = (batch["chosen_labels"] != -100).sum(-1).clamp(min=1)
            metrics[f"logps_{split}/chosen"] = logps.detach()
            metrics[f"nll_per_token_{split}"] = (-logps.detach() / n_tokens)
            metrics[f"loss/{split}"] = -logps.detach()
            return loss, metrics

        concat = concatenated_inputs(batch)
        n = batch["chosen_input_ids"].shape[0]
        if self.config.loss.reference_free:
            ref_chosen = ref_rejected = torch.zeros(n, device=concat["input_ids"].device)
        elif "reference_chosen_logps" in batch:
            # scored during selection: never pay for a second reference pass
            ref_chosen, ref_rejected = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
        else:
            # before the policy forward, so its transient buffers never coexist with saved activations
            ref_all = self.reference.logps(concat["input_ids"], concat["attention_mask"], concat["labels"])
            ref_chosen, ref_rejected = ref_all[:n], ref_all[n:]
        all_logps = response_logps(self.policy, concat["input_ids"], concat["attention_mask"], concat["labels"])
        policy_chosen, policy_rejected = all_logps[:n], all_logps[n:]
        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=self.config.loss.beta,
            reference_free=self.config.loss.reference_free, ipo=self.loss_name == "ipo")
        metrics[f"rewards_{split}/chosen"] = chosen_rewards
        metrics[f"rewards_{split}/rejected"] = rejected_rewards
        # a tie (e.g. policy == reference before any step) is a coin flip, not a miss
        metrics[f"rewards_{split}/accuracies"] = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
        metrics[f"rewards_{split}/margins"] = chosen_rewards - rejected_rewards
        metrics[f"logps_{split}/chosen"] = policy_chosen.detach()
        metrics[f"logps_{split}/rejected"] = policy_rejected.detach()
        metrics[f"loss/{split}"] = losses.detach()
        return losses.mean(), metrics

    def train_step(self, batch: Dict) -> Dict[str, float]:
        """One optimizer step on `batch`, split into gradient_accumulation_steps microbatches.
        Each microbatch's mean loss is weighted by its share of the batch, so the gradient equals
        that of the whole batch's mean loss."""
        self.policy.train(bool(self.config.train_dropout))
        size = batch["chosen_input_ids"].shape[0]
        collected = defaultdict(list)
        for micro in split_batch(batch, int(self.config.gradient_accumulation_steps)):
            micro = _to(micro, self.device)
            loss, metrics = self.batch_metrics(micro, train=True)
            (loss * micro["chosen_input_ids"].shape[0] / size).backward()
            for k, v in metrics.items():
                collected[k].append(v.float().cpu())
        trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.policy.eval()
        out = {k: torch.cat(v).mean().item() for k, v in collected.items()}
        out["grad_norm"] = float(grad_norm)
        out["lr"] = self.scheduler.get_last_lr()[0]
        return out

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Mean eval metrics over the held-out batches (+ a table of samples if configured)."""
        self.policy.eval()
        collected = defaultdict(list)
        for batch in tqdm(self.eval_batches, desc="eval", leave=False, disable=len(self.eval_batches) < 2):
            self.attach_reference_logps(batch)
            _, metrics = self.batch_metrics(_to(batch, self.device), train=False)
            for k, v in metrics.items():
                collected[k].append(v.float().cpu())
        results = {k: torch.cat(v).mean().item() for k, v in collected.items()}
        if self.sampler is not None:
            results.update(self.sampler(self))
        return results

    def attach_reference_logps(self, batch: Dict) -> None:
        """The reference never changes: score a held-out batch with it once, at the first eval."""
        if self.loss_name == "sft" or self.config.loss.reference_free or "reference_chosen_logps" in batch:
            return
        concat = _to(concatenated_inputs(batch), self.device)
        logps = self.reference.logps(concat["input_ids"], concat["attention_mask"], concat["labels"]).cpu()
        n = batch["chosen_input_ids"].shape[0]
        batch["reference_chosen_logps"], batch["reference_rejected_logps"] = logps[:n], logps[n:]

    # -- loop ------------------------------------------------------------------------------------

    def log(self, metrics: Dict[str, float]) -> None:
        record = {"step": self.step, "labels": self.example_counter, **metrics}
        append_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), record)
        self.logger.log({k: v for k, v in metrics.items() if k != "split"}, step=self.example_counter)

    def evaluate_and_log(self) -> Dict[str, float]:
        results = self.evaluate()
        self.log({"split": "eval", **results})
        return results

    def train(self) -> Dict:
        """Run to the end of the batch source (or the label budget), evaluating and checkpointing every
        `eval_every` labels and at the end; returns the summary (also written to summary.json).

        Checkpoints are taken between steps, while the batch source is suspended right after the
        batch it last produced, so a resumed run draws exactly the batches the uninterrupted one would."""
        start = time.time()
        progress = tqdm(total=self.config.n_examples, initial=self.example_counter, dynamic_ncols=True,
                        desc=f"{self.loss_name} ({self.config.exp_name})", unit="label" if self.loss_name != "sft" else "ex")
        last_eval_at = None
        if self.step == 0 and self.config.do_first_eval:
            self.evaluate_and_log()
            last_eval_at = 0
        for batch, info in self.batch_source:
            t0 = time.time()
            metrics = self.train_step(batch)
            metrics["time/step_s"] = time.time() - t0
            labels = int(info.get("labels", batch["chosen_input_ids"].shape[0]))
            self.step += 1
            self.example_counter += labels
            metrics.update({k: v for k, v in info.items() if k not in ("labels", "pairs")})
            self.log({"split": "train", **metrics})
            if info.get("pairs"):
                self.logger.table("labelled_pairs", ["prompt", "chosen", "rejected"], info["pairs"], step=self.example_counter)
            progress.update(labels)
            progress.set_postfix({"loss": f"{metrics['loss/train']:.3f}", **self.batch_source.progress()})
            if self.example_counter >= self.next_eval:
                self.next_eval = self.example_counter + int(self.config.eval_every)
                self.evaluate_and_log()
                last_eval_at = self.example_counter
                self.save()
        progress.close()
        if last_eval_at != self.example_counter:
            self.evaluate_and_log()
        checkpoint = self.save()
        evals = [r for r in read_jsonl(os.path.join(self.run_dir, "metrics.jsonl")) if r.get("split") == "eval"]
        strip = lambda r: {k: v for k, v in r.items() if k not in ("split", "step", "labels")}
        summary = {"exp_name": self.config.exp_name, "steps": self.step, "labels": self.example_counter,
                   "train_time_s": round(time.time() - start, 1), "checkpoint": checkpoint,
                   "first_eval": strip(evals[0]) if evals else {}, "final_eval": strip(evals[-1]) if evals else {},
                   **self.batch_source.progress()}
        atomic_write_text(os.path.join(self.run_dir, "summary.json"), json.dumps(summary, indent=2))
        return summary

    # -- checkpoints -----------------------------------------------------------------------------

    def trainer_state(self) -> Dict:
        return {"step": self.step, "example_counter": self.example_counter, "next_eval": self.next_eval,
                "source": self.batch_source.state_dict(), "rng": rng_state()}

    def save(self) -> Optional[str]:
        """Write step-N/ atomically (temp dir, then rename) and point LATEST at it (not in debug mode)."""
        if self.config.debug:
            return None
        name = f"step-{self.step}"
        final = os.path.join(self.run_dir, name)
        if os.path.exists(final):
            return final
        tmp = os.path.join(self.run_dir, f".tmp-{name}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_policy(self.policy, self.tokenizer, tmp)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "trainer": self.trainer_state()}, os.path.join(tmp, "training_state.pt"))
        atomic_write_text(os.path.join(tmp, "config.yaml"), OmegaConf.to_yaml(self.config, resolve=True))
        os.replace(tmp, final)
        link_tmp = os.path.join(self.run_dir, ".LATEST.tmp")
        if os.path.lexists(link_tmp):
            os.remove(link_tmp)
        os.symlink(name, link_tmp)
        os.replace(link_tmp, os.path.join(self.run_dir, "LATEST"))
        return final

    def load_training_state(self, checkpoint_dir: str) -> None:
        """Continue from a checkpoint of this run: weights, optimizer, scheduler, counters, RNG, data position."""
        load_trained_weights(self.policy, checkpoint_dir)
        data = torch.load(os.path.join(checkpoint_dir, "training_state.pt"), weights_only=True)
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        state = data["trainer"]
        self.step, self.example_counter, self.next_eval = state["step"], state["example_counter"], state["next_eval"]
        set_rng_state(state["rng"])
        self.batch_source.load_state_dict(data["trainer"]["source"])


def load_trained_weights(policy, directory: str) -> None:
    """The trained weights of a checkpoint: the 'default' adapter under LoRA, else policy.pt (strict)."""
    adapter = os.path.join(directory, "adapter")
    if hasattr(policy, "peft_config"):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        result = set_peft_model_state_dict(policy, load_file(os.path.join(adapter, "adapter_model.safetensors")),
                                           adapter_name="default")
        if result.unexpected_keys:
            raise ValueError(f"{adapter}: adapter does not match the model ({result.unexpected_keys[0]} unexpected)")
    else:
        load_archive(policy, directory)


def load_archive(model, directory: str) -> None:
    """Load policy.pt strictly, with one line naming what does not match."""
    path = os.path.join(directory, "policy.pt")
    if not os.path.exists(path):
        raise ConfigError(f"model.archive: {directory} holds no policy.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {k}: archive {tuple(state[k].shape)} vs model {tuple(expected[k].shape)})")
        raise ConfigError(f"model.archive={path} does not match model={model.config.model_type}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def save_policy(policy, tokenizer, directory: str) -> None:
    """policy.pt (full state dict) or adapter/ (PEFT adapter), plus the tokenizer."""
    if hasattr(policy, "peft_config"):
        policy.save_pretrained(os.path.join(directory, "adapter"))
    else:
        torch.save(policy.state_dict(), os.path.join(directory, "policy.pt"))
    tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))


# ----------------------------------------------------------------------------------------------
# Generation-based evaluation

def task_metrics(records: List[Tuple[str, str, object]], texts: List[str]) -> Dict[str, float]:
    """Per-dataset metrics of generated answers. records: (dataset, prompt, PromptData) per text."""
    from oracles import haiku_metrics, jeopardy_metrics
    out = {}
    by_name = defaultdict(list)
    for (name, _, data), text in zip(records, texts):
        by_name[name].append((data, text))
    for name, items in by_name.items():
        if name == "haikus":
            out.update({f"haiku/{k}": v for k, v in haiku_metrics([t for _, t in items], [d.keywords for d, _ in items]).items()})
        elif name == "jeopardy":
            out.update({f"jeopardy/{k}": v for k, v in jeopardy_metrics([t for _, t in items], [d.reference for d, _ in items]).items()})
    return out


def build_sampler(config, tokenizer, device, reference: Optional[Reference], run_dir: str, judge=None):
    """Greedy answers of the policy on `n_eval_model_samples` held-out prompts at every eval: task
    metrics (jeopardy correct/abstain/wrong, haiku validity...), the win rate against the reference
    policy's answers judged by the eval oracle (its own ledger, outside the label budget) and, with
    sample_during_eval, a table of samples (wandb + <run_dir>/samples.jsonl). None when there is
    nothing to measure or show."""
    import itertools
    from data_selection import data_kwargs, sample_responses
    from oracles import EVAL_LEDGER_FILENAME, Ledger, evaluate_win_rate
    from preference_datasets import iterate_prompts, tokenize_element, truncation_mode_for
    names = list(config.datasets)
    judge = judge if reference is not None else None
    if not config.sample_during_eval and judge is None and not {"haikus", "jeopardy"} & set(names):
        return None
    ledger = Ledger(os.path.join(run_dir, EVAL_LEDGER_FILENAME)) if judge is not None else None
    kwargs = data_kwargs(config, tokenizer)
    fmt = kwargs["prompt_format"] or (lambda p: p)
    records = list(itertools.islice(iterate_prompts(names, "test", seed=int(config.seed), shuffle=False,
                                                    data_files=kwargs["data_files"], cache_dir=config.cache_dir),
                                    int(config.n_eval_model_samples)))
    ids = [tokenize_element(fmt(prompt), "", None, tokenizer, kwargs["max_length"], kwargs["max_prompt_length"],
                            truncation_mode_for(name))["prompt_input_ids"] for name, prompt, _ in records]
    greedy = OmegaConf.create({"temperature": 0.0, "top_p": 1.0, "max_new_tokens": config.generation.max_new_tokens})
    size = int(config.eval_batch_size)
    reference_texts: List[str] = []   # the reference never changes: generated once

    def answers(model) -> List[str]:
        return [t[0] for start in range(0, len(ids), size)
                for t in sample_responses(model, tokenizer, ids[start:start + size], 1, greedy, device)]

    def sample(trainer) -> Dict[str, float]:
        texts = answers(trainer.policy)
        metrics = task_metrics(records, texts)
        if judge is not None:
            if not reference_texts:
                with reference.active() as model:
                    reference_texts.extend(answers(model))
            result = evaluate_win_rate(judge, ledger, [p for _, p, _ in records], texts, reference_texts,
                                       [d.reference for _, _, d in records], [d.keywords for _, _, d in records])
            metrics.update({f"win_rate/{k}": float(v) for k, v in result.items()})
        if config.sample_during_eval:
            rows = [[name, prompt, text] for (name, prompt, _), text in zip(records, texts)]
            trainer.logger.table("samples", ["dataset", "prompt", "policy"], rows, step=trainer.example_counter)
            for row in rows:
                append_jsonl(os.path.join(trainer.run_dir, "samples.jsonl"),
                             {"labels": trainer.example_counter, "dataset": row[0], "prompt": row[1], "policy": row[2]})
        return metrics

    return sample
