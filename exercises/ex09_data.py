"""Exercise 09: tokenizer and data.

09.1  build_sample_index — where does each fixed-length GPT sample start?

Documents of `lengths` tokens are laid end to end into one stream. Sample i is the seq_len + 1 tokens
stream[i*seq_len : i*seq_len + seq_len + 1] (inputs and labels shifted by one), so consecutive samples
share one token and a stream of T tokens holds n = (T - 1) // seq_len samples.

Return an integer array of shape (n + 1, 2): row i = [d, o] says stream token i*seq_len is token o of
document d. Row n marks where the last sample ends. An empty document never owns a token, so no row
points into one. Example: lengths [0, 0, 3, 0, 2], seq_len 2 -> [[2, 0], [2, 2], [4, 1]].

Grade it with:  grade_build_sample_index(build_sample_index)
The reference is minimegatron.data.samples.build_sample_index (submitting it is refused); the usual
wrong indexes are named (``_ex09_checks.py``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from exercises import _ex09_checks as C
from exercises.battery import refuse_reference
from exercises.grading import GradingError, call_candidate, grader, kind_of, passed, run_isolated
from minimegatron.data.samples import build_sample_index as reference_build_sample_index

TIMEOUT = 10.0  # s: eight small layouts in one process


def build_sample_index(lengths: Sequence[int], seq_len: int) -> np.ndarray:
    """Your code: (n + 1, 2) rows [document, offset] of stream tokens 0, seq_len, 2*seq_len, ..."""
    # Hint: np.cumsum(lengths) gives where each document ends in the stream; np.searchsorted finds
    # which document a stream position falls in (mind the empty documents).
    raise NotImplementedError("Exercise 09.1: build the sample index — return the (n + 1, 2) array of "
                              "[document, offset] for stream tokens 0, seq_len, 2*seq_len, ..., "
                              "n = (sum(lengths) - 1) // seq_len")


def _cases() -> list[tuple[str, list[int], int]]:
    rng = np.random.default_rng(909)
    random_lengths = rng.integers(0, 40, size=60).tolist()
    random_lengths[::7] = [0] * len(random_lengths[::7])
    return [
        ("one document, two samples", [9], 4),
        ("samples straddle documents", [3, 5, 2, 7], 4),
        ("empty documents in between", [0, 0, 3, 0, 2], 2),
        ("seq_len 1: every token starts a sample", [2, 0, 3], 1),
        ("too short for any sample", [2, 1], 3),
        ("one long document, short ones after", [100, 1, 1, 1], 16),
        ("60 random documents, some empty", random_lengths, 8),
        ("60 random documents, long samples", random_lengths, 64),
    ]


@grader
def grade_build_sample_index(candidate: Callable[[Sequence[int], int], np.ndarray],
                             timeout: float = TIMEOUT) -> str:
    """Compare `candidate` with the reference on several stream layouts.

    Returns "✓ ..." (and prints it) when every case matches; raises GradingError at the first miss, naming
    the case, the wrong row and what it should be. Runs in a separate process: an exception or an
    endless loop in ``candidate`` (``timeout`` s) is reported as a GradingError too."""
    refuse_reference("Exercise 09.1", candidate, reference_build_sample_index)
    return run_isolated(_grade_build_sample_index, candidate, timeout=timeout, role="build_sample_index")


def _grade_build_sample_index(candidate: Callable) -> str:
    cases = _cases()
    for name, lengths, seq_len in cases:
        where = f"case '{name}' (lengths={_short(lengths)}, seq_len={seq_len})"
        expected = reference_build_sample_index(lengths, seq_len)
        returned = call_candidate(where, candidate, list(lengths), seq_len, exercise="Exercise 09.1")
        if not isinstance(returned, (np.ndarray, list, tuple)) and not hasattr(returned, "__array__"):
            raise GradingError(f"{where}: expected an integer array of shape (n + 1, 2) = {expected.shape}, "
                               f"got {kind_of(returned)}")
        try:
            got = np.asarray(returned)
        except Exception:  # noqa: BLE001 - ragged rows, or something numpy cannot make an array of
            raise GradingError(f"{where}: expected an integer array of shape (n + 1, 2) = {expected.shape}, "
                               f"got {kind_of(returned)}, which is not a rectangular array") from None
        if got.ndim != 2 or got.shape[1:] != (2,):
            raise GradingError(f"{where}: got shape {got.shape}, expected (n + 1, 2) = {expected.shape}: "
                               f"one row [document, offset] per sample start, plus one for the end")
        if got.ndim == 2 and got.shape[1:] == (2,) and np.issubdtype(got.dtype, np.integer):
            empty = [int(d) for d in got[:, 0] if 0 <= d < len(lengths) and lengths[d] == 0]
            if empty:
                i = next(i for i, d in enumerate(got[:, 0]) if int(d) == empty[0])
                raise GradingError(f"{where}: row {i} is {got[i].tolist()} — document {empty[0]} is empty, it "
                                   f"cannot own a token (expected {expected[i].tolist() if i < len(expected) else '?'})")
        if got.shape != expected.shape or not np.array_equal(got, expected):
            for model, message in C.mistakes(lengths, seq_len):
                if got.shape == model.shape and np.array_equal(got, model):
                    raise GradingError(f"{where}: {message}")
        if got.shape != expected.shape:
            total, n = sum(lengths), expected.shape[0] - 1
            raise GradingError(f"{where}: got {got.shape[0]} rows, expected {expected.shape[0]}: "
                               f"{total} tokens hold n = ({total} - 1) // {seq_len} = {n} samples of "
                               f"{seq_len}+1 tokens, and the index has n + 1 rows")
        if not np.issubdtype(got.dtype, np.integer):
            raise GradingError(f"{where}: got dtype {got.dtype}, expected integers")
        bad = np.flatnonzero((got != expected).any(axis=1))
        if bad.size:
            i = int(bad[0])
            hint = ""
            document = int(got[i, 0])
            if 0 <= document < len(lengths) and lengths[document] == 0:
                hint = f" — document {document} is empty, it cannot own a token"
            raise GradingError(f"{where}: row {i} (stream token {i * seq_len}) is {got[i].tolist()}, "
                               f"expected {expected[i].tolist()}{hint}; {bad.size} of {len(got)} rows differ")
    return passed(f"Exercise 09.1: your sample index matches the reference on all {len(cases)} cases")


def _short(values: list[int], limit: int = 8) -> str:
    if len(values) <= limit:
        return str(values)
    return f"[{', '.join(map(str, values[:limit]))}, ...] ({len(values)} documents)"
