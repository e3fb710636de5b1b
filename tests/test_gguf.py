"""Models given as GGUF files, as users have them: a `.gguf` path, or a folder holding one. A tiny llama GGUF with a
byte-level BPE tokenizer in its metadata is written here with the gguf package, then loaded through transformers'
own GGUF support, trained one step, saved as a plain HF folder and reopened."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from llmdistill.cli import main
from llmdistill.errors import ModelError
from llmdistill.models import check_model_source, load_config, load_model, load_tokenizer

from conftest import write_jsonl

gguf = pytest.importorskip("gguf")

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 16, 32, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
# Byte-level BPE: the 256 byte symbols, a few merges, then the end-of-text token (stored as a control token).
MERGES = ["Ġ t", "h e", "Ġt he"]
TOKENS = [*bytes_to_unicode().values(), "Ġt", "he", "Ġthe", "<|endoftext|>"]
EOS = len(TOKENS) - 1


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    """GGUF tensor names of a llama model, with the shapes of their HF weights ([out, in])."""
    shapes = {"token_embd.weight": (len(TOKENS), HIDDEN), "output_norm.weight": (HIDDEN,),
              "output.weight": (len(TOKENS), HIDDEN)}
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }
    return shapes


def write_gguf(path: Path, architecture: str = "llama") -> dict[str, np.ndarray]:
    """Writes a tiny float32 GGUF of `architecture` with llama's metadata, tensors and tokenizer; returns its
    tensors by GGUF name."""
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in tensor_shapes().items()}
    writer = gguf.GGUFWriter(str(path), architecture)  # writes general.architecture itself
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(TOKENS))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_merges(MERGES)
    writer.add_token_types([gguf.TokenType.NORMAL] * EOS + [gguf.TokenType.CONTROL])
    writer.add_bos_token_id(EOS)
    writer.add_eos_token_id(EOS)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture(scope="module")
def gguf_folder(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """(a folder holding only tiny.gguf, the tensors written to it)."""
    folder = tmp_path_factory.mktemp("gguf")
    return folder, write_gguf(folder / "tiny.gguf")


def unpermuted_weights(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under their GGUF names, but q and k: the loader reorders their rows (llama.cpp permutes
    them for its rotary embedding), so those are compared as sets of rows."""
    weights = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight,
               "output.weight": model.lm_head.weight}
    for i, layer in enumerate(model.model.layers):
        weights |= {
            f"blk.{i}.attn_norm.weight": layer.input_layernorm.weight,
            f"blk.{i}.attn_v.weight": layer.self_attn.v_proj.weight,
            f"blk.{i}.attn_output.weight": layer.self_attn.o_proj.weight,
            f"blk.{i}.ffn_norm.weight": layer.post_attention_layernorm.weight,
            f"blk.{i}.ffn_gate.weight": layer.mlp.gate_proj.weight, f"blk.{i}.ffn_up.weight": layer.mlp.up_proj.weight,
            f"blk.{i}.ffn_down.weight": layer.mlp.down_proj.weight,
        }
    return weights


def same_rows(loaded: torch.Tensor, written: np.ndarray) -> bool:
    return sorted(map(tuple, loaded.detach().numpy().tolist())) == sorted(map(tuple, written.tolist()))


@pytest.mark.parametrize("as_folder", [False, True], ids=["file", "folder"])
def test_a_gguf_file_or_its_folder_loads_the_weights_written(gguf_folder, as_folder):
    folder, tensors = gguf_folder
    model = load_model(str(folder if as_folder else folder / "tiny.gguf"), field="student_model_name_or_path")
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert not model.is_quantized and not hasattr(model.config, "quantization_config")
    for name, weight in unpermuted_weights(model).items():
        torch.testing.assert_close(weight.detach(), torch.from_numpy(tensors[name]), rtol=0, atol=0, msg=name)
    for i, layer in enumerate(model.model.layers):
        assert same_rows(layer.self_attn.q_proj.weight, tensors[f"blk.{i}.attn_q.weight"])
        assert same_rows(layer.self_attn.k_proj.weight, tensors[f"blk.{i}.attn_k.weight"])


def test_the_gguf_tokenizer_is_fast_and_encodes_text(gguf_folder):
    folder, _ = gguf_folder
    for source in (folder, folder / "tiny.gguf"):
        tokenizer = load_tokenizer(str(source), field="student_model_name_or_path")
        assert tokenizer.is_fast and tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id == EOS
        ids = tokenizer("the cat", add_special_tokens=False)["input_ids"]
        assert TOKENS.index("Ġthe") in tokenizer(" the", add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == "the cat"


def test_a_gguf_student_trains_and_saves_as_a_plain_hf_folder(gguf_folder, tmp_path):
    folder, _ = gguf_folder
    model = load_model(str(folder / "tiny.gguf"))
    tokenizer = load_tokenizer(str(folder / "tiny.gguf"))
    ids = tokenizer(["the cat sat on the mat"], return_tensors="pt")["input_ids"]
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(parameter.grad is not None for parameter in model.parameters())

    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    reopened = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert isinstance(reopened, LlamaForCausalLM)
    saved, again = model.state_dict(), reopened.state_dict()
    assert saved.keys() == again.keys()
    for name in saved:
        torch.testing.assert_close(again[name], saved[name], rtol=0, atol=0, msg=name)


def test_the_gguf_config_is_read_from_its_metadata(gguf_folder):
    folder, _ = gguf_folder
    config = load_config(str(folder / "tiny.gguf"), field="teacher_model_name_or_path")
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", HIDDEN, LAYERS)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (HEADS, KV_HEADS, len(TOKENS))


def test_the_cli_distills_a_gguf_teacher_into_a_gguf_student_and_saves_an_hf_folder(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "student").mkdir()
    write_gguf(tmp_path / "teacher" / "teacher.gguf")
    write_gguf(tmp_path / "student" / "student.gguf")
    rows = [{"prompt": f"say the {word}", "output": f" the {word}"} for word in ("cat", "dog", "hat", "mat")] * 2
    main([
        "train", "--teacher_model_name_or_path", str(tmp_path / "teacher" / "teacher.gguf"),
        "--student_model_name_or_path", str(tmp_path / "student"),
        "--dataset_name_or_path", str(write_jsonl(tmp_path / "train.jsonl", rows)),
        "--output_dir", str(tmp_path / "run"),
        "--max_steps", "1", "--per_device_train_batch_size", "4", "--use_cpu", "true", "--report_to", "none",
    ])
    assert "quantization_config" not in json.loads((tmp_path / "run" / "config.json").read_text())
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "run"), LlamaForCausalLM)
    assert (tmp_path / "run" / "tokenizer.json").is_file()


