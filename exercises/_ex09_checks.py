"""Exercise 09's grader internals: the usual wrong sample indexes, each as the array it gives, and its
message (the grader names the first one a wrong answer equals). Written from the definition, one
position at a time. Nothing here is the exercise (``ex09_data.py``)."""
from __future__ import annotations

import numpy as np


def index_at(lengths, positions, *, boundary_to_previous=False, stream_offsets=False):
    """[document, offset] of each stream position, by walking the documents."""
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    rows = []
    for pos in positions:
        d = 0
        while d + 1 < len(lengths) and (starts[d + 1] < pos if boundary_to_previous else starts[d + 1] <= pos):
            d += 1
        rows.append([d, pos if stream_offsets else pos - starts[d]])
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def mistakes(lengths, seq_len) -> list[tuple[np.ndarray, str]]:
    total = int(sum(lengths))
    n = (total - 1) // seq_len if total else 0
    every = [i * seq_len for i in range(n + 1)]
    return [
        (index_at(lengths, every[:-1]), "the end row is missing: n samples need n + 1 rows — row n marks where the "
                                        "last sample ends"),
        (index_at(lengths, [i * seq_len for i in range(total // seq_len + 1)]),
         f"n = T // seq_len: a sample takes seq_len + 1 tokens (inputs and the labels shifted by one), so T tokens "
         f"hold n = (T - 1) // seq_len samples — here ({total} - 1) // {seq_len} = {n}"),
        (index_at(lengths, [i * (seq_len + 1) for i in range((total - 1) // (seq_len + 1) + 1)]),
         "a stride of seq_len + 1: consecutive samples SHARE one token (the last label of sample i is the first "
         "input of sample i + 1) — sample i starts at stream token i·seq_len"),
        (index_at(lengths, every, boundary_to_previous=True),
         "a token on a document boundary was given to the document before it (offset = its length): stream token "
         "cumsum(lengths)[d] is token 0 of the next non-empty document — compare with <=, not <"),
        (index_at(lengths, every, stream_offsets=True), "the offsets are stream positions: subtract the start of "
                                                        "the document (its cumsum of the lengths before it)"),
    ]
