"""Teacher cache for off-policy training: the teacher's signal at every supervised position, computed once.

Two kinds:
* `hidden`: the teacher's last hidden states [N, D] plus its LM head. Training from it computes exactly the loss of
  the live teacher, for every same-vocabulary objective (DSKD included), without the teacher's layers in memory.
* `topk`: the k largest log-probabilities at the capture temperature and their ids. Far smaller; the KD target
  becomes the teacher distribution restricted to its top k ids and renormalised, p_k = p·1[top k] / Σ_top-k p.
  Divergences that need p > 0 wherever q > 0 (rkl, akl) are refused with it.

A cache folder holds `teacher_cache.json` (what it was built from), `head.safetensors` (hidden kind) and the signal
in shards `signal-00000.safetensors`, ... of about `shard_bytes` each, written as the teacher runs (so building never
holds more than one shard in memory): the training rows in order, then the evaluation rows. Each row carries its
place there in a `cache_index` column; a run whose data, teacher tokenizer, teacher config, kind, k or temperature
differ from the cache's is refused with the field that differs.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .data import IGNORE_INDEX, DistillCollator
from .errors import CacheError
from .losses import default_chunk_size
from .models import LMHead, supervised_hidden_states

CACHE_KINDS = ("hidden", "topk")
TOPK_DIVERGENCES = ("fkl", "jsd", "skl", "srkl", "tvd")
META_FILENAME = "teacher_cache.json"
HEAD_FILENAME = "head.safetensors"
SIGNAL_FILENAME = "signal-{shard:05d}.safetensors"
SHARD_BYTES = 1 << 30


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes when any token's id or the special tokens change."""
    content = {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map}
    return _sha256(json.dumps(content, sort_keys=True, default=str))


def config_fingerprint(config) -> str:
    """The teacher's architecture and sizes (its `config.json` without paths or library versions)."""
    values = {key: value for key, value in config.to_dict().items() if key not in ("_name_or_path", "transformers_version")}
    return _sha256(json.dumps(values, sort_keys=True, default=str))


