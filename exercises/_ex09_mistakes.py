"""Exercise 09's battery: plausible wrong sample indexes, each with the message its grader must give."""
from __future__ import annotations

import numpy as np

from exercises._ex09_checks import index_at


def sample_index(lengths, seq_len, *, end_row=True, n_rule="right", stride=None, boundary_to_previous=False,
                 stream_offsets=False):
    """A loop solution with the usual mistakes as switches (the defaults are right)."""
    total = int(sum(lengths))
    step = stride or seq_len
    n = {"right": (total - 1) // step if total else 0, "floor": total // step}[n_rule]
    positions = [i * step for i in range(n + (1 if end_row else 0))]
    return index_at(lengths, positions, boundary_to_previous=boundary_to_previous, stream_offsets=stream_offsets)


def into_empty(lengths, seq_len):
    """np.searchsorted with the wrong side: a document that starts where empty ones do is found as the
    FIRST of them."""
    rows = sample_index(lengths, seq_len)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for row in rows:
        row[0] = int(np.searchsorted(starts, starts[row[0]], side="left"))
    return rows


def switched(**switches):
    def build_sample_index(lengths, seq_len):
        return sample_index(lengths, seq_len, **switches)
    return build_sample_index


BATTERY = [
    ("no end row", switched(end_row=False), r"the end row is missing"),
    ("n = T // seq_len", switched(n_rule="floor"), r"n = T // seq_len: a sample takes seq_len \+ 1 tokens"),
    ("stride seq_len + 1", lambda lengths, s: sample_index(lengths, s + 1) if sum(lengths) > 1 else
     sample_index(lengths, s), r"a stride of seq_len \+ 1: consecutive samples SHARE one token"),
    ("boundary token to the previous document", switched(boundary_to_previous=True),
     r"a token on a document boundary was given to the document before it"),
    ("stream offsets", switched(stream_offsets=True), r"the offsets are stream positions"),
    ("points into empty documents", into_empty, r"document \d is empty, it cannot own a token"),
    ("floats", lambda lengths, s: sample_index(lengths, s).astype(float), r"got dtype float64, expected integers"),
]
