"""minimegatron.sizes: the one divisibility check, the one vocab padding, the one int test."""
import pytest

from minimegatron.mpu.embedding import pad_vocab_size as embedding_pad
from minimegatron.mpu.mappings import divide as mappings_divide
from minimegatron.sizes import divide, is_int, pad_vocab_size


def test_is_int_refuses_bools_and_floats():
    assert is_int(3) and not is_int(True) and not is_int(3.0)


def test_divide_default_and_custom_messages():
    assert divide(12, 4) == 3
    with pytest.raises(ValueError, match=r"^hidden=10 is not divisible by tensor-parallel size 4: every "
                                         r"rank must hold an equal slice; choose hidden as a multiple of 4"):
        divide(10, 4, "hidden")
    with pytest.raises(ValueError, match=r"^x=10 is not divisible by stride 3: my fix$"):
        divide(10, 3, "x", by="stride 3", fix="my fix")


def test_pad_vocab_size_is_megatrons_rounding_and_the_only_copy():
    assert pad_vocab_size(50257, 128, 1) == 50304 and pad_vocab_size(50257, 128, 8) == 51200
    with pytest.raises(ValueError, match="make_vocab_size_divisible_by=0 must be >= 1"):
        pad_vocab_size(10, 0, 1)
    assert embedding_pad is pad_vocab_size and mappings_divide is divide
