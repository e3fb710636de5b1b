"""Cross-tokenizer objectives (METHODS §3.2–3.4) against plain full-logit references written here from the formulas,
with position pairs walked row by row in Python: values and gradients."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
import torch.nn.functional as F

from llmdistill import DistillConfig, DistillTrainer
from llmdistill.divergences import divergence_per_position
from llmdistill.quickstart.tokenizer import train_tokenizer

from conftest import assert_same_loss_and_gradients, tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def student_tokenizer(examples):
    """A SentencePiece-style BPE (▁ for spaces, prefix space): a different family from the byte-level BPE `tokenizer` the teacher reads."""
    return train_tokenizer([e["prompt"] + e["response"] for e in examples], vocab_size=260, family="sentencepiece")


def make_trainer(tmp_path, teacher_tokenizer, student_tokenizer, examples, objective, **overrides):
    options = dict(
        output_dir=str(tmp_path / "out"), objective=objective, per_device_train_batch_size=4, max_steps=1,
        learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=7, disable_tqdm=True,
        loss_chunk_size=7,
    )
    options.update(overrides)
    rows = datasets.Dataset.from_list([{"prompt": e["prompt"], "output": e["response"]} for e in examples[:8]])
    return DistillTrainer(
        model=tiny_llama(len(student_tokenizer), seed=1), teacher=tiny_gpt2(len(teacher_tokenizer)),
        args=DistillConfig(**options), train_dataset=rows, processing_class=student_tokenizer,
        teacher_processing_class=teacher_tokenizer,
    )


def first_batch(trainer, size=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(size)])


class Reference:
    """Full [B, T, V] logits of both models and the pairs as (row, teacher token, student token) triples."""

    def __init__(self, trainer, batch):
        self.args, self.batch = trainer.args, batch
        self.student_weight = trainer.model.get_output_embeddings().weight
        self.teacher_weight = trainer.teacher.get_output_embeddings().weight
        self.student_hidden = self._hidden(trainer.model, batch["input_ids"], batch["attention_mask"])
        with torch.no_grad():
            self.teacher_hidden = self._hidden(
                trainer.teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"]
            )
        self.student_logits = self.student_hidden @ self.student_weight.T
        self.teacher_logits = self.teacher_hidden @ self.teacher_weight.T
        self.supervised = batch["labels"][:, 1:] != -100
        self.n = int(self.supervised.sum())

    @staticmethod
    def _hidden(model, ids, mask):
        return model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]

    def triples(self, key="aligned_pairs"):
        return [
            (row, int(t), int(s)) for row, pairs in enumerate(self.batch[key]) for t, s in pairs.tolist() if t >= 0
        ]

    def response_positions(self, labels_key):
        labels = self.batch[labels_key]
        return [[p for p in range(labels.shape[1] - 1) if labels[row, p + 1] != -100] for row in range(len(labels))]

    def gold_ce(self):
        logits = self.student_logits[:, :-1][self.supervised]
        return F.cross_entropy(logits, self.batch["labels"][:, 1:][self.supervised], reduction="sum")

    def total(self, kd):
        alpha = self.args.alpha_kd
        return ((1 - alpha) * self.gold_ce() + alpha * kd) / self.n

    def divergence(self, teacher_logits, student_logits, name=None):
        return divergence_per_position(
            teacher_logits, student_logits, name or self.args.divergence, self.args.temperature,
            beta=self.args.jsd_beta, skew_alpha=self.args.skew_alpha, akl_mu=self.args.akl_mu,
        ).sum()


def reference_simple_ctkd(trainer, batch):
    ref = Reference(trainer, batch)
    teacher_ids, student_ids = trainer.objective.teacher_ids, trainer.objective.student_ids
    kd = sum(
        ref.divergence(
            ref.teacher_logits[row, t - 1, teacher_ids][None], ref.student_logits[row, s - 1, student_ids][None]
        )
        for row, t, s in ref.triples()
    )
    return ref.total(kd)


def reference_uld(trainer, batch):
    ref, tau = Reference(trainer, batch), trainer.args.temperature
    kd = 0.0
    student_positions = ref.response_positions("labels")
    teacher_positions = ref.response_positions("teacher_labels")
    for row, (student_row, teacher_row) in enumerate(zip(student_positions, teacher_positions)):
        for s, t in zip(student_row, teacher_row):
            p = torch.softmax(ref.teacher_logits[row, t] / tau, -1).sort(descending=True).values
            q = torch.softmax(ref.student_logits[row, s] / tau, -1).sort(descending=True).values
            width = max(len(p), len(q))
            kd = kd + (F.pad(p, (0, width - len(p))) - F.pad(q, (0, width - len(q)))).abs().sum()
    return ref.total(kd)


def reference_mined(trainer, batch):
    ref, tau = Reference(trainer, batch), trainer.args.temperature
    mapping = trainer.vocab_bridge.teacher_to_student_map(len(ref.teacher_weight))
    reindex = torch.zeros(len(ref.teacher_weight), len(ref.student_weight))
    for teacher_id, student_id in enumerate(mapping.tolist()):
        if 0 <= student_id < len(ref.student_weight):
            reindex[teacher_id, student_id] = 1.0
    paired = {}
    for row, t, s in ref.triples("mined_pairs"):
        if mapping[batch["teacher_input_ids"][row, t]] == batch["input_ids"][row, s]:
            paired[(row, s - 1)] = t - 1
    kd = 0.0
    for row, positions in enumerate(ref.response_positions("labels")):
        for position in positions:
            log_q = torch.log_softmax(ref.student_logits[row, position] / tau, -1)
            if (row, position) in paired:
                target = torch.softmax(ref.teacher_logits[row, paired[(row, position)]] / tau, -1) @ reindex
                target = target / target.sum()
                kd = kd + (torch.xlogy(target, target) - target * log_q).sum()
            else:
                kd = kd - log_q[batch["labels"][row, position + 1]]
    return ref.total(kd)


def reference_dskd_eta(trainer, batch, mapping=None):
    """`mapping`: teacher id → student id (-1: none); by default the bridge's."""
    ref, objective = Reference(trainer, batch), trainer.objective
    projectors = objective.projectors
    teacher_ids, student_ids = projectors.teacher_ids, projectors.student_ids
    # P_st = W_S[:,C] · pinv(W_T[:,C]) from the current head, no gradient through it (closed form).
    s2t = (
        torch.linalg.pinv(ref.teacher_weight[teacher_ids].double()) @ ref.student_weight[student_ids].double()
    ).float().detach()
    if mapping is None:
        mapping = trainer.vocab_bridge.teacher_to_student_map(len(ref.teacher_weight))
    kd_st, ce_ts, agreeing, kd_ts_sum, labelled = 0.0, 0.0, 0, 0.0, 0
    triples = ref.triples()
    for row, t, s in triples:
        h_s, h_t, z_t = ref.student_hidden[row, s - 1], ref.teacher_hidden[row, t - 1], ref.teacher_logits[row, t - 1]
        label = int(mapping[z_t.argmax()])
        if label < 0 or label >= len(ref.student_weight):
            continue  # the teacher's top-1 has no student token: the pair leaves both spaces
        labelled += 1
        kd_st = kd_st + ref.divergence(z_t[None], (h_s @ s2t.T @ ref.teacher_weight.T)[None])
        student_space = projectors.t2s(h_t) @ ref.student_weight.detach().T
        ce_ts = ce_ts + F.cross_entropy(student_space[None], torch.tensor([label]), reduction="sum")
        if int(student_space.argmax()) == label:
            agreeing += 1
            kd_ts_sum = kd_ts_sum + ref.divergence(student_space.detach()[None], ref.student_logits[row, s - 1][None])
    assert labelled > 0
    # DSKDv2's ETA loss: L_ce_ts and L_kd_st are means over the labelled pairs, L_kd_ts over the agreeing ones
    return ref.total((kd_st / labelled + ce_ts / labelled + kd_ts_sum / max(agreeing, 1)) * ref.n)


