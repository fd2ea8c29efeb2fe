"""ZeRO's formulas (minimegatron.measure.zero) against the paper's own numbers and each other.

The measured side — our ZeRO-1/2/3 and DeepSpeed's engines on gloo ranks equal to these formulas —
is in tests/data_parallel/test_zero.py and test_zero3.py."""
import pytest

from minimegatron.measure.comm import ring_wire_bytes
from minimegatron.measure.memory import (partition_numel, zero1_bytes_per_parameter,
                                         zero1_optimizer_state_bytes)
from minimegatron.measure.zero import (deepspeed_optimizer_state_bytes, zero_comm, zero_fp32_bytes,
                                       zero_paper_bytes, zero_paper_comm_elements)


def test_the_papers_figure_1_numbers():
    """Rajbhandari et al. 2020, Figure 1: Ψ = 7.5B, N_d = 64, K = 12 -> 120, 31.4, 16.6, 1.9 GB."""
    totals = [sum(zero_paper_bytes(7.5e9, 64, stage).values()) / 1e9 for stage in range(4)]
    assert totals == pytest.approx([120, 31.4, 16.6, 1.875], abs=0.05)
    assert zero_paper_bytes(1, 8, 2) == {"parameters": 2, "gradients": 2 / 8, "optimizer": 12 / 8}
    assert [zero_paper_comm_elements(10, s) for s in range(4)] == [20, 20, 20, 30]


def test_fp32_variant_per_parameter_and_padding():
    n, dp = 1000, 4  # a multiple of alignment·dp: no padding, the per-parameter rule is exact
    per_param = [sum(zero_fp32_bytes([n], dp, stage, num_tensors=0).values()) / n for stage in range(4)]
    assert per_param == [16, 8 + 12 / dp, 4 + 16 / dp, 20 / dp]
    assert per_param[1] == zero1_bytes_per_parameter(dp, mixed_precision=False)
    # 101 elements over 4 ranks: padded to 104 (a multiple of 2·4), 26 per rank
    assert partition_numel(101, 4) == 26 and partition_numel(101, 4, alignment=1) == 26
    assert partition_numel(5, 4, alignment=1) == 2 and partition_numel(5, 4) == 2
    per_rank = 52 + 2  # ⌈101/4⌉·2 + ⌈3/4⌉·2
    assert zero_fp32_bytes([101, 3], 2, 3) == {"parameters": 4 * per_rank, "gradients": 4 * per_rank,
                                               "optimizer": 12 * per_rank}
    assert zero_fp32_bytes([101], 1, 0, num_tensors=2)["optimizer"] == 8 * 101 + 8


def test_deepspeed_state_rules():
    groups = [[101, 7], [3]]  # stages 1–2 pad each group; stage 3 each parameter
    assert deepspeed_optimizer_state_bytes(groups, 4, 1) == zero1_optimizer_state_bytes([108, 3], 4)
    assert deepspeed_optimizer_state_bytes(groups, 4, 2) == deepspeed_optimizer_state_bytes(groups, 4, 1)
    three = deepspeed_optimizer_state_bytes(groups, 4, 3)
    assert three == {"exp_avg": 4 * (26 + 2 + 1), "exp_avg_sq": 4 * 29, "fp32_master": 4 * 29, "step": 8}
    assert "fp32_master" not in deepspeed_optimizer_state_bytes(groups, 4, 3, fp32_master_copy=False)


@pytest.mark.parametrize("dp", [2, 4, 8])
def test_comm_volume_2psi_and_3psi(dp):
    sizes = [1000 * dp, 24 * dp]  # no padding: the paper's Ψ exactly
    psi = sum(sizes) * 4
    for stage in (0, 1, 2):
        totals = zero_comm(sizes, dp, stage)
        assert sum(t.bytes for t in totals.values()) == (psi if stage == 0 else 2 * psi)
        # on the ring every rank sends (dp-1)/dp of 2Ψ, whether all-reduce or its two halves
        assert sum(t.wire_bytes for t in totals.values()) == 2 * (dp - 1) * psi // dp
    three = zero_comm(sizes, dp, 3)
    assert three["all_gather"].count == 4 and three["reduce_scatter"].count == 2
    assert sum(t.bytes for t in three.values()) == 3 * psi
    assert sum(t.wire_bytes for t in three.values()) == 3 * (dp - 1) * psi // dp
    tied = zero_comm(sizes, dp, 3, forward_gathers=[2, 1])  # GPT's tied table gathered twice forward
    assert tied["all_gather"].bytes == three["all_gather"].bytes + sizes[0] * 4
    assert three["all_gather"].wire_bytes == sum(2 * ring_wire_bytes("all_gather", n, 4, dp) for n in sizes)
    assert zero_comm(sizes, 1, 3) == {}


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="stage must be one of"):
        zero_paper_bytes(10, 2, 4)
    with pytest.raises(ValueError, match="data-parallel size"):
        zero_fp32_bytes([10], 0, 1)
    with pytest.raises(ValueError, match="forward_gathers has 1 entries for 2"):
        zero_comm([10, 10], 2, 3, forward_gathers=[2])
    with pytest.raises(ValueError, match="stages 1, 2, 3"):
        deepspeed_optimizer_state_bytes([[10]], 2, 0)
