"""Sampling: every parameter explicit, and the joint policy+reference call under LoRA gives what one
call per role gives."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import add_reference_adapter
from generation import Generator, sample_responses, sampling_kwargs

def generation_config(**kw):
    base = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 12, "prompts_per_call": 3,
            "joint_roles": True, "keep_states": True}
    return OmegaConf.create({**base, **kw})


def test_sampling_kwargs_are_explicit():
    assert sampling_kwargs(generation_config()) == {"do_sample": False}
    assert sampling_kwargs(generation_config(temperature=0.7, top_p=0.9, top_k=0)) == {
        "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0}
    with pytest.raises(Exception):   # a sampling config without top_k is refused, not filled in by a library
        sampling_kwargs(OmegaConf.create({"temperature": 1.0, "top_p": 1.0}))


def test_rows_repeated_per_sample_match_num_return_sequences(lora_policy):
    """The prompts are repeated n times by hand (so adapter names follow the rows): under one seed the
    samples are those of generate(num_return_sequences=n)."""
    tokenizer, policy, _, ids = lora_policy
    cfg = generation_config(temperature=1.0, top_k=0)
    torch.manual_seed(3)
    ours = sample_responses(policy, tokenizer, ids[:2], 3, cfg, "cpu")
    width = max(len(p) for p in ids[:2])
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in ids[:2]])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids[:2]])
    torch.manual_seed(3)
    policy.eval()
    out = policy.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=12, num_return_sequences=3,
                          pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, do_sample=True, temperature=1.0,
                          top_p=1.0, top_k=0)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    assert ours == [texts[0:3], texts[3:6]]


@pytest.mark.parametrize("reference_adapter", [False, True])
def test_joint_call_gives_the_greedy_answers_of_one_call_per_role(lora_policy, reference_adapter):
    tokenizer, policy, reference, ids = lora_policy
    if reference_adapter:   # a frozen SFT adapter named 'reference' is the reference
        add_reference_adapter(policy)
    cfg = generation_config()
    joint = Generator(policy, reference, tokenizer, cfg, "cpu", seed=0)
    separate = Generator(policy, reference, tokenizer, generation_config(joint_roles=False), "cpu", seed=0)
    assert joint.joint and not separate.joint
    pol_j, ref_j = joint.sample(ids, 2, start=0)
    pol_s, ref_s = separate.sample(ids, 2, start=0)
    assert pol_j == pol_s and ref_j == ref_s
    assert pol_s != ref_s, "the adapters must change the answers, or this test shows nothing"
    # the reference rows are the reference's own answers
    with reference.active() as model:
        assert ref_s == sample_responses(model, tokenizer, ids, 2, cfg, "cpu")
    assert policy.active_adapter == "default"


def test_joint_roles_need_a_shared_base(tokenizer, tiny_model):
    """A separate reference model (full fine-tuning) samples in its own call."""
    from conftest import make_tiny_model
    from scoring import Reference
    reference = Reference(tiny_model, make_tiny_model(tokenizer, seed=1))
    assert not Generator(tiny_model, reference, tokenizer, generation_config(), "cpu", seed=0).joint


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 10, 0.8), (1.0, 0, 0.5), (1.3, 5, 1.0), (1.0, 0, 1.0)])
def test_sampling_distribution_is_transformers_warpers(temperature, top_k, top_p):
    """The nucleus cut within the top k gives the distribution transformers' warpers give over the
    whole vocabulary (temperature, then top-k, then top-p)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    from generation import sampling_distribution
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    expected = warpers(None, logits.clone()).softmax(-1)
    probs, indices = sampling_distribution(logits, temperature, top_k, top_p)
    ours = torch.zeros_like(logits).scatter(-1, indices, probs)
    assert torch.allclose(ours, expected, atol=1e-6)
    assert ((ours > 0).sum(-1) == (expected > 0).sum(-1)).all()


def _generate_greedy(model, ids, limit, eos, pad, adapter_names=None):
    width = max(len(p) for p in ids)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}
    model.eval()
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=limit, pad_token_id=pad,
                         eos_token_id=eos, do_sample=False, **extra)
    rows = []
    for row in out[:, width:].tolist():
        cut = row.index(eos) + 1 if eos in row else len(row)
        rows.append(row[:cut])
    return rows


def with_system_prompt(tokenizer, ids):
    """The prompts behind one shared instruction, as a chat template's system prompt puts them."""
    common = tokenizer("You are a careful assistant. Answer in one short line, please.").input_ids
    return [common + p[1:] for p in ids]


