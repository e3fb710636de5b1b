"""Same-tokenizer vocabularies: padded heads compare their shared ids; a head missing real tokens is refused."""

from __future__ import annotations

import pytest

from llmdistill.vocab import same_tokens, shared_vocab_size


def test_padded_heads_share_the_smaller_row_count(tokenizer):
    assert same_tokens(tokenizer, tokenizer)
    assert shared_vocab_size(tokenizer, len(tokenizer) + 128, len(tokenizer)) == len(tokenizer)


def test_a_head_without_rows_for_real_tokens_is_refused(tokenizer):
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        shared_vocab_size(tokenizer, len(tokenizer), len(tokenizer) - 1)
