"""The dual-model rollout: KV-cached decoding equals recomputation, and the intervention rules do what METHODS §4.1
says (the sanity properties of SWITCH, the top-K rule of SKD, the masks after EOS)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from llmdistill.rollout import Intervention, Rollout, Sampling, jensen_shannon, rollout, rollout_statistics

from conftest import tiny_gpt2, tiny_llama

VOCAB, EOS, PAD = 40, 2, 0


@pytest.fixture(scope="module")
def models():
    return tiny_llama(VOCAB, seed=1).eval(), tiny_gpt2(VOCAB, seed=2).eval()


@pytest.fixture(scope="module")
def prompts():
    """Three left-padded prompts of different lengths."""
    ids = torch.tensor([[PAD, PAD, 5, 6, 7], [PAD, 8, 9, 10, 11], [12, 13, 14, 15, 16]])
    return ids, (ids != PAD).long()


def run(models, prompts, rule="student", seed=0, max_new_tokens=12, temperature=1.0, eos=EOS, **options):
    student, teacher = models
    generator = torch.Generator().manual_seed(seed)
    return rollout(
        student, teacher, *prompts, Intervention(rule=rule, **options),
        Sampling(max_new_tokens=max_new_tokens, temperature=temperature), eos, PAD, generator,
    )


def greedy_by_recomputation(model, ids, mask, steps):
    """Greedy decoding that runs the model over the whole prefix at every step (no cache)."""
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("rule, which", [("student", 0), ("teacher", 1)])
def test_greedy_rollout_with_caches_equals_recomputing_the_prefix(models, prompts, rule, which):
    produced = run(models, prompts, rule=rule, temperature=0.0, eos=-1)
    expected = greedy_by_recomputation(models[which], *prompts, steps=12)
    assert torch.equal(produced.sequences, expected)


def test_switch_with_a_threshold_jsd_never_exceeds_is_student_sampling(models, prompts):
    student = run(models, prompts, rule="student", seed=3)
    switch = run(models, prompts, rule="switch", seed=3, switch_tau0=math.log(2), switch_schedule="constant")
    assert torch.equal(switch.sequences, student.sequences)
    assert not switch.teacher_written.any()


def test_switch_with_threshold_zero_hands_every_disagreeing_position_to_the_teacher(models, prompts):
    switch = run(models, prompts, rule="switch", seed=4, switch_tau0=0.0)
    written = switch.teacher_written[switch.response_mask.bool()]
    disagrees = switch.divergence[switch.response_mask.bool()] > 0
    assert torch.equal(written, disagrees) and written.all()
    assert torch.equal(switch.sequences, run(models, prompts, rule="teacher", seed=4).sequences)


def test_teacher_written_fraction_grows_as_the_threshold_falls(models, prompts):
    fractions = []
    for tau0 in (0.7, 0.02, 0.01, 0.005, 0.0):
        result = run(models, prompts, rule="switch", seed=5, switch_tau0=tau0, max_new_tokens=16, eos=-1)
        fractions.append(result.teacher_written.float().mean().item())
    assert fractions == sorted(fractions) and fractions[0] < fractions[-1] == 1.0


def test_skd_replaces_exactly_the_student_tokens_outside_the_teachers_top_k(models, prompts):
    """At the first step both rules see the same prefix and the same draws: SKD keeps the student's token iff it is
    among the teacher's top-K."""
    student_model, teacher_model = models
    skd = run(models, prompts, rule="skd", seed=6, skd_top_k=5)
    plain = run(models, prompts, rule="student", seed=6)
    prompt_length = prompts[0].shape[1]
    positions = (prompts[1].cumsum(-1) - 1).clamp_min(0)
    teacher_logits = teacher_model(*prompts[:1], attention_mask=prompts[1], position_ids=positions).logits[:, -1]
    first_student = plain.sequences[:, prompt_length]
    in_top_k = (teacher_logits.topk(5, dim=-1).indices == first_student[:, None]).any(-1)
    assert torch.equal(skd.teacher_written[:, 0], ~in_top_k)
    assert torch.equal(skd.sequences[in_top_k, prompt_length], first_student[in_top_k])


