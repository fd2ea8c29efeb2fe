"""Exercises 00.1/00.2: the references and hand-written solutions pass; the untouched stubs and every
wrong solution of the battery (exercises/_ex00_mistakes.py) fail with the message that names the
mistake. The battery of each part is graded in one launch per world size."""
import re

import pytest
import torch
import torch.distributed as dist

from exercises import _ex00_mistakes as M
from exercises import ex00_collectives as ex00
from exercises.grading import GradingError
from minimegatron import collectives

PARTS = {"00.1": (ex00.ring_all_reduce, [lambda x, group=None: collectives.ring_all_reduce(x), M.ring]),
         "00.2": (ex00.all_reduce_via_reduce_scatter_all_gather,
                  [lambda x, group=None: collectives.all_reduce_via_reduce_scatter_all_gather(x), M.halves])}
REFERENCES = {"00.1": collectives.ring_all_reduce, "00.2": collectives.all_reduce_via_reduce_scatter_all_gather}


@pytest.fixture(scope="module")
def verdicts():
    out = {}
    for part, (stub, good) in PARTS.items():
        battery = [b[2] for b in M.BATTERY if b[0] == part]
        out[part] = ex00.battery_verdicts(part, battery + good + [stub, REFERENCES[part]])
    return out


@pytest.mark.parametrize("part", PARTS)
def test_references_and_hand_written_solutions_pass_the_stub_and_the_reference_itself_fail(verdicts, part):
    *good, stub, reference = verdicts[part][-len(PARTS[part][1]) - 2:]
    assert good == [f"✓ Exercise {part}"] * len(good)
    assert re.match(rf"not implemented yet: .*Exercise {part}", stub), stub
    assert re.match(rf"Exercise {part}: that is the reference itself", reference), reference


BATTERY_IDS = [f"{b[0]} {b[1]}" for b in M.BATTERY]


@pytest.mark.parametrize("entry", M.BATTERY, ids=BATTERY_IDS)
def test_every_mistake_is_named(verdicts, entry):
    part, _, candidate, message = entry
    index = [b[2] for b in M.BATTERY if b[0] == part].index(candidate)
    verdict = verdicts[part][index]
    assert not verdict.startswith("✓"), "a wrong solution passed"
    assert re.search(rf"Exercise {part}.*{message}", verdict, re.S), verdict


def test_the_public_graders_exceptions_and_hangs():
    assert ex00.grade_all_reduce_via_reduce_scatter_all_gather(
        lambda x, group=None: collectives.all_reduce_via_reduce_scatter_all_gather(x), world_sizes=(3,)
    ).startswith("✓")

    def broken(x, group=None):
        if dist.get_rank() == 1:
            raise ValueError("chunk index out of range")
        return collectives.ring_all_reduce(x)

    with pytest.raises(GradingError, match="(?s)your code raised on rank 1.*ValueError: chunk index out of range"):
        ex00.grade_ring_all_reduce(broken, world_sizes=(2,))

    def deadlock(x, group=None):  # every rank waits for a message nobody sends
        received = torch.empty_like(x)
        dist.recv(received, src=(dist.get_rank() - 1) % dist.get_world_size())
        return received

    with pytest.raises(GradingError, match=r"timeout — your code hung on ranks \[0, 1\]"):
        ex00.grade_ring_all_reduce(deadlock, world_sizes=(2,), timeout=2)
    assert ex00.TIMEOUT <= 15
