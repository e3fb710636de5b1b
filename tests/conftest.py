"""Tiny real models and data shared by the tests: trained-in-test tokenizer, GPT-2 teacher, Llama student."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from llmdistill.models import load_tokenizer
from llmdistill.quickstart.task import make_examples
from llmdistill.quickstart.tokenizer import train_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason="../shared/data (real tokenizers and datasets) is not beside the checkout"
)


@pytest.fixture(scope="session")
def examples() -> list[dict]:
    return make_examples(64, seed=1, subtasks=["reverse", "copy", "spell", "count"])


@pytest.fixture(scope="session")
def tokenizer(examples):
    return train_tokenizer([e["prompt"] + e["response"] for e in examples], vocab_size=300)


def tiny_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=256, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return GPT2LMHeadModel(config)


def tiny_llama(vocab_size: int, seed: int = 0, hidden_size: int = 24) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@pytest.fixture()
def model_dirs(tmp_path, tokenizer) -> tuple[Path, Path]:
    """(teacher folder, student folder): a GPT-2-style teacher and a Llama-style student, same tokenizer."""
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    for directory, model in ((teacher_dir, tiny_gpt2(len(tokenizer))), (student_dir, tiny_llama(len(tokenizer)))):
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return teacher_dir, student_dir


def assert_same_loss_and_gradients(ours: torch.Tensor, reference: torch.Tensor, parameters: list) -> None:
    """Loss and the gradient of every parameter equal a reference's; a parameter the reference does not reach gets
    no gradient (or zeros)."""
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
    for mine, theirs in zip(
        torch.autograd.grad(ours, parameters, allow_unused=True),
        torch.autograd.grad(reference, parameters, allow_unused=True),
        strict=True,
    ):
        if theirs is None:
            assert mine is None or mine.abs().max() == 0
        else:
            torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-6)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture()
def train_file(tmp_path, examples) -> Path:
    rows = [{"prompt": e["prompt"], "output": e["response"]} for e in examples]
    return write_jsonl(tmp_path / "train.jsonl", rows)


REAL_TOKENIZER_FAMILIES = ("gpt2", "gpt-neox-20b", "llama2", "mistral-7b-v0.1", "qwen3")


@pytest.fixture(scope="session")
def real_tokenizers(tmp_path_factory) -> dict:
    """The shared real tokenizers by family. qwen3's tokenizer.json is stored gzipped and is unpacked here;
    gpt-neox-20b ships only tokenizer.json, so its EOS (<|endoftext|>) is named here as its model card does."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data (real tokenizers) is not beside the checkout")
    loaded = {}
    for family in REAL_TOKENIZER_FAMILIES:
        folder = SHARED_DATA / "tokenizers" / family
        if (folder / "tokenizer.json.gz").is_file():
            unpacked = tmp_path_factory.mktemp(family)
            for file in folder.iterdir():
                if file.name.endswith(".json.gz"):
                    with gzip.open(file) as packed, open(unpacked / file.name[: -len(".gz")], "wb") as plain:
                        shutil.copyfileobj(packed, plain)
                elif file.suffix == ".json":
                    shutil.copy(file, unpacked / file.name)
            folder = unpacked
        if family == "gpt-neox-20b":
            tokenizer = AutoTokenizer.from_pretrained(folder, eos_token="<|endoftext|>")
            folder = tmp_path_factory.mktemp(family)
            tokenizer.save_pretrained(folder)
        loaded[family] = load_tokenizer(str(folder))
    return loaded
