"""Losses (pure functions) and the BasicTrainer loop.

The trainer knows only batches. It does not know where they come from: it consumes a *batch source* (plain data,
an offline selector, or the online generate-select-label loop; see data_selection.py), an
iterator of `(batch, info)` where `batch` is a collated dict (see preference_datasets.collate) and
`info['labels']` is how many preference labels (or SFT examples) the batch spends from the budget.
Evaluation is a callable handed in (evaluation.Evaluator); checkpoint files are checkpoints.py's.
"""
import json
import math
import os
import time
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

import distributed
from checkpoints import SHARDED, begin_checkpoint, finish_checkpoint, load_shards, read_training_state, save_shards
from scoring import Reference, response_logps, shared_prompt_rows
from utils import RunPaused, append_jsonl, atomic_write_text, pad_to_length, read_jsonl, rng_state, set_rng_state


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
# Trainer

def _to(batch: Dict, device) -> Dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def rows(batch: Dict, lo: int, hi: int) -> Dict:
    return {k: v[lo:hi] for k, v in batch.items()}


def rank_microbatches(batch: Dict, n_parts: int) -> List[Tuple[Dict, float]]:
    """This rank's microbatches of a global batch and the weight of each one's mean loss, such that the
    gradient averaged over the ranks equals that of the global batch's mean loss: weight = microbatch
    size * world size / global size. Alone: the batch split into n_parts. Under torchrun every rank
    takes its rows (sizes differ by at most one, so any batch size splits) and makes exactly n_parts
    backward passes, an empty part being the batch's first row at weight 0, so the ranks' collectives
    always pair up."""
    size = batch["chosen_input_ids"].shape[0]
    world = distributed.world_size()
    lo, hi = distributed.shard_bounds(size)
    parts = split_batch(rows(batch, lo, hi), n_parts) if hi > lo else []
    weighted = [(part, part["chosen_input_ids"].shape[0] * world / size) for part in parts]
    if world > 1:
        weighted += [(rows(batch, 0, 1), 0.0)] * (n_parts - len(weighted))
    return weighted


