"""Loading teacher and student models and tokenizers, and turning gathered hidden states into logits."""

from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase,
)
from transformers.utils import is_gguf_available

from .errors import ModelError, first_line, is_hub_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}

# What reading a GGUF raises for an unknown architecture, missing metadata, or a damaged or truncated file.
GGUF_ERRORS = (OSError, ValueError, KeyError, IndexError, NotImplementedError, struct.error)


def check_model_source(
    name_or_path: str, field: str, trust_remote_code: bool = False, tokenizer_only: bool = False
) -> None:
    """Raise ModelError, before any weights load, unless `name_or_path` is a model folder (config.json, or a saved
    adapter), a GGUF file (or a folder holding one), or a hub model this machine can reach; `field` is the option
    that named it. `tokenizer_only`: only that a named folder exists (`load_tokenizer` reports what is wrong in it)."""
    path = Path(name_or_path).expanduser()
    if (path / "adapter_config.json").is_file():
        return
    if not path.exists() and (_is_gguf(path) or not is_hub_name(name_or_path)):
        raise ModelError(_not_loadable(name_or_path, field, None, "model"))
    if path.is_file() and resolve_gguf(name_or_path, field)[1] is None:
        raise ModelError(
            f"{field}={name_or_path!r} is a file: give the folder that holds it with config.json and the weights."
        )
    if not tokenizer_only:
        load_config(name_or_path, trust_remote_code, field)


def load_config(name_or_path: str, trust_remote_code: bool = False, field: str = "model") -> PreTrainedConfig:
    """The model's config, from its config.json or its GGUF's metadata, without loading the weights."""
    folder, gguf_file = resolve_gguf(name_or_path, field)
    try:
        return AutoConfig.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except GGUF_ERRORS if gguf_file else (OSError, ValueError) as error:
        raise ModelError(_not_loadable(name_or_path, field, error, "model", _joined(folder, gguf_file))) from error