def test_a_lora_student_on_a_gguf_base_merges_into_a_plain_hf_folder(tmp_path):
    """peft's own loader cannot open a GGUF base; `llmdistill merge` loads it the way training did."""
    pytest.importorskip("peft", reason="LoRA needs the peft extra")
    (tmp_path / "student").mkdir()
    write_gguf(tmp_path / "student" / "student.gguf")
    rows = [{"prompt": f"say the {word}", "output": f" the {word}"} for word in ("cat", "dog", "hat", "mat")] * 2
    main([
        "train", "--student_model_name_or_path", str(tmp_path / "student" / "student.gguf"), "--objective", "sft",
        "--use_peft", "true", "--lora_r", "2", "--lora_dropout", "0", "--learning_rate", "1e-1",
        "--dataset_name_or_path", str(write_jsonl(tmp_path / "train.jsonl", rows)),
        "--output_dir", str(tmp_path / "run"),
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", "true", "--report_to", "none",
    ])
    main(["merge", str(tmp_path / "run"), str(tmp_path / "merged")])

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert isinstance(merged, LlamaForCausalLM)
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    base = load_model(str(tmp_path / "student" / "student.gguf"))
    ids = torch.tensor([[5, 70, 200, 257]])
    with torch.no_grad():
        assert not torch.allclose(merged(ids).logits, base(ids).logits), "the adapter's update was not merged in"


def test_an_architecture_transformers_cannot_read_is_one_line_naming_the_field_and_the_architecture(tmp_path):
    write_gguf(tmp_path / "odd.gguf", architecture="rwkv7")
    source = str(tmp_path / "odd.gguf")
    for attempt in (lambda: check_model_source(source, "student_model_name_or_path"),
                    lambda: load_model(source, field="student_model_name_or_path"),
                    lambda: load_tokenizer(source, field="student_model_name_or_path")):
        with pytest.raises(ModelError) as raised:
            attempt()
        message = str(raised.value)
        assert "\n" not in message
        assert message.startswith(f"student_model_name_or_path={source!r}: transformers cannot load this GGUF")
        assert "'rwkv7'" in message and "Convert the model to a Hugging Face folder" in message
        assert "llama" in message  # the architectures it can read


def test_check_model_source_takes_a_gguf_file_or_its_folder_and_still_refuses_other_files(gguf_folder, tmp_path):
    folder, _ = gguf_folder
    check_model_source(str(folder / "tiny.gguf"), "teacher_model_name_or_path")
    check_model_source(str(folder), "teacher_model_name_or_path")
    check_model_source(str(folder / "tiny.gguf"), "teacher_tokenizer_name_or_path", tokenizer_only=True)

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelError) as raised:
        check_model_source(str(weights), "teacher_model_name_or_path")
    assert str(raised.value) == (
        f"teacher_model_name_or_path={str(weights)!r} is a file: give the folder that holds it with config.json and "
        "the weights."
    )


def test_a_folder_of_several_ggufs_asks_which_one(gguf_folder, tmp_path):
    folder, _ = gguf_folder
    for name in ("a-Q4_K_M.gguf", "a-Q8_0.gguf"):
        (tmp_path / name).write_bytes((folder / "tiny.gguf").read_bytes())
    with pytest.raises(ModelError, match=r"holds 2 \.gguf files \(a-Q4_K_M\.gguf, a-Q8_0\.gguf\): give the path"):
        check_model_source(str(tmp_path), "teacher_model_name_or_path")


def test_a_missing_gguf_file_is_named(tmp_path):
    missing = str(tmp_path / "nowhere.gguf")
    with pytest.raises(ModelError) as raised:
        check_model_source(missing, "student_model_name_or_path")
    assert str(raised.value) == (
        f"student_model_name_or_path={missing!r}: no such file. Give a .gguf file, or the folder that save_pretrained "
        "wrote."
    )


def test_without_the_gguf_package_the_error_says_what_to_install(gguf_folder):
    """In a fresh interpreter where `import gguf` finds nothing (sys.modules entry None: Python's own way to block
    an import), as on a machine without the package."""
    folder, _ = gguf_folder
    script = (
        "import sys; sys.modules['gguf'] = None\n"
        "from llmdistill.models import check_model_source\n"
        f"check_model_source({str(folder / 'tiny.gguf')!r}, 'student_model_name_or_path')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"llmdistill.errors.ModelError: student_model_name_or_path={str(folder / 'tiny.gguf')!r} is a GGUF file, "
        "and reading one needs the gguf package: pip install 'llmdistill[gguf]'."
    )
