"""Log-probabilities of responses under a causal LM: one deterministic path and the MC-dropout estimates.

Every consumer (SFT/DPO losses, reference scoring, the offline and online selectors) goes through
`response_logps` or `mc_dropout_logps`, so there is exactly one way a sequence gets scored.

Memory: a (B, T, V) logits tensor for a 49k vocabulary is 0.4 GB at B=8, T=255 in fp32, and the
backward keeps several of them alive. We run the network trunk once, keep only the hidden states of
the response positions (N, H), and project them onto the vocabulary in chunks of `chunk_size` rows;
under autograd each chunk is checkpointed, so at most one chunk of logits exists at a time.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# fp32 logits per projected chunk. Under autograd the backward keeps about three chunks alive, so they
# are small (16 MiB, ~85 rows of a 49k vocabulary: peak memory); without grad only one chunk lives at
# a time, and larger chunks read the head's weights fewer times (scoring speed).
CHUNK_BYTES_GRAD = 16 << 20
CHUNK_BYTES_NO_GRAD = 64 << 20


def default_chunk(vocab_size: int, grad: bool) -> int:
    """Rows of hidden states projected onto the vocabulary at once."""
    return max(64, (CHUNK_BYTES_GRAD if grad else CHUNK_BYTES_NO_GRAD) // (4 * vocab_size))


def causal_lm_parts(model) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """(trunk, head) of a causal LM, also under PEFT. The trunk maps input_ids to the final
    (normalised) hidden states; the head maps hidden states to vocabulary logits."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hf_model.base_model, hf_model.get_output_embeddings()


def _target_logps(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """hidden (N, H), targets (N,) -> log p(target) (N,) in fp32."""
    logits = head(hidden).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                chunk_size: Optional[int] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """Chunked log p(targets | hidden). hidden (..., N, H), targets (N,) -> (..., N).

    Leading dims of `hidden` (e.g. K dropout masks) share the same targets."""
    chunk_size = chunk_size or default_chunk(getattr(head, "out_features", None) or head.weight.shape[0],
                                             grad=torch.is_grad_enabled() and hidden.requires_grad)
    lead = hidden.shape[:-2]
    n = hidden.shape[-2]
    flat = hidden.reshape(-1, n, hidden.shape[-1])
    out = []
    for h in flat:
        parts = []
        for start in range(0, n, chunk_size):
            h_chunk, t_chunk = h[start:start + chunk_size], targets[start:start + chunk_size]
            if torch.is_grad_enabled() and h_chunk.requires_grad:
                parts.append(checkpoint(_target_logps, h_chunk, head, t_chunk, softcap, use_reentrant=False))
            else:
                parts.append(_target_logps(h_chunk, head, t_chunk, softcap))
        out.append(torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32))
    return torch.stack(out).reshape(*lead, n)


def _response_hidden(model, input_ids, attention_mask, labels):
    """Run the trunk once; return hidden states of the positions that predict response tokens.

    input_ids, attention_mask, labels: (B, T); labels are -100 on prompt and padding.
    Returns hidden (N, H), targets (N,), row index (N,) of each position, head, softcap."""
    trunk, head = causal_lm_parts(model)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    shifted = labels[:, 1:]
    mask = shifted != -100
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(shifted)[mask]
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None) if config is not None else None
    return hidden[:, :-1][mask], shifted[mask], rows, head, softcap


def _sum_per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """values (..., N), rows (N,) -> (..., n_rows): per-sequence sums."""
    out = values.new_zeros(*values.shape[:-1], n_rows)
    return out.index_add_(-1, rows, values)


def response_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   chunk_size: Optional[int] = None) -> torch.Tensor:
    """Sum of log p(response tokens) per sequence, (B,) fp32. Prompt/padding (labels -100) excluded,
    EOS included. Gradients flow when called under autograd."""
    hidden, targets, rows, head, softcap = _response_hidden(model, input_ids, attention_mask, labels)
    return _sum_per_row(token_logps(hidden, head, targets, chunk_size, softcap), rows, labels.shape[0])


def mean_and_variance(samples: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """samples (K, B) -> mean (B,), unbiased variance (B,) (zero when K == 1)."""
    if samples.shape[0] < 2:
        return samples.mean(0), torch.zeros_like(samples[0])
    return samples.mean(0), samples.var(0, unbiased=True)


@torch.no_grad()
def mc_dropout_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                     k: int, p: float, method: str = "head", chunk_size: Optional[int] = None,
                     generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """MC-dropout estimate of log pi(response | prompt): mean (B,) and unbiased variance (B,), in nats.

    method='head': one trunk pass in eval mode, then K independent dropout masks (rate p) on the final
    hidden state, each projected by the output head. Only response positions are projected: the
    masks on other positions cannot change these log-probs, so the distribution is the same as
    masking every position.
    method='full': K full forward passes in train mode (every dropout in the network active, LoRA
    dropout included) plus the head dropout p; restores the model's previous mode afterwards.
    """
    if method not in ("head", "full"):
        raise ValueError(f"uncertainty method must be 'head' or 'full', got {method!r}")
    if method == "head":
        was_training = model.training
        model.eval()
        try:
            hidden, targets, rows, head, softcap = _response_hidden(model, input_ids, attention_mask, labels)
        finally:
            model.train(was_training)
        keep = 1.0 - p
        if p > 0:
            masks = torch.empty((k,) + hidden.shape, device=hidden.device, dtype=hidden.dtype)
            masks.bernoulli_(keep, generator=generator)
            samples_hidden = hidden.unsqueeze(0) * masks / keep
        else:
            samples_hidden = hidden.unsqueeze(0).expand(k, *hidden.shape)
        samples = _sum_per_row(token_logps(samples_hidden, head, targets, chunk_size, softcap), rows, labels.shape[0])
        return mean_and_variance(samples)

    was_training = model.training
    model.train()
    try:
        samples = []
        for _ in range(k):
            hidden, targets, rows, head, softcap = _response_hidden(model, input_ids, attention_mask, labels)
            if p > 0:
                hidden = F.dropout(hidden, p=p, training=True)
            samples.append(_sum_per_row(token_logps(hidden, head, targets, chunk_size, softcap), rows, labels.shape[0]))
    finally:
        model.train(was_training)
    return mean_and_variance(torch.stack(samples))
