"""Exercise 00's grader internals: the expected sums, and a wrong result described chunk by chunk.

The parent draws every rank's input again (``ex00._case_input``) and sums them itself. When a result
is wrong, each of its N chunks is written as a combination of the ranks' same chunk — least squares
on the 1001-element case, whose chunks are much longer than N — so the message says what the code
computed: "chunk 1 holds x_0 + x_1 only", "x_2 twice", "the average". Nothing here is the exercise.
"""
from __future__ import annotations

import math

import torch

from exercises.grading import GradingError, assert_close

BIG = 5  # the case index of the (1001,) input


def _coefficients(got: torch.Tensor, inputs: list[torch.Tensor], n: int) -> list[list[float] | None]:
    """For each chunk j: c with got_j ≈ Σ_q c_q · x_q,j (rounded to 1/n), or None when no such c fits."""
    c = math.ceil(got.numel() / n)
    out = []
    for j in range(n):
        lo, hi = j * c, min((j + 1) * c, got.numel())
        a = torch.stack([x.reshape(-1)[lo:hi].double() for x in inputs], 1)  # (chunk, N)
        b = got.reshape(-1)[lo:hi].double()
        coef = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
        rounded = torch.round(coef * n) / n
        out.append(rounded.tolist() if torch.allclose(a @ rounded, b, atol=1e-3) else None)
    return out


def _term(coef: list[float]) -> str:
    parts = [("" if abs(c - 1) < 1e-9 else f"{c:g}·") + f"x_{q}" for q, c in enumerate(coef) if abs(c) > 1e-9]
    return " + ".join(parts) or "0"


def describe(part: str, n: int, rank: int, got: torch.Tensor, inputs: list[torch.Tensor]) -> str:
    """What the wrong result of the (1001,) case is, in words."""
    coefs = _coefficients(got, inputs, n)
    ones = [1.0] * n
    if any(c is None for c in coefs):
        j = next(j for j, c in enumerate(coefs) if c is None)
        return (f"chunk {j} of your result is no sum of the ranks' chunks {j}: chunks got mixed up — check the "
                "chunk indices of each step, and that the received buffer is added before it is reused")
    if all(c == [1.0 / n] * n for c in coefs):
        return f"every element is the AVERAGE over the {n} ranks: all-reduce sums — do not divide by N"
    if all(c == [1.0 if q == rank else 0.0 for q in range(n)] for c in coefs):
        return "your result is this rank's own input: nothing was exchanged (or the received chunks were dropped)"
    if any(max(c) > 1 for c in coefs):
        j = next(j for j, c in enumerate(coefs) if max(c) > 1)
        return (f"chunk {j} holds {_term(coefs[j])}: some ranks' values were added more than once — each phase "
                "has N-1 steps, not N, and the all-gather phase OVERWRITES the chunk instead of adding to it")
    done = [j for j, c in enumerate(coefs) if c == ones]
    if part == "00.1" and done == [(rank + 1) % n] and n > 1:
        return (f"only chunk {(rank + 1) % n} = (rank + 1) % N holds the full sum: that is the reduce-scatter "
                "phase alone — the all-gather phase is missing (N-1 more steps: send chunk (r + 1 - s) % N, "
                "OVERWRITE chunk (r - s) % N with what arrives)")
    j = next(j for j, c in enumerate(coefs) if c != ones)
    return (f"chunk {j} holds {_term(coefs[j])}, not the sum of all {n} ranks: a step short, or the chunk "
            f"indices are off — step s sends chunk (r - s) % N to rank r+1 and adds what arrives into chunk "
            f"(r - s - 1) % N")


def judge(part: str, n: int, results: list[list]) -> None:
    from exercises.ex00_collectives import CASES, _case_input

    exercise = f"Exercise {part}"
    inputs = [[_case_input(r, i, shape, dtype) for i, (shape, dtype) in enumerate(CASES)] for r in range(n)]
    expected = [sum(inputs[r][i] for r in range(n)) for i in range(len(CASES))]
    wrong = []
    for rank, got_all in enumerate(results):
        for i, ((shape, dtype), got, e) in enumerate(zip(CASES, got_all, expected)):
            numel = e.numel()
            where = f"{exercise}: world_size={n}, rank {rank}, input shape {shape} {dtype}" + \
                ("" if numel % n == 0 else f", numel {numel} not a multiple of {n}")
            if isinstance(got, torch.Tensor) and got.shape != e.shape:
                if 0 < got.numel() < numel and got.numel() in (math.ceil(numel / n), numel // n):
                    raise GradingError(f"{where}: you returned one chunk, shape {tuple(got.shape)}: that is this "
                                       "rank's share after the reduce-scatter — all-gather the chunks, then reshape")
                if got.numel() == math.ceil(numel / n) * n and got.numel() != numel:
                    raise GradingError(f"{where}: {got.numel()} elements, the padded length: cut the padding off "
                                       f"(the first {numel}) and reshape like x, {tuple(e.shape)}")
                if got.numel() == numel:
                    raise GradingError(f"{where}: wrong shape {tuple(got.shape)}: reshape the result like x, "
                                       f"{tuple(e.shape)}")
            try:
                assert_close(where, got, e, rtol=1e-5, atol=1e-5)
            except GradingError as err:
                wrong.append((rank, i, numel, str(err)))
    if not wrong:
        return
    rank, i, numel, message = wrong[0]
    if all(w[2] % n for w in wrong):
        raise GradingError(f"{message} — only inputs whose numel is not a multiple of {n} come out wrong: pad the "
                           "flat tensor with zeros to a multiple of N, and cut the padding off the result")
    big = results[rank][BIG]
    if isinstance(big, torch.Tensor) and big.shape == expected[BIG].shape and big.is_floating_point():
        if not torch.allclose(big, expected[BIG], rtol=1e-5, atol=1e-5):
            raise GradingError(f"{exercise}: world_size={n}, rank {rank}, input (1001,): "
                               f"{describe(part, n, rank, big, [inputs[r][BIG] for r in range(n)])}\n({message})")
    raise GradingError(message)