def test_rows_stop_at_eos_and_their_masks_end_there(models, prompts):
    produced = run(models, prompts, rule="student", seed=7, max_new_tokens=40, eos=3)
    response = produced.sequences[:, prompts[0].shape[1]:]
    for row in range(len(response)):
        ends = (response[row] == 3).nonzero()
        length = int(ends[0]) + 1 if len(ends) else response.shape[1]
        assert produced.response_mask[row].tolist() == [1] * length + [0] * (response.shape[1] - length)
        assert (response[row, length:] == PAD).all()
        assert not produced.teacher_written[row, length:].any()
    assert torch.equal(produced.attention_mask[:, prompts[0].shape[1]:], produced.response_mask)


def test_teacher_hidden_states_are_those_that_predict_each_token(models, prompts):
    """The stored states give the teacher's logits for every generated token: no second teacher pass is needed."""
    student_model, teacher_model = models
    produced = run(models, prompts, rule="switch", seed=8, max_new_tokens=6, eos=-1)
    ids, mask = produced.sequences, produced.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    full = teacher_model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    prompt_length = prompts[0].shape[1]
    expected = full.hidden_states[-1][:, prompt_length - 1 : -1]
    torch.testing.assert_close(produced.teacher_hidden, expected, rtol=1e-4, atol=1e-5)


def test_jensen_shannon_is_symmetric_bounded_and_zero_on_equal_inputs():
    a, b = torch.randn(4, 30), torch.randn(4, 30)
    torch.testing.assert_close(jensen_shannon(a, b), jensen_shannon(b, a))
    assert (jensen_shannon(a, a).abs() < 1e-6).all()
    far = torch.full((1, 2), -1e4)
    assert jensen_shannon(far.index_fill(1, torch.tensor([0]), 1e4), far.index_fill(1, torch.tensor([1]), 1e4)).item() == (
        pytest.approx(math.log(2), abs=1e-6)
    )


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="rule='swich'"):
        Intervention(rule="swich")
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


def test_statistics_count_generated_tokens_per_position_bucket():
    written = torch.zeros(2, 70, dtype=torch.bool)
    written[0, :16] = True  # row 0: the teacher wrote its first 16 tokens
    written[1, 64:] = True  # row 1: the teacher wrote from position 64 on
    response_mask = torch.ones(2, 70, dtype=torch.long)
    response_mask[1, 68:] = 0  # row 1 ended at 68: positions 68, 69 are padding
    divergence = torch.linspace(0, 0.69, 70).expand(2, 70).clone()
    produced = Rollout(torch.zeros(2, 75), torch.ones(2, 75), response_mask, written, divergence, torch.zeros(2, 70, 4),
                       torch.zeros(2, 70, 4))
    stats = rollout_statistics(produced)
    assert stats["teacher_written_fraction"] == pytest.approx((16 + 4) / (70 + 68))
    assert stats["teacher_written_fraction_0-15"] == 0.5
    assert stats["teacher_written_fraction_16-63"] == 0.0
    assert stats["teacher_written_fraction_64+"] == pytest.approx(4 / 10)
    assert stats["jsd_0-15"] == pytest.approx(divergence[0, :16].mean().item())


def test_sampling_follows_the_warped_distribution_and_never_picks_filtered_tokens():
    from llmdistill.rollout import sample

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)
    drawn = sample(logits, Sampling(temperature=1.0), generator)
    frequencies = torch.bincount(drawn, minlength=5).float() / len(drawn)
    torch.testing.assert_close(frequencies, logits[0].softmax(-1), atol=0.01, rtol=0)
    top2 = sample(logits, Sampling(top_k=2), generator)
    assert set(top2.tolist()) == {0, 1}
    assert torch.bincount(top2, minlength=2)[0] / len(top2) == pytest.approx(1 / (1 + math.exp(-1)), abs=0.01)
    nucleus = sample(logits, Sampling(top_p=0.5), generator)  # p(0) = 0.64 ≥ 0.5: only token 0
    assert set(nucleus.tolist()) == {0}


def tiny_qwen2(vocab_size: int, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config)


def padded_past_the_tokenizer(model):
    """The model with its head's rows past VOCAB (no token of the tokenizer) scoring 3× the real rows: any draw over
    the whole head would almost surely be a padding id, and greedy decoding surely."""
    head = model.get_output_embeddings().weight
    if len(head) > VOCAB:
        with torch.no_grad():
            head[VOCAB:] = 3 * head[:VOCAB]
    return model.eval()


def plain_jensen_shannon(teacher_logits, student_logits):
    p, q = teacher_logits.softmax(-1), student_logits.softmax(-1)
    m = (p + q) / 2
    return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)