def resolve_gguf(name_or_path: str, field: str) -> tuple[str, str | None]:
    """(what to hand from_pretrained, the GGUF file's name in it or None). A `.gguf` file, or a folder without
    config.json that holds exactly one, loads from its folder with `gguf_file=`; anything else passes unchanged."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(entry for entry in path.iterdir() if _is_gguf(entry) and entry.is_file())
        if len(found) > 1:
            raise ModelError(
                f"{field}={name_or_path!r} holds {len(found)} .gguf files ({', '.join(f.name for f in found)}): "
                "give the path of the one to load."
            )
        path = found[0] if found else path
    if not (_is_gguf(path) and path.is_file()):
        return name_or_path, None
    if not is_gguf_available():
        raise ModelError(
            f"{field}={name_or_path!r} is a GGUF file, and reading one needs the gguf package: "
            "pip install 'llmdistill[gguf]'."
        )
    return str(path.parent), path.name


def _is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def _joined(folder: str, gguf_file: str | None) -> Path | None:
    return Path(folder, gguf_file) if gguf_file else None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, field: str = "tokenizer"
                   ) -> PreTrainedTokenizerBase:
    """A fast tokenizer (offsets are needed for alignment) with a pad token; `field` names the option for errors."""
    folder, gguf_file = resolve_gguf(name_or_path, field)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except GGUF_ERRORS if gguf_file else (OSError, ValueError) as error:
        raise ModelError(_not_loadable(name_or_path, field, error, "tokenizer", _joined(folder, gguf_file))) from error
    where = f"{field}={name_or_path!r}"
    if not tokenizer.is_fast:
        raise ModelError(
            f"{where} is a slow (Python) tokenizer without character offsets: provide a tokenizer.json (e.g. "
            "`AutoTokenizer.from_pretrained(path, use_fast=True).save_pretrained(path)` with the `tokenizers` "
            "package installed)."
        )
    if not tokenizer("a b", add_special_tokens=False)["input_ids"]:
        raise ModelError(
            f"{where}: the tokenizer turns text into no tokens: its vocabulary did not load. Check that the folder "
            "holds tokenizer.json (not only a compressed tokenizer.json.gz) or its vocab/merges files."
        )
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{where}: the tokenizer has no eos_token: set one in its tokenizer_config.json.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja",
)


def same_tokenizer_files(first: str, second: str) -> bool:
    """Whether two local folders hold byte-identical tokenizer files (so one loaded tokenizer serves both)."""
    folders = [Path(first).expanduser(), Path(second).expanduser()]
    if not all(folder.is_dir() for folder in folders) or not (folders[0] / "tokenizer.json").is_file():
        return False
    for name in TOKENIZER_FILES:
        files = [folder / name for folder in folders]
        if files[0].is_file() != files[1].is_file():
            return False
        if files[0].is_file() and files[0].read_bytes() != files[1].read_bytes():
            return False
    return True


def load_model(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False, field: str = "model"
               ) -> PreTrainedModel:
    """A causal LM from a folder, a hub name or a GGUF (unpacked to plain float weights that train and save)."""
    folder, gguf_file = resolve_gguf(name_or_path, field)
    options = {"gguf_file": gguf_file, **_dequantized()} if gguf_file else {}
    try:
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **options
        )
    except GGUF_ERRORS if gguf_file else (OSError,) as error:
        raise ModelError(_not_loadable(name_or_path, field, error, "model", _joined(folder, gguf_file))) from error


def _dequantized() -> dict:
    """from_pretrained options that unpack every GGUF weight into a plain float model. Without them recent
    transformers may keep the weights packed or stay marked quantized: not trainable, and save_pretrained refuses.
    Older transformers have no GgufConfig and always unpack."""
    gguf_config = getattr(transformers, "GgufConfig", None)
    return {"quantization_config": gguf_config(dequantize=True)} if gguf_config else {}


def _not_loadable(
    name_or_path: str, field: str, error: Exception | None, kind: str, gguf_file: Path | None = None
) -> str:
    """Why `name_or_path` gave no `kind`: a GGUF transformers cannot read, a folder without one, a missing path, or a
    hub name this machine cannot reach (`error`: what loading it raised; None when nothing was tried, for a path
    that does not exist)."""
    where = f"{field}={name_or_path!r}"
    if gguf_file:
        return _gguf_not_loadable(where, gguf_file, error)
    if Path(name_or_path).expanduser().is_dir():
        return (
            f"{where}: the folder holds no loadable {kind} ({first_line(error)}). Give the folder that "
            "save_pretrained wrote."
        )
    if _is_gguf(Path(name_or_path)):
        return f"{where}: no such file. Give a .gguf file, or the folder that save_pretrained wrote."
    if not is_hub_name(name_or_path):
        return f"{where}: no such folder. Give the folder that save_pretrained wrote."
    return (
        f"{where} is not a local folder, and not a hub {kind} reachable from this machine ({first_line(error)}). "
        "Give a local folder, or check the name and the network."
    )


def _gguf_not_loadable(where: str, path: Path, error: Exception) -> str:
    """One line: the architecture of the GGUF at `path`, what transformers said, and the two ways out."""
    architecture = _gguf_architecture(path)
    if architecture is None:
        return f"{where} is not a readable GGUF file ({first_line(error)}). Give a complete .gguf file."
    readable = _gguf_architectures()
    choices = f": {', '.join(readable)}" if readable else ""
    return (
        f"{where}: transformers cannot load this GGUF of architecture {architecture!r} ({first_line(error)}). "
        "Convert the model to a Hugging Face folder (config.json and weights) and give that folder, or use a GGUF "
        f"of an architecture transformers reads{choices}."
    )


def _gguf_architecture(path: Path) -> str | None:
    """The file's general.architecture, or None where the file cannot be read as GGUF."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).get_field("general.architecture")
    except GGUF_ERRORS:
        return None
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


