"""vocab_parallel_cross_entropy against torch.nn.functional.cross_entropy on real ranks, TP = 1, 2, 4:
per-token loss and logit gradient, with padded vocab columns, ignore_index and huge logits."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from minimegatron.launch import launch
from minimegatron.mpu.cross_entropy import vocab_parallel_cross_entropy
from minimegatron.mpu.embedding import pad_vocab_size
from minimegatron.mpu.state import ParallelState, initialize_model_parallel

V, S, B = 50, 6, 3


def close(got, expected, what, tol=1e-6):
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol, msg=lambda e: f"{what}: {e}")


def reference(full, target, vocab_size, weights):
    """F.cross_entropy on the real vocab columns; gradient padded back with zeros."""
    real = full[..., :vocab_size].detach().clone().requires_grad_()
    loss = F.cross_entropy(real.reshape(-1, vocab_size), target.reshape(-1), reduction="none",
                           ignore_index=-100).view(target.shape)
    (loss * weights).sum().backward()
    pad = torch.zeros(*full.shape[:-1], full.size(-1) - vocab_size)
    return loss.detach(), torch.cat([real.grad, pad], dim=-1)


def _check(st, full, target, vocab_size, what, tol=1e-6):
    g = torch.Generator().manual_seed(5)
    weights = torch.randn(target.shape, generator=g)
    ref_loss, ref_grad = reference(full, target, vocab_size, weights)
    logits = full.chunk(st.tp, -1)[st.tp_rank].clone().requires_grad_()  # (…, V_pad/tp)
    loss = vocab_parallel_cross_entropy(logits, target, st, vocab_size=vocab_size)
    close(loss, ref_loss, f"{what}: loss", tol)
    (loss * weights).sum().backward()
    close(logits.grad, ref_grad.chunk(st.tp, -1)[st.tp_rank], f"{what}: gradient", tol)


def _cases():
    for tp in (1, 2, 4):
        st = initialize_model_parallel(tp)
        g = torch.Generator().manual_seed(300 + tp)
        padded = pad_vocab_size(V, 8, tp)  # 56 at tp=1, 64 at tp=2 and 4
        full = 3 * torch.randn(S, B, padded, generator=g)
        full[..., V:] = 100.0  # garbage in the padding: it must not count
        target = torch.randint(0, V, (S, B), generator=g)
        target[0, 0], target[1, 1], target[2, 2], target[3, 0] = -100, V - 1, 0, -100
        _check(st, full, target, V, f"tp={tp} padded+ignore")
        _check(st, full + 1e4, target, V, f"tp={tp} huge logits", tol=1e-5)  # exp(1e4) = inf if naive
        _check(st, full[..., :V - V % tp] if V % tp else full[..., :V], target.clamp(max=V - V % tp - 1),
               V - V % tp, f"tp={tp} no padding")
        all_ignored = torch.full((S, B), -100)
        loss = vocab_parallel_cross_entropy(full.chunk(tp, -1)[st.tp_rank], all_ignored, st, V)
        assert torch.equal(loss, torch.zeros(S, B)), "all-ignored tokens must give loss 0"
    # bf16 logits: fp32 math inside, gradient in the logits' dtype
    st = initialize_model_parallel(2)
    logits = torch.randn(4, 64).bfloat16().chunk(2, -1)[st.tp_rank].requires_grad_()
    target = torch.randint(0, V, (4,))
    loss = vocab_parallel_cross_entropy(logits, target, st, vocab_size=V)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    errors = []
    for bad_target in (torch.tensor([1, V]), torch.tensor([-1, 2])):
        try:
            vocab_parallel_cross_entropy(torch.zeros(2, 32), bad_target, st, vocab_size=V,
                                         check_targets=True)  # the debugging switch
        except ValueError as e:
            errors.append(str(e))
    t = torch.ones(1)  # errors came before any collective: ranks still in step
    dist.all_reduce(t)
    return errors


def test_matches_torch_cross_entropy_tp_1_2_4():
    for errors in launch(_cases, 4, timeout=120):
        assert errors[0].startswith(f"target token id {V} is outside the vocabulary [0, {V})")
        assert errors[1].startswith(f"target token id -1 is outside the vocabulary [0, {V})")


def test_target_check_is_a_switch_and_skips_ignore_index():
    from minimegatron.mpu.cross_entropy import validate_targets

    st, logits = ParallelState(), torch.zeros(3, 8)
    validate_targets(torch.tensor([-100, 0, 7]), 8)  # ignore_index and the edges are fine
    with pytest.raises(ValueError, match=r"target token id 8 is outside the vocabulary \[0, 8\)"):
        vocab_parallel_cross_entropy(logits, torch.tensor([-100, 8, 1]), st, check_targets=True)
    with pytest.raises(ValueError, match="target token id -3 is outside"):
        validate_targets(torch.tensor([-3, 1, -100]), 8)
    loss = vocab_parallel_cross_entropy(logits, torch.tensor([-100, 1, 2]), st)  # default: no host sync
    assert loss.shape == (3,) and loss[0] == 0


def test_bad_arguments_are_named():
    st = ParallelState()
    with pytest.raises(ValueError, match=r"target shape \(3,\) does not match the logits' \(2,\)"):
        vocab_parallel_cross_entropy(torch.zeros(2, 8), torch.zeros(3, dtype=torch.long), st)
    with pytest.raises(ValueError, match=r"vocab_size=9 must be in \[1, 8\]"):
        vocab_parallel_cross_entropy(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long), st, vocab_size=9)
    with pytest.raises(TypeError, match="integer token ids"):
        vocab_parallel_cross_entropy(torch.zeros(2, 8), torch.zeros(2), st)


def test_single_device_equals_torch():
    logits = torch.randn(5, 7, 16, requires_grad=True)
    target = torch.randint(0, 16, (5, 7))
    loss = vocab_parallel_cross_entropy(logits, target, ParallelState())
    ref = F.cross_entropy(logits.detach().view(-1, 16), target.view(-1), reduction="none").view(5, 7)
    close(loss, ref, "tp=1 loss")