@pytest.mark.parametrize("padded", ["teacher", "student"])
@pytest.mark.parametrize("rule, options", [
    ("switch", {"switch_tau0": 0.0}), ("mixture", {"mixture_alpha": 0.5}), ("skd", {"skd_top_k": 3}), ("student", {}),
])
def test_heads_padded_past_the_tokenizer_write_only_ids_both_models_have(prompts, padded, rule, options):
    """Same tokenizer, one head with extra padding rows (Qwen2.5-7B 152,064 vs 1.5B 151,936): every rule decides and
    samples over the shared first min(V_T, V_S) ids, and the JSD is that of the shared ids' distributions."""
    student = tiny_llama(2 * VOCAB if padded == "student" else VOCAB, seed=1)
    teacher = tiny_qwen2(2 * VOCAB if padded == "teacher" else VOCAB, seed=2)
    student, teacher = padded_past_the_tokenizer(student), padded_past_the_tokenizer(teacher)
    for temperature in (1.0, 0.0):
        produced = run((student, teacher), prompts, rule=rule, seed=9, temperature=temperature, eos=-1, **options)
        assert int(produced.sequences.max()) < VOCAB
        if rule == "switch":
            assert produced.teacher_written.all()
    ids, mask = prompts
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    first_logits = [model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1, :VOCAB]
                    for model in (teacher, student)]
    torch.testing.assert_close(produced.divergence[:, 0], plain_jensen_shannon(*first_logits), rtol=1e-4, atol=1e-6)


def test_the_student_alone_writes_what_it_writes_in_lock_step_over_the_teachers_ids(prompts):
    """Plain student sources generate without the teacher, over the ids the teacher's head also has: the same tokens
    as the lock-step rollout for the same seed, with a padded student head as well."""
    student = padded_past_the_tokenizer(tiny_llama(2 * VOCAB, seed=1))
    teacher = tiny_qwen2(VOCAB, seed=2).eval()
    for temperature in (1.0, 0.0):
        sampling = Sampling(max_new_tokens=12, temperature=temperature)
        together, alone = (
            rollout(student, scorer, *prompts, Intervention("student"), sampling, -1, PAD,
                    torch.Generator().manual_seed(4), vocab_size=VOCAB if scorer is None else None)
            for scorer in (teacher, None)
        )
        assert torch.equal(alone.sequences, together.sequences) and int(alone.sequences.max()) < VOCAB
        assert alone.teacher_hidden is None
        torch.testing.assert_close(alone.student_hidden, together.student_hidden)


