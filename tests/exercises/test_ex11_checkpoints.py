"""Exercise 11.1: the reference passes its grader; the stub and the classic stride mistake fail."""
import pytest
import torch

from exercises import _ex11_mistakes as M
from exercises import ex11_checkpoints as ex11
from exercises.grading import GradingError
from minimegatron.mpu.layers import shard_weight


def reference_reshard(shards, dim, stride, new_tp):
    blocks = zip(*(s.chunk(stride, dim) for s in shards))  # block i: every rank's piece i
    full = torch.cat([torch.cat(pieces, dim) for pieces in blocks], dim)
    return [shard_weight(full, dim, r, new_tp, stride) for r in range(new_tp)]


def test_reference_passes():
    assert ex11.grade_reshard(reference_reshard).startswith("✓")
    assert ex11.grade_reshard(M.reshard).startswith("✓")
    assert ex11.TIMEOUT <= 10


@pytest.mark.parametrize("entry", M.BATTERY, ids=[b[0] for b in M.BATTERY])
def test_every_mistake_is_named(entry):
    with pytest.raises(GradingError, match=rf"^Exercise 11.1, case '.*' \(full .*\): {entry[2]}"):
        ex11.grade_reshard(entry[1])


def test_untouched_stub_fails():
    with pytest.raises(GradingError, match="Exercise 11.1 is not implemented"):
        ex11.grade_reshard(ex11.reshard)


def test_ignoring_the_stride_is_explained():
    def no_stride(shards, dim, stride, new_tp):  # concatenate, then cut in new_tp contiguous slices
        return list(torch.cat(shards, dim).chunk(new_tp, dim))

    with pytest.raises(GradingError, match=r"case 'SwiGLU \[gate; up\] stride 2, TP 2 -> 1'.*"
                                           r"the stride was ignored"):
        ex11.grade_reshard(no_stride)


def test_wrong_number_of_shards_is_named():
    with pytest.raises(GradingError, match="got 1 shards, expected a list of new_tp = 2"):
        ex11.grade_reshard(lambda shards, dim, stride, new_tp: [torch.cat(shards, dim)])
