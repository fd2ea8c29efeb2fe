"""Exercises 03.1/03.2: references pass their graders; untouched stubs and typical mistakes fail precisely."""
import pytest
import torch.distributed as dist
import torch.nn.functional as F

from exercises import ex03_vocab_parallel as ex03
from exercises.grading import GradingError
from minimegatron.mpu.cross_entropy import vocab_parallel_cross_entropy
from minimegatron.mpu.mappings import gather_from_tensor_model_parallel_region


def test_references_pass():
    assert ex03.grade_vocab_parallel_embedding(ex03.reference_embedding_forward).startswith("✓")
    assert ex03.grade_vocab_parallel_cross_entropy(vocab_parallel_cross_entropy).startswith("✓")


def test_untouched_stubs_fail_with_not_implemented():
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 03.1"):
        ex03.grade_vocab_parallel_embedding(ex03.vocab_parallel_embedding_forward)
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 03.2"):
        ex03.grade_vocab_parallel_cross_entropy(ex03.vocab_parallel_cross_entropy_forward)


def test_embedding_without_mask_is_wrong_values():
    def unmasked(ids, weight, start, end, state):  # clamps instead of masking: other ranks' rows leak in
        local = (ids - start).clamp(0, end - start - 1)
        return ex03.reduce_from_tensor_model_parallel_region(F.embedding(local, weight), state)

    with pytest.raises(GradingError, match=r"Exercise 03.1, rank 0, output .*mask the others.*wrong values"):
        ex03.grade_vocab_parallel_embedding(unmasked)


def _naive(logits, target, state):
    """No max subtraction: right for small logits, inf for huge ones."""
    start = state.tp_rank * logits.size(-1)
    outside = (target < start) | (target >= start + logits.size(-1))
    local = (target - start).masked_fill(outside, 0)
    z_t = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
    sum_exp = logits.exp().sum(-1)
    dist.all_reduce(z_t, group=state.tp_group)
    dist.all_reduce(sum_exp, group=state.tp_group)
    return sum_exp.log() - z_t


def test_missing_max_is_caught_on_huge_logits():
    with pytest.raises(GradingError, match=r"case 'huge logits.*inf/nan — subtract the max over the WHOLE"):
        ex03.grade_vocab_parallel_cross_entropy(_naive)


def test_gathering_the_logits_is_refused():
    def gathered(logits, target, state):
        full = gather_from_tensor_model_parallel_region(logits, state)
        return F.cross_entropy(full.reshape(-1, full.size(-1)), target.reshape(-1),
                               reduction="none").view(target.shape)

    with pytest.raises(GradingError, match=r"rank \d: .*Exercise 03.2: your code called dist.all_gather"):
        ex03.grade_vocab_parallel_cross_entropy(gathered)


def test_local_max_only_is_wrong_values():
    def local_max(logits, target, state):
        return _naive(logits - logits.max(-1, keepdim=True).values, target, state)

    with pytest.raises(GradingError, match=r"case 'random logits', per-token loss: wrong values"):
        ex03.grade_vocab_parallel_cross_entropy(local_max)


def test_in_place_change_is_named():
    def in_place(logits, target, state):
        logits.sub_(0.0)  # harmless value-wise, but an in-place write to the caller's tensor
        logits[..., 0] += 1e-3
        return vocab_parallel_cross_entropy(logits, target, state)

    with pytest.raises(GradingError, match="modified logits_shard or target in place"):
        ex03.grade_vocab_parallel_cross_entropy(in_place)
