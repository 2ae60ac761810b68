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
import threading
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
# The BMP CJK ideographs that the normalizer (``handle_chinese_chars``) puts spaces around.
CJK_BMP = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF))


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


class _Encoder:
    """Encodes batches through a per-process memo of chunk -> ids in front of the library's encoder.

    Text is cut, in Arrow buffers, only where the tokenizer's own normalizer and pre-tokenizer cut it too:
    at ASCII spaces and around each BMP CJK ideograph (which the normalizer isolates). So the ids of a text
    are the concatenation of its chunks' ids, exactly (tests/test_tokenizer.py checks this against
    ``Tokenizer.encode``), and a batch only asks the library for chunks not seen before in this process.
    Real text repeats its words and characters, so after a few batches most chunks are hits.
    """

    MAX_ENTRIES = 200_000  # memo entries per process (its size: docs/PERFORMANCE.md); cleared before a batch would pass it
    MAX_CHUNK_CHARS = 100  # longer chunks (blobs, long URLs) are encoded for their batch, never looked up

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.lock = threading.Lock()  # Ray Data may call one process's map_batches from several threads
        self._clear()

    def _clear(self) -> None:
        self.entry: dict[str, int] = {}
        self.ids = np.zeros(0, np.int64)  # every entry's ids, one after another
        self.start, self.size = np.zeros(0, np.int64), np.zeros(0, np.int64)

    def lookup(self, chunks: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start, size) of each chunk's ids in the returned flat ids array."""
        with self.lock:
            if len(self.size) + len(chunks) > self.MAX_ENTRIES:
                self._clear()
            at = np.array([self.entry.get(c, -1) for c in chunks], dtype=np.int64)
            missing = np.flatnonzero(at < 0)
            if len(missing):
                new = [chunks[i] for i in missing]
                found = [e.ids for e in self.tokenizer.encode_batch_fast(new, add_special_tokens=False)]
                size = np.fromiter(map(len, found), np.int64, len(found))
                ids = np.fromiter(itertools.chain.from_iterable(found), np.int64, size.sum())
                first = len(self.size)
                self.start = np.concatenate([self.start, len(self.ids) + np.cumsum(size) - size])
                self.size, self.ids = np.concatenate([self.size, size]), np.concatenate([self.ids, ids])
                at[missing] = np.arange(first, first + len(new))
                self.entry.update((c, first + k) for k, c in enumerate(new) if len(c) <= self.MAX_CHUNK_CHARS)
            return self.start[at], self.size[at], self.ids


@functools.lru_cache(maxsize=4)
def _encoder(tokenizer_json: str) -> _Encoder:
    return _Encoder(tokenizer_json)


def _chunks(texts: pa.LargeStringArray) -> tuple[pa.LargeStringArray, np.ndarray]:
    """Texts cut at ASCII spaces and around BMP CJK ideographs, zero-copy over the same UTF-8 buffer;
    returns the chunks (spaces kept as chunks of their own, which encode to nothing) and each one's row."""
    offsets = np.frombuffer(texts.buffers()[1], np.int64)[texts.offset : texts.offset + len(texts) + 1]
    data = np.frombuffer(texts.buffers()[2] or b"", np.uint8)
    lo, hi = int(offsets[0]), int(offsets[-1])
    cut = np.zeros(hi + 1, dtype=bool)
    cut[offsets] = True
    body = data[lo:hi]
    space = np.flatnonzero(body == 0x20) + lo
    cut[space] = cut[space + 1] = True
    # 3-byte UTF-8 sequences (lead byte 0xE3-0xEF) whose code point is a BMP CJK ideograph.
    lead = np.flatnonzero((body >= 0xE3) & (body <= 0xEF)) + lo
    lead = lead[lead + 2 < hi]
    cp = ((data[lead].astype(np.int32) & 0x0F) << 12) | ((data[lead + 1] & 0x3F).astype(np.int32) << 6)
    cp |= data[lead + 2] & 0x3F
    in_cjk = np.zeros(len(cp), dtype=bool)
    for first, last in CJK_BMP:
        in_cjk |= (cp >= first) & (cp <= last)
    cjk = lead[in_cjk]
    cut[cjk] = cut[cjk + 3] = True
    bounds = np.flatnonzero(cut[lo:]) + lo
    chunks = pa.LargeStringArray.from_buffers(
        len(bounds) - 1, pa.py_buffer(bounds.astype(np.int64)), texts.buffers()[2]
    )
    return chunks, np.searchsorted(offsets, bounds[:-1], side="right") - 1


def _within(counts: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Each item's index within its group, for items listed group after group (``counts`` per group)."""
    return np.arange(len(owner)) - (np.cumsum(counts) - counts)[owner]


def vocab_len(tokenizer_json: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json).get_vocab_size()


def encode(texts: pa.Array, tokenizer_json: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (B, T) int64, lengths (B,) int64), truncated and padded to ``max_length``: the same ids as
    the tokenizer's own ``encode`` gives each text. Nulls encode as empty (length 0): the caller rejects
    them."""
    tokens, lengths, _ = encode_counted(texts, tokenizer_json, max_length)
    return tokens, lengths


def encode_counted(texts: pa.Array, tokenizer_json: str, max_length: int) -> tuple[np.ndarray, ...]:
    """``encode``, and whether each text was cut: it had more than ``max_length`` tokens."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    clipped = pc.utf8_slice_codeunits(pc.fill_null(texts, ""), 0, max_length * CHARS_PER_TOKEN)
    chunks, rows = _chunks(clipped.cast(pa.large_string()))
    # Each distinct chunk of the batch looked up once, then its ids gathered for every place it occurs.
    distinct = chunks.dictionary_encode()
    start, size, ids = _encoder(tokenizer_json).lookup(distinct.dictionary.to_pylist())
    which = distinct.indices.to_numpy()
    n_ids = size[which]  # ids per chunk, in text order
    chunk_of = np.repeat(np.arange(len(which)), n_ids)
    row_of = rows[chunk_of]
    lengths = np.bincount(row_of, minlength=len(texts)).astype(np.int64)
    pos = _within(lengths, row_of)
    keep = pos < max_length
    tokens = np.full((len(texts), max_length), PAD, dtype=np.int64)
    tokens[row_of[keep], pos[keep]] = ids[start[which[chunk_of[keep]]] + _within(n_ids, chunk_of)[keep]]
    return tokens, np.minimum(lengths, max_length), lengths > max_length