class BasicTrainer:
    """One policy, one reference, one batch source. `train()` runs until the source is exhausted or
    the label budget is spent, evaluating every `eval_every` labels and saving a checkpoint then.

    loss_name: 'sft' | 'dpo' | 'ipo'.
    """

    def __init__(self, policy, reference: Optional[Reference], tokenizer, config, run_dir: str,
                 batch_source, evaluator, logger, device, forward=None):
        """forward: the training forward from distributed.prepare (DDP-wrapped under torchrun);
        default: response_logps on the policy."""
        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.forward = forward or (lambda ids, mask, labels, prompts=None: response_logps(policy, ids, mask, labels, prompts=prompts))
        # one process: chosen and rejected read their shared prompt once (the same loss and gradients). Not
        # under torchrun's wrapped forward, activation checkpointing (no cache in a recomputed block) or
        # train_dropout (the two rows would share the prompt's dropout masks)
        self.share_prompts = forward is None and not config.activation_checkpointing and not config.train_dropout
        self.config, self.run_dir, self.batch_source = config, run_dir, batch_source
        self.evaluator, self.logger, self.device = evaluator, logger, device
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
            logps = self.forward(batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
            loss = sft_loss(logps)
            n_tokens = (batch["chosen_labels"] != -100).sum(-1).clamp(min=1)
            metrics[f"logps_{split}/chosen"] = logps.detach()
            metrics[f"nll_per_token_{split}"] = (-logps.detach() / n_tokens)
            metrics[f"loss/{split}"] = -logps.detach()
            return loss, metrics

        concat = concatenated_inputs(batch)
        n = batch["chosen_input_ids"].shape[0]
        shared = shared_prompt_rows(concat["input_ids"], concat["attention_mask"], concat["labels"],
                                    self.tokenizer.pad_token_id) if self.share_prompts else None
        if shared is not None:
            prompts, concat = shared
        inputs, extra = (concat["input_ids"], concat["attention_mask"], concat["labels"]), ({} if shared is None else {"prompts": prompts})
        if "reference_chosen_logps" in batch:
            # scored during selection: never pay for a second reference pass
            ref_chosen, ref_rejected = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
        else:
            # before the policy forward, so its transient buffers never coexist with saved activations
            ref_all = self.reference.logps(*inputs, **extra)
            ref_chosen, ref_rejected = ref_all[:n], ref_all[n:]
        all_logps = self.forward(*inputs, **extra)
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
        """One optimizer step on the global `batch`: this rank's rows (all of them alone), split into
        gradient_accumulation_steps microbatches, each mean loss weighted by its share of the global
        batch, so the gradient equals that of the whole batch's mean loss at any world size. Metrics
        are means over the whole batch."""
        self.policy.train(bool(self.config.train_dropout))
        collected = defaultdict(list)
        parts = rank_microbatches(batch, int(self.config.gradient_accumulation_steps))
        for i, (micro, weight) in enumerate(parts):
            micro = _to(micro, self.device)
            with distributed.gradient_sync(self.forward, self.policy, enabled=i == len(parts) - 1):
                loss, metrics = self.batch_metrics(micro, train=True)
                (loss * weight).backward()
            for k, v in metrics.items():  # a weight-0 filler adds its keys, not its values
                collected[k].append(v.float().cpu()[:len(v) if weight > 0 else 0])
        trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        distributed.average_replicated_grads(trainable)
        grad_norm = distributed.clip_grad_norm(trainable, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.policy.eval()
        collected = {k: torch.cat(v) for k, v in collected.items()}
        out = {k: v.mean().item() for k, v in distributed.gathered_tensors(collected).items()}
        out["grad_norm"] = float(grad_norm)
        out["lr"] = self.scheduler.get_last_lr()[0]
        return out

    # -- loop ------------------------------------------------------------------------------------

    def log(self, metrics: Dict[str, float]) -> None:
        if not distributed.is_main():
            return
        record = {"step": self.step, "labels": self.example_counter, **metrics}
        append_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), record)
        self.logger.log({k: v for k, v in metrics.items() if k != "split"}, step=self.example_counter)

    def evaluate_and_log(self) -> Dict[str, float]:
        results = self.evaluator(self) if self.evaluator is not None else {}
        self.log({"split": "eval", **results})
        return results

    def train(self) -> Dict:
        """Run to the end of the batch source (or the label budget), evaluating and checkpointing every
        `eval_every` labels and at the end; returns the summary (also written to summary.json).

        Checkpoints are taken between steps, while the batch source is suspended right after the
        batch it last produced, so a resumed run draws exactly the batches the uninterrupted one would."""
        start = time.time()
        last_eval_at = None
        if self.step == 0 and self.config.do_first_eval:
            tqdm.write("first eval (before training)")
            self.evaluate_and_log()
            last_eval_at = 0
        # the bar advances a step at a time (its rate and time left are per step); labels are a counter
        budget = self.config.n_examples
        total_steps = math.ceil(int(budget) / int(self.config.batch_size)) if budget is not None else None
        unit = "label" if self.loss_name != "sft" or self.config.online else "ex"
        progress = tqdm(total=total_steps, initial=self.step, dynamic_ncols=True, unit="step",
                        desc=f"{self.loss_name} ({self.config.exp_name})", disable=not distributed.is_main())
        try:
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
                progress.update(1)
                count = f"{self.example_counter}" + (f"/{budget}" if budget is not None else "")
                progress.set_postfix({f"{unit}s": count, "loss": f"{metrics['loss/train']:.3f}",
                                      **{k: v for k, v in self.batch_source.progress().items() if k != "labels"}})
                if self.example_counter >= self.next_eval:
                    self.next_eval = self.example_counter + int(self.config.eval_every)
                    self.evaluate_and_log()
                    last_eval_at = self.example_counter
                    self.save()
        except RunPaused:
            # the source reports the state of the step that waits (its pool not yet consumed), so the
            # resumed run repeats that step with the answers
            progress.close()
            self.save()
            raise
        progress.close()
        if last_eval_at != self.example_counter:
            tqdm.write("final eval")
            self.evaluate_and_log()
        checkpoint = self.save()
        if not distributed.is_main():
            return distributed.broadcast(None)
        evals = [r for r in read_jsonl(os.path.join(self.run_dir, "metrics.jsonl")) if r.get("split") == "eval"]
        strip = lambda r: {k: v for k, v in r.items() if k not in ("split", "step", "labels")}
        summary = {"exp_name": self.config.exp_name, "steps": self.step, "labels": self.example_counter,
                   "train_time_s": round(time.time() - start, 1), "checkpoint": checkpoint,
                   "first_eval": strip(evals[0]) if evals else {}, "final_eval": strip(evals[-1]) if evals else {},
                   **self.batch_source.summary()}
        atomic_write_text(os.path.join(self.run_dir, "summary.json"), json.dumps(summary, indent=2))
        return distributed.broadcast(summary)

    # -- checkpoints -----------------------------------------------------------------------------

    def trainer_state(self) -> Dict:
        """What a resume restores besides the model and optimizer: the same on every rank (every rank runs
        the same batch source, so its data position and the estimator's state are the same), saved once."""
        return {"step": self.step, "example_counter": self.example_counter, "next_eval": self.next_eval,
                "source": self.batch_source.state_dict(),
                "world_size": distributed.world_size(), "distributed": distributed.strategy(self.config)}

    def save(self) -> Optional[str]:
        """Checkpoint step-N/ (see checkpoints.py); none in debug mode. Rank 0 writes the files; under a
        sharded full fine-tune (FSDP) every rank writes its own shards of the weights and optimizer."""
        if self.config.debug:
            return None
        tmp = distributed.broadcast(begin_checkpoint(self.run_dir, self.step) if distributed.is_main() else None)
        if tmp is None:                                             # saved already
            return os.path.join(self.run_dir, f"step-{self.step}")
        sharded = distributed.shards_checkpoints(self.policy)
        if sharded:
            save_shards(distributed.sharded_state(self.policy, self.optimizer), tmp)
        # collectives: every rank takes part
        weights = distributed.adapter_state(self.policy)
        optimizer = None if sharded else distributed.optimizer_state(self.policy, self.optimizer)
        rngs = distributed.gather(rng_state())
        path = None
        if distributed.is_main():
            state = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "trainer": self.trainer_state(),
                     "rng_by_rank": rngs}
            path = finish_checkpoint(self.run_dir, self.step, tmp, self.policy, self.tokenizer, state, self.config, weights)
        distributed.after_main("checkpoint")
        return distributed.broadcast(path)

    def load_training_state(self, checkpoint_dir: str) -> None:
        """Continue from a checkpoint of this run (its weights already loaded by train.py, before any
        sharding): optimizer, scheduler, counters, data position, selection state, RNG. At another world
        size or strategy too: nothing saved belongs to one rank but its RNG (rank r takes saved rank
        r mod the saved world size's), and the shards of a sharded checkpoint are read resharded."""
        data = read_training_state(checkpoint_dir)
        state = data["trainer"]
        saved = (int(state.get("world_size", 1)), state.get("distributed"))
        here = (distributed.world_size(), distributed.strategy(self.config))
        if saved != here:
            tqdm.write(f"resume: {checkpoint_dir} was saved by {saved[0]} process(es) ({saved[1] or 'no torchrun'}), "
                       f"continuing on {here[0]} ({here[1] or 'no torchrun'})")
        if os.path.isdir(os.path.join(checkpoint_dir, SHARDED)):
            shards = distributed.sharded_state(self.policy, self.optimizer, weights=False)
            load_shards(shards, checkpoint_dir)
            distributed.set_sharded_optimizer(self.policy, self.optimizer, shards)
        else:
            distributed.load_optimizer_state(self.policy, self.optimizer, data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        # checkpoints from before the one-copy state kept every rank's trainer state
        rngs = data.get("rng_by_rank") or [s["rng"] for s in data.get("trainer_by_rank", [state])]
        self.step, self.example_counter, self.next_eval = state["step"], state["example_counter"], state["next_eval"]
        set_rng_state(rngs[distributed.rank() % len(rngs)])
        self.batch_source.load_state_dict(state["source"])
