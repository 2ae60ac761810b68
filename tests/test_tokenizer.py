"""The batch encoder (chunks cut in Arrow buffers, a per-process memo in front of the library) must give,
for any text, exactly the ids that the tokenizer's own ``encode`` gives it, padded and truncated."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from dlbatch import tokenizer as tok
from dlbatch.demo import make_chinese_text_table, make_text_table

# Characters where cutting text in the wrong place would change the ids: spaces the normalizer makes or
# removes (NBSP, ideographic and en spaces, tabs, control characters), combining marks after a space or an
# ideograph, a final sigma, compatibility and astral ideographs, kana, full-width forms, emoji, ligatures.
MESSY = (
    list(
        "ab cΣσς\u00a0\u3000\u2002\t\n\r\x00\x07\x1f\ufffd中文北京\uf900\ufa0e\u2f00\u337f\u0301\u0308é"
        "😀\U00020000\U0002b820ｱあア，。!?.-_'\"ÅǅﬁⅣ①"
    )
    + [" "] * 6
)


def _corpus() -> list[str | None]:
    rng = random.Random(0)
    english = make_text_table(600, seed=3)["text"].to_pylist()
    chinese = make_chinese_text_table(600, seed=3)["text"].to_pylist()
    messy = ["".join(rng.choice(MESSY) for _ in range(rng.randint(0, 40))) for _ in range(1500)]
    mixed = [rng.choice(english) + rng.choice(MESSY) + rng.choice(chinese) for _ in range(600)]
    return english + chinese + messy + mixed + ["", "   ", None, "x" * 3000]


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    corpus = [t for t in _corpus() if t]
    return tok.train_tokenizer(iter([corpus[:1200]]), vocab_size=800, min_count=1)


def _reference(tokenizer_json: str, texts: list[str | None], max_length: int) -> np.ndarray:
    from tokenizers import Tokenizer

    ref = Tokenizer.from_str(tokenizer_json)
    ref.enable_truncation(max_length)
    ref.enable_padding(length=max_length, pad_id=tok.PAD, pad_token=tok.PAD_TOKEN)
    clipped = [(t or "")[: max_length * tok.CHARS_PER_TOKEN] for t in texts]
    return np.array([e.ids for e in ref.encode_batch(clipped, add_special_tokens=False)], dtype=np.int64)


@pytest.mark.parametrize("max_length", [1, 5, 64])
def test_batch_encoding_gives_the_tokenizers_own_ids(tokenizer_json, max_length):
    texts = _corpus()
    tok._encoder.cache_clear()  # a cold memo, then a warm one: both exact
    for _ in range(2):
        for start in range(0, len(texts), 700):
            part = texts[start : start + 700]
            tokens, lengths = tok.encode(pa.array(part), tokenizer_json, max_length)
            expected = _reference(tokenizer_json, part, max_length)
            wrong = np.flatnonzero((tokens != expected).any(1))
            assert not len(wrong), [part[i] for i in wrong[:3]]
            assert lengths.tolist() == (expected != tok.PAD).sum(1).tolist()


def test_sliced_chunked_large_string_and_empty_input(tokenizer_json):
    texts = [t for t in _corpus() if t is not None][:900]
    expected = _reference(tokenizer_json, texts[100:], 16)
    big = pa.chunked_array(
        [pa.array(texts[:450], pa.large_string()), pa.array(texts[450:], pa.large_string())]
    )
    for given in (pa.array(texts).slice(100), big.slice(100)):
        tokens, _ = tok.encode(given, tokenizer_json, 16)
        assert (tokens == expected).all()
    tokens, lengths = tok.encode(pa.array([], pa.string()), tokenizer_json, 16)
    assert tokens.shape == (0, 16) and lengths.shape == (0,)


def test_the_memo_stays_bounded_and_long_chunks_are_not_kept(tokenizer_json, monkeypatch):
    monkeypatch.setattr(tok._Encoder, "MAX_ENTRIES", 300)
    tok._encoder.cache_clear()
    texts = _corpus()
    try:
        for start in range(0, len(texts), 10):  # batches with fewer distinct chunks than the bound
            part = texts[start : start + 10]
            tokens, _ = tok.encode(pa.array(part), tokenizer_json, 64)
            assert (tokens == _reference(tokenizer_json, part, 64)).all()
            memo = tok._encoder(tokenizer_json)
            assert len(memo.size) <= 300 and len(memo.ids) == memo.size.sum()
        assert all(len(chunk) <= tok._Encoder.MAX_CHUNK_CHARS for chunk in memo.entry)
    finally:
        tok._encoder.cache_clear()


def test_encoding_says_which_texts_were_cut_at_max_length():
    table = make_text_table(200, seed=4)
    tokenizer = tok.train_tokenizer([table["text"].to_pylist()], 500, 1)
    texts = pa.array(["one", "one two three four five six seven eight nine ten eleven twelve", None])
    tokens, lengths, cut = tok.encode_counted(texts, tokenizer, 5)
    from tokenizers import Tokenizer

    full = [len(Tokenizer.from_str(tokenizer).encode(t).ids) if t else 0 for t in texts.to_pylist()]
    assert cut.tolist() == [n > 5 for n in full] and cut.tolist()[1] and not cut.tolist()[0]
    assert lengths.tolist() == [min(n, 5) for n in full]
