"""Demo data: the same rows however many processes make them, numbered across chunks."""

import pyarrow.compute as pc

from dlbatch.demo import CHUNK_ROWS, make_rows, make_text_table


def test_a_split_of_several_chunks_is_the_same_rows_made_in_one_process_or_several():
    n = 2 * CHUNK_ROWS + 123
    one = make_rows("text", n, seed=7, with_labels=True, prefix="doc", processes=1)
    three = make_rows("text", n, seed=7, with_labels=True, prefix="doc", processes=3)

    assert one.equals(three)
    assert one["id"].to_pylist() == [f"doc-{i:07d}" for i in range(n)]
    # Each chunk is drawn from its own seed, not a repeat of the first.
    assert one["text"][:200] != one["text"][CHUNK_ROWS : CHUNK_ROWS + 200]
    # A split of one chunk is drawn from the seed itself: small demos are the rows they were before chunks.
    assert make_rows("text", 500, 7, True, "doc", processes=4).equals(make_text_table(500, 7))


def test_image_rows_keep_their_numbers_and_paths_across_a_chunk_boundary():
    table = make_rows("image", CHUNK_ROWS + 3, seed=1, with_labels=False, prefix="img", processes=2)

    ids = table["id"].to_pylist()
    assert ids[CHUNK_ROWS - 1 : CHUNK_ROWS + 1] == [f"img-{CHUNK_ROWS - 1:07d}", f"img-{CHUNK_ROWS:07d}"]
    paths = pc.struct_field(table["image"], "path").to_pylist()
    assert paths == [f"{i}.png" for i in ids]
    assert "label" not in table.column_names
