"""Sampling: every parameter explicit, and the joint policy+reference call under LoRA gives what one
call per role gives."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import add_reference_adapter
from generation import Generator, sample_responses, sampling_kwargs

def generation_config(**kw):
    base = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 12, "prompts_per_call": 3,
            "joint_roles": True}
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