def reference_cma(trainer, batch):
    ref, attention = Reference(trainer, batch), trainer.objective.projectors
    student_embed, teacher_embed = trainer.model.get_input_embeddings(), trainer.teacher.get_input_embeddings()
    student_positions = ref.response_positions("labels")
    teacher_positions = ref.response_positions("teacher_labels")

    def gathered(embed, ids_key, labels_key, positions, hidden):
        ids, labels = batch[ids_key], batch[labels_key]
        rows = [(row, p) for row, row_positions in enumerate(positions) for p in row_positions]
        inputs = torch.stack([ids[row, p] for row, p in rows])
        targets = torch.stack([labels[row, p + 1] for row, p in rows])
        index = torch.cat([embed(inputs), embed(targets)], -1).detach()
        return rows, index, torch.stack([hidden[row, p] for row, p in rows]), embed(targets).detach(), targets

    s_rows, s_index, s_hidden, _, s_targets = gathered(
        student_embed, "input_ids", "labels", student_positions, ref.student_hidden
    )
    t_rows, t_index, t_hidden, t_target_embeds, _ = gathered(
        teacher_embed, "teacher_input_ids", "teacher_labels", teacher_positions, ref.teacher_hidden
    )
    query = attention.query(s_index)
    keys = t_index / t_index.std()
    scores = query @ keys.T / math.sqrt(keys.shape[-1])
    same_row = torch.tensor([[a[0] == b[0] for b in t_rows] for a in s_rows])
    scores = scores.masked_fill(~same_row, -1e30)
    t2s_hidden = torch.softmax(scores, -1) @ attention.t2s(t_hidden / t_hidden.std() + t_target_embeds / t_target_embeds.std())
    student_space = t2s_hidden @ ref.student_weight.detach().T
    student_logits = torch.stack([ref.student_logits[row, p] for row, p in s_rows])
    # as the official CMA code: Σ D over the agreeing positions only, divided by all N in ref.total
    agree = student_space.argmax(-1) == s_targets
    kd_ts = (
        divergence_per_position(student_space.detach(), student_logits, trainer.args.divergence, trainer.args.temperature)
        * agree
    ).sum()
    ce_ts = F.cross_entropy(student_space, s_targets, reduction="sum")
    s2t_hidden = torch.softmax(scores.T, -1) @ attention.s2t(s_hidden)
    teacher_logits = torch.stack([ref.teacher_logits[row, p] for row, p in t_rows])
    kd_st = ref.divergence(teacher_logits, s2t_hidden @ ref.teacher_weight.T.detach(), name="fkl")
    return ref.total(kd_ts + ce_ts + kd_st)


