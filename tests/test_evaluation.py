"""The papers' evaluation protocol: ROUGE-L as rouge-score computes it, GSM8K's final number, reproducible sampled
generation, batched = one-by-one greedy generation, and `llmdistill eval` end to end on real evaluation files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from rouge_score import rouge_scorer

from llmdistill.evaluation import (
    Protocol, final_number, gsm8k_exact_match, load_eval_set, rouge_l, rouge_l_best, sample_responses,
)

from conftest import SHARED_DATA, needs_shared_data, tiny_gpt2, tiny_llama

PREDICTIONS = ["The cats were running quickly home.", "Paris is the capital.", "", "42 apples"]
REFERENCES = ["A cat runs home quickly.", "The capital of France is Paris.", "Nothing here.", "There are 42 apples."]


def test_rouge_l_equals_rouge_score_with_stemming():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = 100 * sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)) / 4
    assert rouge_l(PREDICTIONS, REFERENCES) == pytest.approx(expected)
    assert rouge_l_best(PREDICTIONS, [[r] for r in REFERENCES]) == pytest.approx(expected)
    assert expected > 0 and scorer.score("cats running", "cat runs")["rougeL"].fmeasure == 1.0  # stemming is on


def test_rouge_l_with_several_references_takes_the_best():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    references = [["unrelated words", REFERENCES[0]], [REFERENCES[1], "Paris"]]
    expected = [max(scorer.score(r, p)["rougeL"].fmeasure for r in refs) for p, refs in zip(PREDICTIONS, references)]
    assert rouge_l_best(PREDICTIONS[:2], references) == pytest.approx(100 * sum(expected) / 2)


@needs_shared_data
def test_gsm8k_final_numbers_of_the_real_references():
    test_set = load_eval_set(SHARED_DATA / "datasets" / "gsm8k" / "test.jsonl")
    assert test_set.gsm8k and test_set.name == "gsm8k" and len(test_set.prompts) == 1319
    for (reference,) in test_set.references:
        written = reference.rsplit("####", 1)[1].strip().replace(",", "")
        assert final_number(reference) == written
    assert gsm8k_exact_match([refs[0] for refs in test_set.references], test_set.references) == 100.0


def test_final_number_of_free_text_answers():
    assert final_number("She makes 9 * 2 = $18 every day.") == "18"
    assert final_number("so 1,234.50 dollars") == "1234.5"
    assert final_number("#### -3\nthen 7") == "-3"
    assert final_number("no digits") is None
    assert gsm8k_exact_match(["The answer is 18.", "It is 17", "none"], [["x #### 18"], ["#### 18"], ["#### 1"]]) == (
        pytest.approx(100 / 3)
    )


@pytest.fixture(scope="module")
def student(tokenizer):
    return tiny_llama(len(tokenizer), seed=3)


def test_sampled_generation_is_reproducible_for_a_seed(student, tokenizer, examples):
    prompts = [e["prompt"] for e in examples[:6]]
    protocol = Protocol(max_length=96, batch_size=4)
    first, again = (sample_responses(student, tokenizer, prompts, protocol, seed=10) for _ in range(2))
    assert first == again
    assert sample_responses(student, tokenizer, prompts, protocol, seed=20) != first


def test_batched_greedy_generation_equals_one_prompt_at_a_time(student, tokenizer, examples):
    prompts = [e["prompt"] for e in examples[:5]]  # different lengths: the batch is left-padded
    protocol = Protocol(max_length=80, temperature=0.0, batch_size=5)
    batched = sample_responses(student, tokenizer, prompts, protocol, seed=0)
    alone = [sample_responses(student, tokenizer, [p], protocol, seed=0)[0] for p in prompts]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1
    assert batched == alone


@needs_shared_data
def test_llmdistill_eval_on_dolly_s_ni_and_gsm8k_with_a_teacher(tmp_path, model_dirs):
    teacher_dir, student_dir = model_dirs
    data = [SHARED_DATA / "datasets" / "minillm-kd-eval" / name / "valid.jsonl" for name in ("dolly", "sinst-11_")]
    data.append(SHARED_DATA / "datasets" / "gsm8k" / "test.jsonl")
    result = subprocess.run(
        [sys.executable, "-m", "llmdistill", "eval", str(student_dir), "--data", *map(str, data), "--teacher",
         str(teacher_dir), "--seeds", "10", "20", "--limit", "3", "--max-prompt-length", "96", "--max-length", "128",
         "--output-dir", str(tmp_path / "eval")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(results["datasets"]) == {"dolly", "sinst-11_", "gsm8k"}
    assert 0 <= results["datasets"]["dolly"]["rouge_l"] <= 100 and "rouge_l_std" in results["datasets"]["dolly"]
    assert 0 <= results["datasets"]["gsm8k"]["exact_match"] <= 100
    for row in results["datasets"].values():
        assert row["teacher_student_kl"] >= 0 and 0 <= row["top1_agreement"] <= 100
    predictions = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 3 * 2 * 3
    assert "| dolly | rouge_l |" in result.stdout


def test_evaluation_during_training_reports_rouge_l_and_picks_the_best_checkpoint_by_it(tmp_path, tokenizer, examples):
    """SFT memorising 8 examples, evaluated on them every 20 steps: ROUGE-L of its greedy responses rises, and the
    best checkpoint is the first one with the highest ROUGE-L."""
    from test_trainer import make_trainer

    trainer = make_trainer(
        tmp_path, tokenizer, examples[:8], eval_examples=examples[:8], objective="sft", max_steps=60,
        learning_rate=1e-2, optim="adamw_torch", eval_strategy="steps", eval_steps=20, save_strategy="steps",
        save_steps=20, eval_generation_size=8, max_new_tokens=8, metric_for_best_model="rouge_l",
        greater_is_better=True, load_best_model_at_end=True, per_device_eval_batch_size=4,
    )
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_rouge_l" in entry]
    assert [entry["step"] for entry in evaluations] == [20, 40, 60]
    for entry in evaluations:
        assert 0 <= entry["eval_rouge_l"] <= 100 and 0 <= entry["eval_exact_match"] <= 100 and entry["eval_loss"] > 0
    assert evaluations[-1]["eval_rouge_l"] > evaluations[0]["eval_rouge_l"]
    best = max(evaluations, key=lambda entry: entry["eval_rouge_l"])
    assert trainer.state.best_metric == best["eval_rouge_l"]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")


@needs_shared_data
def test_fidelity_across_tokenizers_cuts_long_prompts_to_fit_both_readers(tmp_path, tokenizer, examples):
    """Self-Instruct prompts are longer than the prompt budget; the teacher's tokenizer splits text into more tokens
    than the student's, so a prompt cut to the student's budget alone would be too long for the teacher."""
    from llmdistill.evaluation import evaluate_model
    from llmdistill.quickstart.tokenizer import train_tokenizer

    data = SHARED_DATA / "datasets" / "minillm-kd-eval" / "self-inst" / "valid.jsonl"
    texts = [e["prompt"] + e["response"] for e in examples]
    student_tokenizer = train_tokenizer(texts, vocab_size=300, family="sentencepiece")
    prompts = load_eval_set(data, limit=3).prompts
    assert all(len(tokenizer(p)["input_ids"]) > len(student_tokenizer(p)["input_ids"]) > 64 for p in prompts)
    for directory, model, reader in ((tmp_path / "teacher", tiny_gpt2(len(tokenizer)), tokenizer),
                                     (tmp_path / "student", tiny_llama(len(student_tokenizer)), student_tokenizer)):
        model.save_pretrained(directory)
        reader.save_pretrained(directory)
    protocol = Protocol(max_prompt_length=64, max_length=96, temperature=0.0)
    results = evaluate_model(tmp_path / "student", [data], tmp_path / "eval", tmp_path / "teacher", (10,), protocol,
                             limit=3, progress=False)
    row = results["datasets"]["self-inst"]
    assert row["teacher_student_kl"] >= 0 and 0 <= row["top1_agreement"] <= 100


def _with_chat_template(tokenizer):
    chat = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>", pad_token="<pad>")
    chat.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return chat


@needs_shared_data
def test_chat_template_evaluation_gives_each_request_as_a_user_turn(tmp_path, tokenizer):
    """Instruct models are asked the way they were tuned: Dolly's instruction and input, GSM8K's bare question, in
    the model's chat template; references are scored in the same form (CE, and KL with a teacher)."""
    from llmdistill.evaluation import evaluate_model, model_prompts

    chat = _with_chat_template(tokenizer)
    dolly = SHARED_DATA / "datasets" / "minillm-kd-eval" / "dolly" / "valid.jsonl"
    gsm8k = SHARED_DATA / "datasets" / "gsm8k" / "test.jsonl"
    first_dolly, first_gsm8k = (json.loads(path.open().readline()) for path in (dolly, gsm8k))
    protocol = Protocol(max_prompt_length=200, max_length=224, temperature=0.0, batch_size=2, chat_template=True)
    [dolly_prompt] = model_prompts(load_eval_set(dolly, limit=1), chat, protocol)
    assert dolly_prompt == f"<user>{first_dolly['instruction']}\n\n{first_dolly['input']}\n<assistant>"
    folders = {}
    for name, model in (("teacher", tiny_gpt2(len(chat))), ("student", tiny_llama(len(chat)))):
        model.save_pretrained(tmp_path / name)
        chat.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    results = evaluate_model(folders["student"], [gsm8k], tmp_path / "eval", folders["teacher"], (0,), protocol,
                             limit=2, progress=False)
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert prompts[0] == f"<user>{first_gsm8k['question']}\n<assistant>"
    row = results["datasets"]["gsm8k"]
    assert 0 < row["reference_ce"] < 20 and row["teacher_student_kl"] > 0
    plain = evaluate_model(folders["student"], [gsm8k], tmp_path / "plain", None, (0,),
                           Protocol(max_prompt_length=200, max_length=224, temperature=0.0, batch_size=2), limit=2,
                           progress=False)
    assert plain["datasets"]["gsm8k"]["reference_ce"] != row["reference_ce"]


def test_chat_template_evaluation_of_a_model_without_one_names_the_flag(tokenizer):
    from llmdistill.errors import DataError
    from llmdistill.evaluation import EvalSet, model_prompts

    eval_set = EvalSet("x", ["### Instruction:\nhi\n\n### Response:\n"], [["hello"]], False, ["hi"])
    with pytest.raises(DataError, match="--chat-template"):
        model_prompts(eval_set, tokenizer, Protocol(chat_template=True))
    assert model_prompts(eval_set, _with_chat_template(tokenizer), Protocol(chat_template=True)) == ["<user>hi\n<assistant>"]
