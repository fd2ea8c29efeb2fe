"""Parallel layers against the dense computation on real gloo ranks, TP = 1, 2, 4 (fp32).

The dense reference is plain torch on the TP=1 master weights (built with the same seed), so each case
also checks the initialisation rule: a TP=k layer holds exactly the shards of the TP=1 layer.
Outputs, input gradients and (gathered) weight gradients are compared.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from minimegatron.launch import launch
from minimegatron.mpu.embedding import ParallelLMHead, VocabParallelEmbedding, pad_vocab_size
from minimegatron.mpu.layers import ColumnParallelLinear, RowParallelLinear, gather_weight, shard_weight
from minimegatron.mpu.state import ParallelState, initialize_model_parallel

S, B, H, OUT, V = 8, 2, 12, 24, 50
DENSE = ParallelState()


def close(got, expected, what):
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=lambda e: f"{what}: {e}")


def leaf(t):
    return t.detach().clone().requires_grad_()


def dense_linear(x, w, b):
    """y = x·Wᵀ + b and the grads of <y, c>, all as leaves."""
    x, w, b = leaf(x), leaf(w), leaf(b)
    return x, w, b, x @ w.t() + b


def _column(st, g, stride, gather_output, sp, seed=7):
    what = f"Column tp={st.tp} stride={stride} gather={gather_output} sp={sp}"
    tp, r = st.tp, st.tp_rank
    torch.manual_seed(seed)
    master = ColumnParallelLinear(H, OUT, state=DENSE, stride=stride).weight.detach()
    torch.manual_seed(seed)
    layer = ColumnParallelLinear(H, OUT, state=st, stride=stride, gather_output=gather_output,
                                 sequence_parallel=sp)
    assert torch.equal(layer.weight, shard_weight(master, 0, r, tp, stride)), f"{what}: init rule"
    bias = torch.randn(OUT, generator=g)
    with torch.no_grad():
        layer.bias.copy_(shard_weight(bias, 0, r, tp, stride))
    x_full, c = torch.randn(S, B, H, generator=g), torch.randn(S, B, OUT, generator=g)
    xd, wd, bd, yd = dense_linear(x_full, master, bias)
    (yd * c).sum().backward()

    x = leaf(x_full.chunk(tp, 0)[r] if sp else x_full)  # (s/tp, b, h) under SP
    y = layer(x)
    if gather_output:
        close(y, yd, f"{what}: output")
        (y * c).sum().backward()
    else:
        close(y, shard_weight(yd, -1, r, tp, stride), f"{what}: output shard")
        (y * shard_weight(c, -1, r, tp, stride)).sum().backward()
    close(x.grad, xd.grad.chunk(tp, 0)[r] if sp else xd.grad, f"{what}: input grad")
    close(gather_weight(layer.weight.grad, 0, st, stride), wd.grad, f"{what}: weight grad")
    close(gather_weight(layer.bias.grad, 0, st, stride), bd.grad, f"{what}: bias grad")


def _row(st, g, input_is_parallel, sp, seed=8):
    what = f"Row tp={st.tp} input_is_parallel={input_is_parallel} sp={sp}"
    tp, r = st.tp, st.tp_rank
    torch.manual_seed(seed)
    master = RowParallelLinear(OUT, H, state=DENSE).weight.detach()
    torch.manual_seed(seed)
    layer = RowParallelLinear(OUT, H, state=st, input_is_parallel=input_is_parallel, sequence_parallel=sp)
    assert torch.equal(layer.weight, shard_weight(master, 1, r, tp)), f"{what}: init rule"
    assert getattr(layer.bias, "sequence_parallel", False) == sp
    bias = torch.randn(H, generator=g)
    with torch.no_grad():
        layer.bias.copy_(bias)  # replicated, added once after the reduction
    x_full, c = torch.randn(S, B, OUT, generator=g), torch.randn(S, B, H, generator=g)
    xd, wd, bd, yd = dense_linear(x_full, master, bias)
    (yd * c).sum().backward()

    x = leaf(x_full.chunk(tp, -1)[r] if input_is_parallel else x_full)
    y = layer(x)
    if sp:
        close(y, yd.chunk(tp, 0)[r], f"{what}: output chunk (s/tp, b, h)")
        (y * c.chunk(tp, 0)[r]).sum().backward()  # the bias saw s/tp tokens per rank: f summed it
    else:
        close(y, yd, f"{what}: output")
        (y * c).sum().backward()
    close(x.grad, xd.grad.chunk(tp, -1)[r] if input_is_parallel else xd.grad, f"{what}: input grad")
    close(gather_weight(layer.weight.grad, 1, st), wd.grad, f"{what}: weight grad")
    close(layer.bias.grad, bd.grad, f"{what}: bias grad")


def _mlp(st, g, sp):
    """Column → GeLU → Row, the Megatron MLP: one all-reduce (or RS + AG) forward and backward."""
    tp, r = st.tp, st.tp_rank
    torch.manual_seed(3)
    w1 = ColumnParallelLinear(H, OUT, state=DENSE).weight.detach()
    w2 = RowParallelLinear(OUT, H, state=DENSE).weight.detach()
    torch.manual_seed(3)
    fc1 = ColumnParallelLinear(H, OUT, state=st, gather_output=False, sequence_parallel=sp)
    fc2 = RowParallelLinear(OUT, H, state=st, input_is_parallel=True, sequence_parallel=sp)
    x_full, c = torch.randn(S, B, H, generator=g), torch.randn(S, B, H, generator=g)
    xd = leaf(x_full)
    yd = F.gelu(xd @ w1.t()) @ w2.t()
    (yd * c).sum().backward()
    x = leaf(x_full.chunk(tp, 0)[r] if sp else x_full)
    y = fc2(F.gelu(fc1(x)))
    close(y, yd.chunk(tp, 0)[r] if sp else yd, f"MLP tp={tp} sp={sp}: output")
    (y * (c.chunk(tp, 0)[r] if sp else c)).sum().backward()
    close(x.grad, xd.grad.chunk(tp, 0)[r] if sp else xd.grad, f"MLP tp={tp} sp={sp}: input grad")


def _linear_cases():
    for tp in (1, 2, 4):
        st = initialize_model_parallel(tp)
        g = torch.Generator().manual_seed(100 + tp)
        for stride in (1, 3):
            for gather_output in (True, False):
                for sp in (False, True):
                    _column(st, g, stride, gather_output, sp)
        for input_is_parallel in (True, False):
            for sp in (False, True):
                _row(st, g, input_is_parallel, sp)
        for sp in (False, True):
            _mlp(st, g, sp)
    st = initialize_model_parallel(4)
    errors = []
    for build in (lambda: ColumnParallelLinear(H, 10, state=st),
                  lambda: ColumnParallelLinear(H, 12, state=st, stride=2),  # needs a multiple of 8
                  lambda: RowParallelLinear(10, H, state=st)):
        try:
            build()
        except ValueError as e:
            errors.append(str(e))
    t = torch.ones(1)  # constructors never communicate: the ranks are still in step
    dist.all_reduce(t)
    return errors


def test_linear_layers_match_dense_tp_1_2_4():
    for errors in launch(_linear_cases, 4, timeout=120):
        assert errors[0].startswith("ColumnParallelLinear output_size=10 is not divisible by "
                                    "tensor-parallel size 4: ")
        assert "tensor-parallel size 4 × stride 2 = 8" in errors[1] and "multiple of 8" in errors[1]
        assert errors[2].startswith("RowParallelLinear input_size=10 is not divisible")


def _sp_saved_input(world):
    """Under SP the column layer and the LM head keep the (s/tp, b, h) shard of their input for
    backward (re-gathered there), not the all-gathered (s, b, h) — and still match the dense layer."""
    from minimegatron.measure.activations import SavedActivationCounter

    st = initialize_model_parallel(world)
    tp, r = st.tp, st.tp_rank
    g = torch.Generator().manual_seed(11)
    saved = {}
    for stride in (1, 3):
        torch.manual_seed(5)
        master = ColumnParallelLinear(H, OUT, state=DENSE, stride=stride).weight.detach()
        torch.manual_seed(5)
        layer = ColumnParallelLinear(H, OUT, state=st, stride=stride, gather_output=False,
                                     sequence_parallel=True)
        bias = torch.randn(OUT, generator=g)
        with torch.no_grad():
            layer.bias.copy_(shard_weight(bias, 0, r, tp, stride))
        x_full, c = torch.randn(S, B, H, generator=g), torch.randn(S, B, OUT, generator=g)
        xd, wd, bd, yd = dense_linear(x_full, master, bias)
        (yd * c).sum().backward()
        x = leaf(x_full.chunk(tp, 0)[r])  # (s/tp, b, h)
        with SavedActivationCounter(layer, layers={"column": layer}) as acts:
            y = layer(x)  # (s, b, out/tp)
        saved[f"column stride={stride}"] = [(rec.shape, rec.bytes) for rec in acts.records]
        what = f"SP column tp={tp} stride={stride}"
        close(y, shard_weight(yd, -1, r, tp, stride), f"{what}: output shard")
        (y * shard_weight(c, -1, r, tp, stride)).sum().backward()
        close(x.grad, xd.grad.chunk(tp, 0)[r], f"{what}: input grad")
        close(gather_weight(layer.weight.grad, 0, st, stride), wd.grad, f"{what}: weight grad")
        close(gather_weight(layer.bias.grad, 0, st, stride), bd.grad, f"{what}: bias grad")

    torch.manual_seed(6)
    head = ParallelLMHead(V, H, state=st, make_vocab_size_divisible_by=8, sequence_parallel=True)
    master = gather_weight(head.weight, 0, st)  # (V_pad, h), the padding depends on tp
    x_full = torch.randn(S, B, H, generator=g)
    c = torch.randn(S, B, master.size(0), generator=g)
    xd, wd = leaf(x_full), leaf(master)
    ((xd @ wd.t()) * c).sum().backward()
    x = leaf(x_full.chunk(tp, 0)[r])  # (s/tp, b, h)
    with SavedActivationCounter(head, layers={"head": head}) as acts:
        y = head(x)  # (s, b, V_pad/tp)
    saved["lm head"] = [(rec.shape, rec.bytes) for rec in acts.records]
    (y * shard_weight(c, -1, r, tp)).sum().backward()
    close(x.grad, xd.grad.chunk(tp, 0)[r], f"SP LM head tp={tp}: input grad")
    close(gather_weight(head.weight.grad, 0, st), wd.grad, f"SP LM head tp={tp}: weight grad")
    return saved


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_column_saves_only_the_input_shard(world):
    for saved in launch(_sp_saved_input, world, world, timeout=60):
        for what, records in saved.items():
            # one saved storage: this rank's (s/tp, b, h) fp32 shard; the weight is a parameter
            assert records == [((S // world, B, H), S // world * B * H * 4)], f"{what}: {records}"


def _vocab_cases():
    for tp in (1, 2, 4):
        st = initialize_model_parallel(tp)
        r = st.tp_rank
        g = torch.Generator().manual_seed(200 + tp)
        torch.manual_seed(11)
        master = VocabParallelEmbedding(V, H, state=DENSE, make_vocab_size_divisible_by=1).weight.detach()
        torch.manual_seed(11)
        emb = VocabParallelEmbedding(V, H, state=st, make_vocab_size_divisible_by=8)
        padded = pad_vocab_size(V, 8, tp)
        assert emb.padded_vocab_size == padded and emb.weight.shape == (padded // tp, H)
        assert (emb.vocab_start_index, emb.vocab_end_index) == (r * padded // tp, (r + 1) * padded // tp)
        table = torch.cat([master, torch.zeros(padded - V, H)])  # padded rows are zero
        assert torch.equal(gather_weight(emb.weight, 0, st), table), f"emb tp={tp}: init rule"

        ids = torch.randint(0, V, (B, S), generator=g)
        ids[0, :2] = torch.tensor([0, V - 1])
        c = torch.randn(B, S, H, generator=g)
        wd = leaf(table)
        yd = F.embedding(ids, wd)
        (yd * c).sum().backward()
        y = emb(ids)
        close(y, yd, f"embedding tp={tp}: output")
        (y * c).sum().backward()
        close(gather_weight(emb.weight.grad, 0, st), wd.grad, f"embedding tp={tp}: weight grad")

        for sp in (False, True):  # untied LM head: logits shard (…, V_pad/tp)
            torch.manual_seed(12)
            head_master = ParallelLMHead(V, H, state=DENSE, make_vocab_size_divisible_by=1).weight
            torch.manual_seed(12)
            head = ParallelLMHead(V, H, state=st, make_vocab_size_divisible_by=8, sequence_parallel=sp)
            wd = leaf(gather_weight(head.weight, 0, st))
            assert torch.equal(wd, torch.cat([head_master.detach(), torch.zeros(padded - V, H)]))
            h_full, c = torch.randn(S, B, H, generator=g), torch.randn(S, B, padded, generator=g)
            hd = leaf(h_full)
            yd = hd @ wd.t()
            (yd * c).sum().backward()
            h = leaf(h_full.chunk(tp, 0)[r] if sp else h_full)
            y = head(h)
            close(y, yd.chunk(tp, -1)[r], f"LM head tp={tp} sp={sp}: logits shard")
            (y * c.chunk(tp, -1)[r]).sum().backward()
            close(h.grad, hd.grad.chunk(tp, 0)[r] if sp else hd.grad, f"LM head tp={tp} sp={sp}: input grad")
            close(gather_weight(head.weight.grad, 0, st), wd.grad, f"LM head tp={tp} sp={sp}: weight grad")

        # tied: the head owns no weight, it multiplies by the embedding's; the gradient sums both uses
        emb.weight.grad = None
        head = ParallelLMHead(V, H, state=st, make_vocab_size_divisible_by=8, tied=True)
        assert head.weight is None and not list(head.parameters()) and not head.state_dict()
        wd = leaf(table)
        logits_d = F.embedding(ids, wd) @ wd.t()  # (b, s, V_pad)
        c = torch.randn(B, S, padded, generator=g)
        (logits_d * c).sum().backward()
        y = head(emb(ids), weight=emb.weight)
        close(y, logits_d.chunk(tp, -1)[r], f"tied tp={tp}: logits shard")
        (y * c.chunk(tp, -1)[r]).sum().backward()
        close(gather_weight(emb.weight.grad, 0, st), wd.grad, f"tied tp={tp}: weight grad")

    st = initialize_model_parallel(2)
    emb = VocabParallelEmbedding(V, H, state=st, make_vocab_size_divisible_by=8, check_token_ids=True)
    errors = []
    for bad in (V, -1):
        try:
            emb(torch.tensor([[1, bad]]))
        except ValueError as e:
            errors.append(str(e))
    try:
        ParallelLMHead(V + 100, H, state=st, make_vocab_size_divisible_by=8, tied=True)(
            torch.zeros(S, B, H), weight=emb.weight)
    except ValueError as e:
        errors.append(str(e))
    t = torch.ones(1)
    dist.all_reduce(t)
    return errors


def test_vocab_parallel_embedding_and_lm_head_match_dense_tp_1_2_4():
    for errors in launch(_vocab_cases, 4, timeout=120):
        assert errors[0].startswith(f"token id {V} is outside the vocabulary [0, {V})")
        assert errors[1].startswith(f"token id -1 is outside the vocabulary [0, {V})")
        assert "tied weight has shape (32, 12), expected (80, 12)" in errors[2]


def test_shard_weight_stride_3_is_q_k_v_blocks():
    q, k, v = (torch.randn(8, 5) for _ in range(3))
    fused = torch.cat([q, k, v])  # (3·8, 5): the fused QKV weight
    for tp in (1, 2, 4):
        for r in range(tp):
            expected = torch.cat([q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r]])
            assert torch.equal(shard_weight(fused, 0, r, tp, stride=3), expected)
    kv = torch.cat([k, v], dim=1)  # stride along dim 1 as well
    assert torch.equal(shard_weight(kv, 1, 1, 5, stride=2), torch.cat([k[:, 1:2], v[:, 1:2]], 1))
    assert torch.equal(gather_weight(shard_weight(fused, 0, 0, 1, 3), 0, DENSE, 3), fused)


def test_bad_sizes_name_the_size_tp_and_fix():
    st = ParallelState(tp=4)  # constructing never communicates, so no ranks are needed here
    with pytest.raises(ValueError, match=r"output_size=10 is not divisible by tensor-parallel size 4: .*"
                                         r"multiple of 4"):
        ColumnParallelLinear(8, 10, state=st)
    with pytest.raises(ValueError, match=r"size of dim 0=10 is not divisible by tensor-parallel size 2 "
                                         r"× stride 3 = 6"):
        shard_weight(torch.zeros(10, 2), 0, 0, 2, stride=3)
    with pytest.raises(ValueError, match="make_vocab_size_divisible_by=0"):
        VocabParallelEmbedding(10, 4, state=st, make_vocab_size_divisible_by=0)


def test_megatron_param_attributes():
    st = ParallelState(tp=2)
    col = ColumnParallelLinear(4, 6, state=st, stride=3)
    row = RowParallelLinear(4, 6, state=st, sequence_parallel=True)
    assert (col.weight.tensor_model_parallel, col.weight.partition_dim, col.weight.partition_stride) == (True, 0, 3)
    assert col.bias.tensor_model_parallel and torch.equal(col.bias, torch.zeros(3))
    assert (row.weight.tensor_model_parallel, row.weight.partition_dim) == (True, 1)
    assert row.bias.tensor_model_parallel is False and row.bias.sequence_parallel is True
    emb = VocabParallelEmbedding(10, 4, state=st, make_vocab_size_divisible_by=4, dtype=torch.float64)
    assert emb.padded_vocab_size == 16 and emb.weight.dtype == torch.float64


def test_tied_lm_head_takes_its_weight_at_call_time_and_untied_owns_it():
    """One way to tie: a tied head has no weight and multiplies by the one it is handed, always."""
    emb = VocabParallelEmbedding(V, H, state=DENSE, make_vocab_size_divisible_by=8)
    head = ParallelLMHead(V, H, state=DENSE, make_vocab_size_divisible_by=8, tied=True)
    assert head.weight is None and "tied=True" in repr(head)
    hidden = torch.randn(3, H)
    close(head(hidden, weight=emb.weight), hidden @ emb.weight.T, "the embedding's table")
    other = torch.randn_like(emb.weight)  # e.g. the owner's Parameter was replaced: the current one counts
    close(head(hidden, weight=other), hidden @ other.T, "weight passed at call time")
    with pytest.raises(ValueError, match=r"tied \(tied=True\) and owns no weight: call it as "
                                         r"head\(hidden, weight=embedding.weight\)"):
        head(hidden)
    with pytest.raises(ValueError, match=r"shape \(4, 12\), expected \(56, 12\)"):
        head(hidden, weight=torch.zeros(4, H))
    untied = ParallelLMHead(V, H, state=DENSE, make_vocab_size_divisible_by=8)
    assert untied.weight.shape == (56, H) and list(untied.state_dict()) == ["weight"]
    close(untied(hidden), hidden @ untied.weight.T, "untied: its own weight")
    with pytest.raises(ValueError, match="untied and multiplies by its own weight"):
        untied(hidden, weight=emb.weight)


def test_token_id_check_is_a_per_instance_constructor_switch():
    checked = VocabParallelEmbedding(V, H, state=DENSE, check_token_ids=True)
    unchecked = VocabParallelEmbedding(V, H, state=DENSE)  # the default: no host sync in the hot path
    assert "check_token_ids" not in vars(VocabParallelEmbedding)  # no class-wide (hidden global) switch
    assert checked.check_token_ids and not unchecked.check_token_ids
    bad = torch.tensor([[1, V]])
    with pytest.raises(ValueError, match=f"token id {V} is outside the vocabulary"):
        checked(bad)
    assert unchecked(bad).shape == (1, 2, H)  # the caller vouched for its ids: no host sync
