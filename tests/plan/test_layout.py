"""Which layouts a model admits, each refusal one line naming the fix; the device table's checks."""
import pytest

from minimegatron.config import gpt_config, llama_config
from minimegatron.mixtral import mixtral_config
from minimegatron.plan import Device, Layout, enumerate_layouts, get_device, layout_problem

GPT = gpt_config(hidden_size=64, num_attention_heads=4, num_layers=6, vocab_size=256, max_seq_len=64)


@pytest.mark.parametrize("layout, words", [
    (Layout(tp=8, dp=1), "tp=8 does not divide the 4 query heads"),
    (Layout(pp=4, dp=2), "pp=4 does not divide num_layers=6"),
    (Layout(dp=3), "global batch 16 is not divisible by dp·micro_batch = 3·1"),
    (Layout(dp=2, micro_batch=16), "dp·micro_batch = 2·16"),
    (Layout(pp=2, zero=2), "ZeRO-2 with pp=2"),
    (Layout(cp=3), "2·cp = 6"),
    (Layout(dp=2, ep=2), "the model is dense"),
    (Layout(zero=4), "ZeRO stages are"),
    (Layout(recompute="some"), "recompute='some'"),
    (Layout(tp=0), "tp=0 must be an int >= 1"),
])
def test_each_refusal_names_the_problem(layout, words):
    message = layout_problem(GPT, layout, 16, 64)
    assert message is not None and words in message and "\n" not in message


def test_enumeration_keeps_exactly_the_layouts_that_divide():
    layouts = list(enumerate_layouts(GPT, 8, 16, 64))
    assert layouts and all(lay.num_devices == 8 for lay in layouts)
    assert all(layout_problem(GPT, lay, 16, 64) is None for lay in layouts)
    assert {lay.tp for lay in layouts} == {1, 2, 4}             # 8 does not divide 4 heads
    assert {lay.pp for lay in layouts} == {1, 2}                # 6 layers: pp 4, 8 refused
    assert all(lay.zero <= 1 for lay in layouts if lay.pp > 1)  # DeepSpeed's pipeline: ZeRO 0-1
    moe = mixtral_config(hidden_size=64, num_attention_heads=4, num_layers=2, num_experts=4, vocab_size=256,
                         max_seq_len=64)
    assert {lay.ep for lay in enumerate_layouts(moe, 8, 16, 64)} == {1, 2, 4}
    gqa = llama_config(hidden_size=64, num_attention_heads=8, num_kv_heads=2, num_layers=2, max_seq_len=64)
    assert layout_problem(gqa, Layout(tp=4, dp=2), 16, 64).startswith(
        "tp=4 does not divide the 8 query heads and 2 kv")


def test_devices_by_name_and_bad_numbers():
    assert get_device("H100") is get_device("h100-sxm") and get_device("Gaudi 2").memory_bytes == 96e9
    assert get_device("cpu").name.startswith("CPU")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        get_device("tpu")
    with pytest.raises(ValueError, match="peak_flops=0 must be a number > 0"):
        Device("x", 0, 1, 1, 1, 8)
