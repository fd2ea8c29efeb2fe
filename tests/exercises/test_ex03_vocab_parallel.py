"""Exercises 03.1/03.2: references and hand-written solutions pass; the untouched stubs and every wrong
solution of the battery (exercises/_ex03_mistakes.py) fail with the message that names the mistake.
The battery is graded in one launch of 4 ranks; the mistakes that raise on one rank only, alone."""
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from exercises import _ex03_mistakes as M
from exercises import ex03_vocab_parallel as ex03
from exercises.grading import GradingError
from minimegatron.mpu.cross_entropy import vocab_parallel_cross_entropy


def my_embedding(ids, weight, start, end, state):
    mine = (ids >= start) & (ids < end)
    rows = torch.where(mine, ids - start, torch.zeros_like(ids))
    out = weight[rows] * mine.unsqueeze(-1).to(weight.dtype)
    return ex03.reduce_from_tensor_model_parallel_region(out, state)


def my_cross_entropy(logits, target, state):
    """Logsumexp of each shard, combined: log S = m + log Σ_r exp(lse_r − m)."""
    per, r = logits.size(-1), state.tp_rank
    lse = torch.logsumexp(logits.float(), -1)
    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=state.tp_group)
    s = torch.exp(lse - m)
    dist.all_reduce(s, group=state.tp_group)
    owned = (target >= r * per) & (target < (r + 1) * per)
    zt = torch.where(owned, logits.float().gather(-1, (target - r * per).clamp(0, per - 1).unsqueeze(-1))
                     .squeeze(-1), torch.zeros(()))
    dist.all_reduce(zt, group=state.tp_group)
    return m + s.log() - zt


GOOD = [("03.1", lambda *a: ex03.reference_embedding_forward(*a)), ("03.1", my_embedding),
        ("03.1", lambda *a: M.lookup(*a)),
        ("03.2", lambda *a: vocab_parallel_cross_entropy(*a)), ("03.2", my_cross_entropy),
        ("03.2", lambda *a: M.loss(*a))]
STUBS = [("03.1", ex03.vocab_parallel_embedding_forward), ("03.2", ex03.vocab_parallel_cross_entropy_forward)]
REFERENCES = [("03.1", ex03.reference_embedding_forward), ("03.2", vocab_parallel_cross_entropy)]
BATCHED = [b for b in M.BATTERY if not b[4]]
ALONE = [b for b in M.BATTERY if b[4]]
GRADERS = {"03.1": ex03.grade_vocab_parallel_embedding, "03.2": ex03.grade_vocab_parallel_cross_entropy}


@pytest.fixture(scope="module")
def verdicts():
    cases = [(b[0], b[2]) for b in BATCHED] + GOOD + STUBS + REFERENCES
    return ex03.battery_verdicts(cases)


def test_references_and_hand_written_solutions_pass(verdicts):
    for (part, _), v in zip(GOOD, verdicts[len(BATCHED):]):
        assert v.startswith(f"✓ Exercise {part}"), v


def test_untouched_stubs_fail_and_the_reference_itself_is_refused(verdicts):
    rest = verdicts[len(BATCHED) + len(GOOD):]
    for (part, _), v in zip(STUBS, rest):
        assert re.match(rf"not implemented yet: .*Exercise {part}", v), v
    for (part, _), v in zip(REFERENCES, rest[len(STUBS):]):
        assert re.match(rf"Exercise {part}: that is the reference itself", v), v


@pytest.mark.parametrize("index", range(len(BATCHED)), ids=[f"{b[0]} {b[1]}" for b in BATCHED])
def test_every_mistake_is_named(verdicts, index):
    part, _, _, message, _ = BATCHED[index]
    assert not verdicts[index].startswith("✓"), f"a wrong solution passed: {verdicts[index]}"
    assert re.search(rf"Exercise {part}.*{message}", verdicts[index], re.S), verdicts[index]


@pytest.mark.parametrize("entry", ALONE, ids=[f"{b[0]} {b[1]}" for b in ALONE])
def test_an_off_by_one_range_is_named_not_a_raw_index_error(entry):
    part, _, candidate, message, _ = entry
    with pytest.raises(GradingError, match=rf"(?s)^rank \d: Exercise {part}, TP rank \d .*{message}") as err:
        GRADERS[part](candidate)
    assert "Traceback" not in str(err.value)


def test_the_public_graders():
    assert ex03.grade_vocab_parallel_embedding(my_embedding).startswith("✓ Exercise 03.1")
    with pytest.raises(GradingError, match=r"Exercise 03.2, rank 0 .*each rank subtracted its OWN max"):
        ex03.grade_vocab_parallel_cross_entropy(M.switched(local_max=True))
    with pytest.raises(GradingError, match="Exercise 03.2: that is the reference itself"):
        ex03.grade_vocab_parallel_cross_entropy(vocab_parallel_cross_entropy)