def data_fingerprint(dataset) -> str:
    """The tokenised rows the cache is aligned with (input ids and labels, in order)."""
    digest = hashlib.sha256()
    for row in dataset.select_columns(["input_ids", "labels"]).with_format("numpy"):
        digest.update(row["input_ids"].astype("int64").tobytes())
        digest.update(row["labels"].astype("int64").tobytes())
    return digest.hexdigest()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class TopKHead:
    """Stands in for the teacher's LM head when the "hidden states" are packed top-k rows [N, 2k]: log-probabilities
    at the capture temperature, then their ids (exact in float32 below 2**24). The logits are τ·log p at the top-k ids
    and -inf elsewhere, so the loss's softmax(z/τ) is p_k, the renormalised top-k distribution."""

    bias = None
    softcap = None

    def __init__(self, vocab_size: int, k: int, temperature: float):
        self.k, self.temperature = k, temperature
        self.weight = torch.empty(vocab_size, 2 * k, device="meta")  # only its shape is read

    def linear(self, packed: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        values, ids = packed[:, : self.k].float(), packed[:, self.k :].long()
        logits = values.new_full((len(packed), self.weight.shape[0]), float("-inf"))
        logits.scatter_(1, ids, values * self.temperature)
        return logits[:, :rows]

    def logits(self, packed: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        return self.linear(packed, rows)

    def detached(self) -> TopKHead:
        return self


class CachedTeacher(torch.nn.Module):
    """What of the teacher a cached run keeps: its LM head (hidden kind), so that `LMHead.of` and the objectives'
    set-up work unchanged; no decoder layer."""

    def __init__(self, head: LMHead):
        super().__init__()
        rows, width = head.weight.shape
        self.lm_head = torch.nn.Linear(width, rows, bias=head.bias is not None, device="meta")
        self.lm_head.weight = torch.nn.Parameter(head.weight, requires_grad=False)  # the same memory, not a copy
        if head.bias is not None:
            self.lm_head.bias = torch.nn.Parameter(head.bias, requires_grad=False)
        self.config = SimpleNamespace(final_logit_softcapping=head.softcap)

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.lm_head


class TeacherCache:
    """A built cache folder; its signal file is opened memory-mapped on first use and read row by row."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / META_FILENAME
        if not path.is_file():
            raise CacheError(
                f"teacher_cache={str(self.directory)!r}: {path.name} is missing, so it is not a teacher cache. Point "
                "teacher_cache at a new folder (it is built on the first run) or at a finished cache."
            )
        self.meta = json.loads(path.read_text())
        self._shards = self._offsets = None

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def check(self, expected: dict) -> None:
        """Raises naming the first recorded property that differs from this run's."""
        for key, value in expected.items():
            recorded = self.meta.get(key)
            if recorded != value:
                raise CacheError(
                    f"teacher_cache={str(self.directory)!r} does not match this run: its {key} is {recorded!r}, the "
                    f"run's is {value!r}. Point teacher_cache at a new folder (it is built on the first run) or "
                    "delete this one."
                )

    def head(self, device) -> LMHead | TopKHead:
        if self.kind == "topk":
            return TopKHead(self.meta["vocab_size"], self.meta["top_k"], self.meta["temperature"])
        with safe_open(self.directory / HEAD_FILENAME, framework="pt", device=str(device)) as file:
            bias = file.get_tensor("bias") if "bias" in file.keys() else None
            return LMHead(file.get_tensor("weight"), bias, self.meta["softcap"])

    def signal(self, rows: torch.Tensor) -> torch.Tensor:
        """The teacher signal at the supervised positions of cache rows `rows`, in order: hidden states [N, D], or
        top-k rows packed as [N, 2k] for `TopKHead`."""
        if self._shards is None:
            self._shards = [
                safe_open(self.directory / SIGNAL_FILENAME.format(shard=shard), framework="pt", device="cpu")
                for shard in range(len(self.meta["shard_first_rows"]))
            ]
            self._offsets = [file.get_tensor("offsets").tolist() for file in self._shards]
        pieces = [self._row(row) for row in rows.tolist()]
        return torch.cat(pieces).to(rows.device, non_blocking=True)

    def _row(self, row: int) -> torch.Tensor:
        first_rows = self.meta["shard_first_rows"]
        shard = bisect.bisect_right(first_rows, row) - 1
        file, offsets, local = self._shards[shard], self._offsets[shard], row - first_rows[shard]
        start, end = offsets[local], offsets[local + 1]
        if self.kind == "hidden":
            return file.get_slice("hidden")[start:end]
        return torch.cat([file.get_slice(name)[start:end].float() for name in ("logprobs", "ids")], dim=1)


@torch.no_grad()
def build_teacher_cache(
    directory: str | Path, teacher, datasets: list, pad_token_id: int, kind: str = "hidden", top_k: int = 64,
    temperature: float = 1.0, batch_size: int = 8, fingerprints: dict | None = None, shard_bytes: int = SHARD_BYTES,
) -> TeacherCache:
    """Runs the teacher once over the tokenised rows of `datasets` (cache rows numbered through them in order) and
    writes the cache, a shard at a time; returns it opened."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    head = LMHead.of(teacher)
    collate = DistillCollator(pad_token_id)
    device = head.weight.device
    rows = [dataset[i] for dataset in datasets for i in range(len(dataset))]
    shards = _ShardWriter(directory, shard_bytes)
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size])
        supervised = batch["labels"][:, 1:] != IGNORE_INDEX
        hidden = supervised_hidden_states(
            teacher, batch["input_ids"].to(device), batch["attention_mask"].to(device), supervised.to(device)
        )
        if kind == "hidden":
            shards.add({"hidden": hidden}, supervised.sum(1).tolist())
        else:
            logprobs, ids = _top_k(head, hidden, top_k, temperature)
            shards.add({"logprobs": logprobs, "ids": ids}, supervised.sum(1).tolist())
    shards.flush()
    if kind == "hidden":
        head_tensors = {"weight": head.weight} | ({} if head.bias is None else {"bias": head.bias})
        save_file({k: v.detach().cpu().contiguous() for k, v in head_tensors.items()}, directory / HEAD_FILENAME)
    meta = {
        "kind": kind, "top_k": top_k if kind == "topk" else None, "temperature": temperature if kind == "topk" else None,
        "vocab_size": head.weight.shape[0], "softcap": head.softcap, "shard_first_rows": shards.first_rows,
        **(fingerprints or {}),
    }
    (directory / META_FILENAME).write_text(json.dumps(meta, indent=1))
    return TeacherCache(directory)


class _ShardWriter:
    """Collects batches of signal (tensors over positions, with each row's position count) and writes a shard file
    whenever about `shard_bytes` have gathered; a row never spans two shards."""

    def __init__(self, directory: Path, shard_bytes: int):
        self.directory, self.shard_bytes = directory, shard_bytes
        self.first_rows, self.rows_written = [], 0
        self.pieces, self.counts, self.bytes = [], [], 0

    def add(self, tensors: dict[str, torch.Tensor], counts: list[int]) -> None:
        self.pieces.append({name: tensor.cpu() for name, tensor in tensors.items()})
        self.counts += counts
        self.bytes += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        if self.bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.counts:
            return
        tensors = {name: torch.cat([piece[name] for piece in self.pieces]) for name in self.pieces[0]}
        tensors["offsets"] = torch.tensor([0, *self.counts]).cumsum(0)
        path = self.directory / SIGNAL_FILENAME.format(shard=len(self.first_rows))
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, path)
        self.first_rows.append(self.rows_written)
        self.rows_written += len(self.counts)
        self.pieces, self.counts, self.bytes = [], [], 0


def _top_k(head: LMHead, hidden: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest log-probabilities at `temperature` [N, k] (computed in float64, kept in float32) and their ids,
    a chunk of positions at a time: a batch's [N, V] float64 logits would be gigabytes with a 152k vocabulary."""
    chunk = default_chunk_size(head.weight.shape[0], head.weight.device)
    values, ids = [], []
    for start in range(0, len(hidden), chunk):
        logprobs = torch.log_softmax(head.logits(hidden[start : start + chunk]).double() / temperature, dim=-1)
        top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        values.append(top.values.float())
        ids.append(top.indices.int())
    return torch.cat(values), torch.cat(ids)
