"""Small tokenizers trained on the quickstart task texts: a byte-level BPE (GPT-2 style, the default) and a
SentencePiece-style BPE (Llama style: `▁` marks spaces, a prefix space on the first word, NFKC), so the
cross-tokenizer mode has two real families whose tokens and offsets differ. Both trainers are deterministic."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

FAMILIES = ("byte_bpe", "sentencepiece")
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Spaces are tokens of their own, so a word is the same token wherever it stands (first in the response or
    # after a space in the prompt) and copying is exact token copying; one token per digit makes arithmetic
    # learnable. No prefix space and no offset trimming: offsets are exact spans of the input.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True),
    ])


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, model_max_length: int = 512, family: str = "byte_bpe"
) -> PreTrainedTokenizerFast:
    """Train a tokenizer of `family` (byte_bpe or sentencepiece) on `texts`; ids 0/1/2 are `<pad>`/`<bos>`/`<eos>`.

    Encoding adds no special tokens; offsets are character spans in the input.
    """
    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
    if family == "byte_bpe":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = _pre_tokenizer()
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif family == "sentencepiece":
        backend = Tokenizer(models.BPE(unk_token=PAD_TOKEN))
        backend.normalizer = normalizers.NFKC()
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        backend.decoder = decoders.Metaspace(prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        raise ValueError(f"tokenizer family {family!r} is unknown: choose one of {', '.join(FAMILIES)}.")
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        add_prefix_space=False,
        padding_side="right",
        model_max_length=model_max_length,
    )
