"""The text task's subword tokenizer: Hugging Face ``tokenizers`` WordPiece, trained on the training split.

Normalization is BERT's: Unicode cleaned of control characters, accents kept, lower-cased, and every CJK
character made a word of its own, so Chinese or Japanese text (no spaces between words) becomes one token
per character instead of one "word" per phrase; other scripts split on whitespace and punctuation and then
into subword pieces (German compounds, product codes and URLs share pieces instead of each being unknown).

Ids 0 and 1 are the padding and unknown tokens. The tokenizer is saved as its own JSON file
(``tokenizer.json``, data, not code) next to the weights, with its SHA-256 in ``meta.json``: a model is
never used with another tokenizer than its own.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PAD_TOKEN, UNK_TOKEN = "[PAD]", "[UNK]"
PAD, UNK = 0, 1
TOKENIZER_FILE = "tokenizer.json"
# Characters of a document that are tokenized at most, per token of max_length: a 1 MB document costs what
# its first few thousand characters do, and the GRU never sees more than max_length tokens of it anyway.
CHARS_PER_TOKEN = 16
# Training rows the tokenizer learns from at most; a larger split is sampled (seeded) down to about this.
TRAIN_ROWS = 1_000_000


def new_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.WordPiece(unk_token=UNK_TOKEN, max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                        strip_accents=False, lowercase=True)]
    )  # fmt: skip
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer


def train_tokenizer(texts: Iterator[list[str]], vocab_size: int, min_count: int) -> str:
    """A tokenizer trained on ``texts`` (batches of strings, streamed); returns its JSON."""
    from tokenizers import trainers

    tokenizer = new_tokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_count, special_tokens=[PAD_TOKEN, UNK_TOKEN],
        show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer.to_str()


def tokenizer_sha256(tokenizer_json: str) -> str:
    return hashlib.sha256(tokenizer_json.encode()).hexdigest()


@functools.lru_cache(maxsize=4)
def _loaded(tokenizer_json: str, max_length: int):
    """A tokenizer ready to encode, once per process and tokenizer (``map_batches`` calls per batch)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length, pad_id=PAD, pad_token=PAD_TOKEN)
    return tokenizer


def vocab_len(tokenizer_json: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json).get_vocab_size()


def encode(texts: pa.Array, tokenizer_json: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (B, T) int64, lengths (B,) int64), truncated and padded to ``max_length``. Nulls encode as
    empty (length 0): the caller rejects them."""
    tokenizer = _loaded(tokenizer_json, max_length)
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    clipped = pc.utf8_slice_codeunits(pc.fill_null(texts, ""), 0, max_length * CHARS_PER_TOKEN)
    encodings = tokenizer.encode_batch_fast(clipped.to_pylist(), add_special_tokens=False)
    flat = itertools.chain.from_iterable(e.ids for e in encodings)
    tokens = np.fromiter(flat, dtype=np.int64, count=len(encodings) * max_length).reshape(-1, max_length)
    return tokens, (tokens != PAD).sum(1)  # padding is the only source of id 0