REFERENCES = {
    "simple_ctkd": reference_simple_ctkd,
    "uld": reference_uld,
    "mined": reference_mined,
    "dskd_eta": reference_dskd_eta,
    "cma": reference_cma,
}


def trainable(trainer):
    projectors = trainer.projectors
    return list(trainer.model.parameters()) + ([p for p in projectors.parameters() if p.requires_grad] if projectors else [])


@pytest.mark.parametrize(
    "objective, overrides",
    [
        ("simple_ctkd", {}),
        ("simple_ctkd", {"divergence": "jsd", "temperature": 2.0}),
        ("uld", {}),
        ("uld", {"temperature": 2.0}),
        ("mined", {}),
        ("mined", {"temperature": 2.0}),
        ("dskd_eta", {}),
        ("dskd_eta", {"divergence": "rkl"}),
        ("cma", {}),
        ("cma", {"divergence": "srkl", "temperature": 2.0}),
    ],
)
def test_loss_and_gradients_equal_the_plain_reference(
    tmp_path, tokenizer, student_tokenizer, examples, objective, overrides
):
    trainer = make_trainer(tmp_path, tokenizer, student_tokenizer, examples, objective, **overrides)
    batch = first_batch(trainer)
    ours = trainer.compute_loss(trainer.model, batch)
    reference = REFERENCES[objective](trainer, batch)
    assert_same_loss_and_gradients(ours, reference, trainable(trainer))