@pytest.mark.parametrize("shared_start", [False, True])
def test_decode_gives_generates_greedy_tokens_and_leaves_rows_at_eos(lora_policy, shared_start):
    """decode's greedy tokens are generate()'s, for one model and for a mixed-adapter batch, with rows that
    stop early: 'EOS' is a token greedy decoding writes mid-answer, so some rows end at it and leave the
    batch while the others go on to max_new_tokens. With a shared start the prompts' common tokens are
    read once per adapter."""
    from generation import BASE_ADAPTER, common_prefix_length, decode
    tokenizer, policy, _, ids = lora_policy
    if shared_start:
        ids = with_system_prompt(tokenizer, ids)
        assert common_prefix_length(ids) >= 10
    pad, limit = tokenizer.pad_token_id, 10
    free = decode(policy, ids, 1, generation_config(max_new_tokens=limit), -1, pad, "cpu").tokens
    counts = {}
    for row in free:
        for t in set(row[1:-1]):
            counts[t] = counts.get(t, 0) + 1
    eos = max(counts, key=counts.get)       # a token inside some answers: they end there
    names = ["default", BASE_ADAPTER, "default", BASE_ADAPTER]
    trunk = policy.get_base_model().model
    for adapter_names in (None, names):
        calls = []   # (rows, tokens) the trunk reads per forward
        hook = trunk.register_forward_hook(lambda m, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)
        ours = decode(policy, ids, 2, generation_config(max_new_tokens=limit), eos, pad, "cpu", adapter_names=adapter_names)
        hook.remove()
        theirs = _generate_greedy(policy, [p for p in ids for _ in range(2)], limit, eos, pad,
                                  None if adapter_names is None else [a for a in adapter_names for _ in range(2)])
        assert ours.tokens == theirs
        assert any(len(r) < limit for r in ours.tokens) and any(len(r) == limit for r in ours.tokens)
        steps = [rows for rows, width in calls if width == 1]
        assert steps[0] == 2 * len(ids) and steps[-1] < steps[0], steps    # rows that sampled EOS left the batch
        if shared_start:   # the common start once per adapter, then each prompt's rest
            adapters = 1 if adapter_names is None else 2
            assert calls[0] == (adapters, common_prefix_length(ids))
            assert calls[1] == (len(ids), max(len(p) for p in ids) - common_prefix_length(ids))


@pytest.mark.parametrize("shared_start", [False, True])
def test_scores_read_from_sampling_states_equal_the_computed_ones(lora_policy, shared_start):
    """Scoring with what sampling kept (SamplingStates) gives the scores of computing everything, while the
    trunk reads fewer tokens: each model only the other's samples and the candidates whose tokens are not
    the sampled ones (here: a response whose text was changed after sampling)."""
    from data_selection import candidate_seed
    from generation import PromptTokens
    from scoring import ESTIMATORS, RowSeeds, causal_lm_parts, score_sequences
    tokenizer, policy, reference, ids = lora_policy
    ids = with_system_prompt(tokenizer, ids) if shared_start else ids
    config = OmegaConf.create({"llm_dropout": 0.05, "mc_samples": 4, "laplace_prior_std": 0.25, "loss": {"beta": 0.1},
                               "laplace_prior": None, "online": True})
    generator = Generator(policy, reference, tokenizer, generation_config(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=3), "cpu", seed=3)
    pol, ref = generator.sample(ids, 2, start=0)
    states = generator.states
    assert len(states.prompts["policy"]) == len(states.prompts["reference"]) == len(ids)
    tokens = PromptTokens(tokenizer, max_length=96, max_prompt_length=64)
    texts = [row_p + row_r for row_p, row_r in zip(pol, ref)]
    texts[1][0] = texts[1][0] + " changed"
    sequences = [tokens.response(p, t) for p, row in zip(ids, texts) for t in row]
    known = {role: sum((tuple(q["input_ids"][:len(p)]), tuple(q["labels"][len(p):])) in states.responses[role]
                       for p, q in zip([p for p in ids for _ in range(4)], sequences)) for role in ("policy", "reference")}
    assert known["policy"] >= 1 and known["reference"] >= 1, known   # of 8 each (the tiny BPE re-tokenises most samples otherwise)
    trunk = causal_lm_parts(policy)[0]
    calls = []   # (rows, whether the call continued a prompt cache)
    hook = trunk.register_forward_hook(lambda module, args, kwargs, out: calls.append(
        (kwargs["input_ids"].shape[0], kwargs.get("past_key_values") is not None)), with_kwargs=True)
    try:
        for method in ("laplace", "head_analytic", "head"):
            estimator = ESTIMATORS[method](config)
            runs = {}
            for kept in (None, states):
                calls.clear()
                seeds = RowSeeds([candidate_seed(7, i) for i in range(len(sequences))])
                runs[kept is not None] = (score_sequences(policy, reference, sequences, estimator=estimator,
                                                          pad_token_id=tokenizer.pad_token_id, batch_size=6, device="cpu",
                                                          generator=seeds, states=kept), list(calls))
            (computed, computed_calls), (kept_scores, kept_calls) = runs[False], runs[True]
            for key in computed:
                assert torch.allclose(kept_scores[key], computed[key], atol=1e-4, rtol=1e-4), (method, key)
            assert sum(rows for rows, cached in computed_calls if cached) == 2 * len(sequences)
            assert any(not cached for _, cached in computed_calls)
            # with the states no prompt is read again, and each model reads only what sampling did not give it
            assert all(cached for _, cached in kept_calls), method
            assert sum(rows for rows, _ in kept_calls) == 2 * len(sequences) - known["policy"] - known["reference"]
    finally:
        hook.remove()