def test_jsd_measured_from_one_teacher_pass_equals_the_lock_step_jsd(models, prompts):
    """`divergence_statistics` (student hidden states from generation, the teacher's from a pass over the finished
    responses) gives the buckets the lock-step rollout measured token by token."""
    from llmdistill.models import LMHead
    from llmdistill.rollout import divergence_statistics

    student, teacher = models
    produced = run(models, prompts, max_new_tokens=20, eos=-1)
    response = produced.response_mask.bool()
    positions = (produced.attention_mask.cumsum(-1) - 1).clamp_min(0)  # left padding: as the rollout counts them
    hidden = teacher(input_ids=produced.sequences, attention_mask=produced.attention_mask, position_ids=positions,
                     output_hidden_states=True).hidden_states[-1]
    width = prompts[0].shape[1]
    teacher_hidden = hidden[:, width - 1:-1][response]  # the positions that predict each generated token
    positions = torch.arange(response.shape[1]).expand_as(response)[response]
    measured = divergence_statistics(produced.student_hidden[response], LMHead.of(student), teacher_hidden,
                                     LMHead.of(teacher), positions, chunk_size=7)
    in_lock_step = {key: value for key, value in rollout_statistics(produced).items() if key.startswith("jsd_")}
    assert measured.keys() == in_lock_step.keys() == {"jsd_0-15", "jsd_16-63"}
    for key, value in in_lock_step.items():
        assert measured[key] == pytest.approx(value, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("rule, options", [  # these models' JSDs lie in [0.002, 0.006]
    ("switch", {"switch_tau0": 0.005, "switch_decay": 0.03}),
    ("switch", {"switch_tau0": 0.003, "switch_schedule": "constant"}),
    ("skd", {"skd_top_k": 5}),
])
@pytest.mark.parametrize("draft_tokens", [2, 3, 8])
@pytest.mark.parametrize("temperature, eos", [(1.0, EOS), (0.0, EOS), (1.0, 30)])  # 30: some rows end early
def test_speculative_decoding_writes_exactly_what_token_by_token_decoding_writes(models, prompts, rule, options,
                                                                                  draft_tokens, temperature, eos):
    """The student drafts, the teacher scores the drafts in one pass, both caches are cut back at the first teacher
    token: for the same generator, every output of the rollout equals the token-by-token one (rows stop at EOS)."""
    student, teacher = models
    sampling = Sampling(max_new_tokens=20, temperature=temperature)
    one_by_one, speculative = (
        rollout(student, teacher, *prompts, Intervention(rule=rule, **options), sampling, eos, PAD,
                torch.Generator().manual_seed(11), draft_tokens=draft)
        for draft in (0, draft_tokens)
    )
    assert torch.equal(speculative.sequences, one_by_one.sequences)
    assert torch.equal(speculative.teacher_written, one_by_one.teacher_written)
    assert torch.equal(speculative.response_mask, one_by_one.response_mask)
    assert 0 < one_by_one.teacher_written.float().mean() < 1  # both writers took part
    generated = one_by_one.response_mask.bool()  # after its EOS a row's states are never read
    for name in ("divergence", "teacher_hidden", "student_hidden"):
        torch.testing.assert_close(getattr(speculative, name)[generated], getattr(one_by_one, name)[generated],
                                   rtol=1e-4, atol=1e-5)


def test_speculative_decoding_runs_the_teacher_once_per_round(models, prompts):
    """A student that is its own teacher is never overruled, so drafts of 2, 4, 8, 8 and 8 tokens make 30. The teacher
    runs its prefill and then one pass per round, over the previous round's last token and the new drafts."""
    model = models[0]
    widths = []  # tokens read per forward call; one model object plays both parts
    handle = model.register_forward_hook(
        lambda module, args, kwargs, output: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        produced = rollout(model, model, *prompts, Intervention("switch"), Sampling(max_new_tokens=30), -1, PAD,
                           torch.Generator().manual_seed(0), draft_tokens=8)
    finally:
        handle.remove()
    assert not produced.teacher_written.any() and produced.response_mask.sum() == 3 * 30
    prompt = prompts[0].shape[1]
    # one-token calls: the student's drafting steps (1 + 3 + 7 + 7 + 7), its reads of each round's last token (4;
    # none after the last round) and the teacher's first-round pass over its single draft
    assert [width for width in widths if width > 1] == [prompt, prompt, 1 + 3, 1 + 7, 1 + 7, 1 + 7]
    assert widths.count(1) == 25 + 4 + 1


def test_speculative_decoding_with_padded_heads_writes_only_shared_ids(prompts):
    student = padded_past_the_tokenizer(tiny_llama(2 * VOCAB, seed=1))
    teacher = tiny_qwen2(VOCAB, seed=2).eval()
    outputs = [
        rollout(student, teacher, *prompts, Intervention("switch", switch_tau0=0.2), Sampling(max_new_tokens=16),
                -1, PAD, torch.Generator().manual_seed(5), draft_tokens=draft)
        for draft in (0, 4)
    ]
    assert torch.equal(outputs[0].sequences, outputs[1].sequences) and int(outputs[1].sequences.max()) < VOCAB


def test_coupled_sampling_lets_speculative_switch_keep_teacher_tokens_that_equal_the_draft(models, prompts):
    """Student and teacher sample from the same uniforms: a teacher close to the student mostly draws the student's
    token, so SWITCH with threshold 0 (the teacher writes every token) still ends few speculative rounds; drawn
    independently, two distributions over 40 tokens would rarely agree and nearly every token would end a round."""
    student = models[0]
    teacher = tiny_llama(VOCAB, seed=1).eval()
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.005 * torch.randn(parameter.shape, generator=noise))
    calls = []
    handle = teacher.register_forward_hook(lambda *_: calls.append(1))
    try:
        produced = rollout(student, teacher, *prompts, Intervention("switch", switch_tau0=0.0),
                           Sampling(max_new_tokens=24), -1, PAD, torch.Generator().manual_seed(2), draft_tokens=8)
    finally:
        handle.remove()
    assert produced.teacher_written.all()  # every token is the teacher's sample ...
    assert len(calls) - 1 <= 24 / 3  # ... yet the teacher ran at most once per three tokens after its prefill (5;
    # 24, one pass per token, with independent draws)