def test_dskd_eta_pairs_whose_teacher_top1_has_no_student_token_leave_both_spaces(
    tmp_path, tokenizer, student_tokenizer, examples
):
    """Here every teacher top-1 maps: knock out the student ids of some, and those pairs leave the teacher space too
    (DSKDv2 fills s2t_hiddens_align only for mapped pairs), and both pair means count only the pairs that stay."""
    trainer = make_trainer(tmp_path, tokenizer, student_tokenizer, examples, "dskd_eta")
    batch = first_batch(trainer)
    with torch.no_grad():
        top1 = Reference(trainer, batch).teacher_logits.argmax(-1).unique()
    mapping = trainer.objective.teacher_to_student.clone()
    mapping[top1[::2]] = -1
    trainer.objective.teacher_to_student = mapping
    ours = trainer.compute_loss(trainer.model, batch)
    assert_same_loss_and_gradients(ours, reference_dskd_eta(trainer, batch, mapping), trainable(trainer))


def test_dskd_eta_means_count_the_pairs_of_every_rank(monkeypatch, tmp_path, tokenizer, student_tokenizer, examples):
    """Two ranks, each with half of the batch and every count summed over both (simulated: sum_over_ranks returns the
    two halves' counts added), give the loss and gradients of one process with the whole batch."""
    import llmdistill.objectives.dskd as dskd

    trainer = make_trainer(tmp_path, tokenizer, student_tokenizer, examples, "dskd_eta")
    rows = [trainer.train_dataset[i] for i in range(4)]
    halves = [trainer.data_collator(rows[:2]), trainer.data_collator(rows[2:])]
    whole = trainer.data_collator(rows)
    tokens = int((whole["labels"][:, 1:] != -100).sum())
    counts = []
    monkeypatch.setattr(dskd, "sum_over_ranks", lambda values: counts.append(values) or values)
    for half in halves:
        trainer.compute_loss(trainer.model, half, num_items_in_batch=tokens)
    per_half = len(counts) // 2
    summed = [mine + theirs for mine, theirs in zip(counts[:per_half], counts[per_half:], strict=True)]
    calls = iter(summed + summed)
    monkeypatch.setattr(dskd, "sum_over_ranks", lambda values: next(calls))
    two_ranks = sum(trainer.compute_loss(trainer.model, half, num_items_in_batch=tokens) for half in halves)
    monkeypatch.undo()
    assert_same_loss_and_gradients(two_ranks, trainer.compute_loss(trainer.model, whole), trainable(trainer))


@pytest.mark.parametrize("objective", sorted(REFERENCES))
def test_one_training_step_logs_the_aligned_fraction_and_keeps_the_teacher_frozen(
    tmp_path, tokenizer, student_tokenizer, examples, objective
):
    trainer = make_trainer(tmp_path, tokenizer, student_tokenizer, examples, objective)
    before = [p.detach().clone() for p in trainer.teacher.parameters()]
    trainer.train()
    logged = trainer.state.log_history[0]
    assert 0 < logged["aligned_fraction"] <= 1
    assert math.isfinite(logged["loss"]) and logged["kd"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.teacher.parameters()))


def test_a_same_vocabulary_objective_with_different_tokenizers_names_the_cross_tokenizer_ones(
    tmp_path, tokenizer, student_tokenizer, examples
):
    with pytest.raises(ValueError, match="dskd_eta, uld, mined, cma, simple_ctkd"):
        make_trainer(tmp_path, tokenizer, student_tokenizer, examples, "vanilla")


def test_pretokenised_data_without_the_teacher_view_is_refused(tmp_path, tokenizer, student_tokenizer, examples):
    rows = datasets.Dataset.from_list([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}])
    with pytest.raises(ValueError, match="teacher_input_ids"):
        DistillTrainer(
            model=tiny_llama(len(student_tokenizer)), teacher=tiny_gpt2(len(tokenizer)),
            args=DistillConfig(output_dir=str(tmp_path), objective="uld", report_to=[], use_cpu=True),
            train_dataset=rows, processing_class=student_tokenizer, teacher_processing_class=tokenizer,
        )