def _gguf_architectures() -> list[str]:
    """The GGUF architectures the installed transformers can load, by its own names (empty where it moved them)."""
    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return []
    # The legacy table also holds the metadata sections "general" and "tokenizer", which are no architectures.
    return sorted({*GGUF_SUPPORTED_ARCHITECTURES, *GGUF_CONFIG_ARCHS} - {"general", "tokenizer"})


def with_adapter(model: PreTrainedModel, peft_config):
    """The model with trainable LoRA (or other peft) adapters; its own weights frozen."""
    try:
        from peft import get_peft_model
    except ImportError as error:
        raise ImportError("a peft_config needs peft: pip install 'llmdistill[peft]'.") from error
    return get_peft_model(model, peft_config)


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, trust_remote_code: bool = False) -> Path:
    """Folds a saved adapter into its base model and writes a plain HF folder (weights, config, tokenizer)."""
    try:
        from peft import PeftModel
    except ImportError as error:
        raise ImportError("merging an adapter needs peft: pip install 'llmdistill[peft]'.") from error
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ModelError(
            f"adapter={str(adapter_dir)!r} holds no adapter_config.json: give the folder a use_peft run saved."
        )
    # The base loads through load_model, so a GGUF base (which peft's own loader cannot open) merges too.
    base_name = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = load_model(base_name, "auto", trust_remote_code, field="the adapter's base_model_name_or_path")
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.merge_and_unload().save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=trust_remote_code).save_pretrained(output_dir)
    return Path(output_dir)


def head_row_count(model: PreTrainedModel) -> int:
    """Rows of the model's LM head (its vocabulary, padding included), also when ZeRO-3 holds only a shard of it."""
    weight = model.get_output_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Inference only: eval mode (no dropout) and no parameter takes gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


@contextmanager
def eval_mode(model):
    """The model in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def last_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states [B, T, d], through the (possibly wrapped) model's forward, skipping the head."""
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1, use_cache=False
    )
    return outputs.hidden_states[-1]


def supervised_hidden_states(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, supervised: torch.Tensor
) -> torch.Tensor:
    """Hidden states [N, d] at the N positions that predict a supervised token (`supervised`: [B, T-1] mask).

    Gathered before any head, so no [B, T, V] logits are built; `losses` applies the heads chunk by chunk.
    """
    return last_hidden_states(model, input_ids, attention_mask)[:, :-1][supervised]


class LMHead(NamedTuple):
    """An LM head as plain tensors: logits = softcap(hidden @ weight.T + bias)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None

    @classmethod
    def of(cls, model: PreTrainedModel) -> LMHead:
        """The model's output layer, with final-logit soft-capping where its config has one (Gemma 2/3)."""
        layer = model.get_output_embeddings()
        return cls(layer.weight, layer.bias, getattr(model.config, "final_logit_softcapping", None) or None)

    def detached(self) -> LMHead:
        """The same head with no gradient into its weight and bias."""
        return LMHead(self.weight.detach(), None if self.bias is None else self.bias.detach(), self.softcap)

    def params(self) -> list[torch.Tensor]:
        """The weight and, if any, the bias."""
        return [self.weight] + ([] if self.bias is None else [self.bias])

    def logits(self, hidden: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """Logits over the first `rows` vocabulary ids (all by default), in the head's dtype."""
        return self.cap(self.linear(hidden, rows))

    def linear(self, hidden: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """The logits before soft-capping. Hidden states are cast to the head's dtype: under mixed precision
        accelerate hands back fp32 outputs from a bf16 model."""
        bias = None if self.bias is None else self.bias[:rows]
        return torch.nn.functional.linear(hidden.to(self.weight.dtype), self.weight[:rows], bias)

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        return self.cap_logits(logits, self.softcap)

    @staticmethod
    def cap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
        return logits if softcap is None else torch.tanh(logits / softcap) * softcap
