"""The fused, chunked LM head + cross-entropy against the dense computation and today's unfused path.

Head level (real gloo ranks, TP = 1, 2, 4, with and without SP): the loss and the gradients of the
hidden states and of the head weight equal plain torch's ``F.cross_entropy(h·Wᵀ)`` on the full weight,
with padded vocab rows (one case where whole ranks hold padding only), ignore_index labels (a whole
chunk of them), chunk sizes that do not divide the token count, and a zero-bubble W pass.
Model level: GPT (tied) and LLaMA (untied) give the same loss and gradients fused and unfused.
Memory: the bytes saved for backward, counted with SavedActivationCounter, equal the formulas; the
peak RSS of a fresh process shows the whole (N × V) logits in the unfused path and chunks only fused.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from minimegatron.checkpoint.reshape import check_config_matches
from minimegatron.config import gpt_config, llama_config
from minimegatron.gpt import GPTModel
from minimegatron.launch import launch
from minimegatron.llama import LLaMAModel
from minimegatron.measure.activations import SavedActivationCounter
from minimegatron.mpu.cross_entropy import vocab_parallel_cross_entropy
from minimegatron.mpu.embedding import ParallelLMHead, pad_vocab_size
from minimegatron.mpu.fused_cross_entropy import (default_chunk_tokens, fused_saved_bytes,
                                                  fused_vocab_parallel_cross_entropy, unfused_saved_bytes)
from minimegatron.mpu.state import ParallelState, initialize_model_parallel
from minimegatron.mpu.weight_grad import WeightGradStore

V, S, B, H = 50, 8, 3, 12  # N = 24 tokens
TINY = dict(vocab_size=V, hidden_size=16, num_layers=1, num_attention_heads=4, max_seq_len=S,
            make_vocab_size_divisible_by=8)


def close(got, expected, what, tol=1e-5):
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol, msg=lambda e: f"{what}: {e}")


def _labels(g):
    target = torch.randint(0, V, (S, B), generator=g)  # (s, b)
    flat = target.view(-1)  # (s, b) order: the order the fused loss chunks in
    flat[5:10] = -100  # with chunk 5: the whole second chunk is ignored
    flat[0], flat[13], flat[-1] = V - 1, -100, 0
    return target


def dense(x, w, target):
    """Plain torch: mean F.cross_entropy of x·Wᵀ over the real vocab; (loss, ∂x, ∂W) as leaves."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    logits = (x @ w.t())[..., :V]  # (s, b, V)
    loss = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), ignore_index=-100)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def _head_case(st, sp, divisible_by, chunk, deferred, what):
    g = torch.Generator().manual_seed(11)
    padded = pad_vocab_size(V, divisible_by, st.tp)
    x = torch.randn(S, B, H, generator=g)
    w = torch.randn(padded, H, generator=g)
    w[V:] = 0.0  # the padding rows, as the model keeps them
    target = _labels(g)
    ref_loss, ref_dx, ref_dw = dense(x, w, target)
    rows = w.chunk(st.tp)[st.tp_rank].clone().requires_grad_()  # (V_pad/tp, h)
    mine = (x.chunk(st.tp)[st.tp_rank] if sp else x).clone().requires_grad_()  # (s[/tp], b, h)
    store = WeightGradStore() if deferred else None
    total = fused_vocab_parallel_cross_entropy(mine, rows, target, st, V, chunk_tokens=chunk,
                                               sequence_parallel=sp, store=store)
    loss = total / (target != -100).sum()
    close(loss, ref_loss, f"{what}: loss")
    if deferred:
        with store.defer():
            loss.backward()
        assert rows.grad is None, f"{what}: the W pass was not deferred"
        store.run_oldest()
    else:
        loss.backward()
    close(mine.grad, ref_dx.chunk(st.tp)[st.tp_rank] if sp else ref_dx, f"{what}: ∂hidden")
    close(rows.grad, ref_dw.chunk(st.tp)[st.tp_rank], f"{what}: ∂weight")
    if st.tp > 1:  # every rank holds the same loss
        seen = loss.detach().clone()
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        assert seen == loss.detach(), f"{what}: ranks disagree on the loss"


def _model_case(cls, preset, st, chunk, what):
    def run(fused):
        config = preset(**TINY, fused_lm_loss=fused, lm_loss_chunk=chunk)
        model = cls(config, st, init_seed=3)
        g = torch.Generator().manual_seed(4)
        ids = torch.randint(0, V, (B, S), generator=g)
        labels = _labels(g).t().contiguous()  # (b, s)
        loss = model(ids, labels=labels)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    (loss, grads), (ref_loss, ref_grads) = run(True), run(False)
    close(loss, ref_loss, f"{what}: loss", 1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        close(grads[name], grad, f"{what}: ∂{name}", 1e-6)


def _cases():
    for tp in (1, 2, 4):
        for sp in (False, True):
            st = initialize_model_parallel(tp, sequence_parallel=sp)
            for divisible_by, chunk in ((8, 5), (8, 7), (32, 100), (8, None)):
                _head_case(st, sp, divisible_by, chunk, False, f"tp={tp} sp={sp} pad={divisible_by} chunk={chunk}")
            _head_case(st, sp, 8, 5, True, f"tp={tp} sp={sp} deferred W")
            for cls, preset in ((GPTModel, gpt_config), (LLaMAModel, llama_config)):
                _model_case(cls, preset, st, 7, f"{preset.__name__} tp={tp} sp={sp}")
    return True


def test_fused_equals_dense_and_unfused_tp_1_2_4_with_and_without_sp():
    assert all(launch(_cases, 4, timeout=180))


def test_saved_bytes_equal_the_formula_and_drop_the_logits():
    """Saved for backward: unfused keeps the (N × V_pad) softmax; fused only ∂H and ∂W."""
    n, h, vocab, chunk = 1024, 8, 2048, 64
    st = ParallelState()
    head = ParallelLMHead(vocab, h, state=st, make_vocab_size_divisible_by=vocab, loss_chunk=chunk)
    target = torch.randint(0, vocab, (n, 1))
    saved = {}
    for fused in (False, True):
        x = torch.randn(n, 1, h, requires_grad=True)
        with SavedActivationCounter(head) as acts:
            if fused:
                loss = head(x, labels=target)
            else:
                loss = vocab_parallel_cross_entropy(head(x), target, st, vocab).sum()
        saved[fused] = acts.total_bytes
        loss.backward()
    assert saved[False] == unfused_saved_bytes(n, h, vocab), saved
    assert saved[True] == fused_saved_bytes(n, h, vocab), saved
    assert saved[False] / saved[True] >= vocab / chunk  # the (N × V) term is gone


def test_no_grad_computes_the_loss_only_and_bad_arguments_are_named():
    st = ParallelState()
    g = torch.Generator().manual_seed(2)
    x, w, target = torch.randn(S, B, H, generator=g), torch.randn(56, H, generator=g), _labels(g)
    with torch.no_grad():
        total = fused_vocab_parallel_cross_entropy(x, w, target, st, V, chunk_tokens=5)
    losses = vocab_parallel_cross_entropy(x @ w.t(), target, st, V)
    close(total, losses.sum(), "no_grad loss")
    with pytest.raises(ValueError, match=r"chunk_tokens=0 must be a positive int"):
        fused_vocab_parallel_cross_entropy(x, w, target, st, V, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"target shape \(3, 8\) does not match the tokens \(8, 3\)"):
        fused_vocab_parallel_cross_entropy(x, w, target.t(), st, V)
    with pytest.raises(ValueError, match=r"lm_loss_chunk=0 must be a positive int"):
        gpt_config(lm_loss_chunk=0)
    assert default_chunk_tokens(8192) == 256 and default_chunk_tokens(512) == 4096


def test_fused_switch_is_a_runtime_setting_for_checkpoints():
    check_config_matches(gpt_config(**TINY), gpt_config(**TINY, fused_lm_loss=False, lm_loss_chunk=64))
    with pytest.raises(ValueError, match="hidden_size"):
        check_config_matches(gpt_config(**TINY), gpt_config(**dict(TINY, hidden_size=32)))


_RSS_PROBE = """
import sys, torch
from minimegatron.mpu.cross_entropy import vocab_parallel_cross_entropy
from minimegatron.mpu.embedding import ParallelLMHead
from minimegatron.mpu.state import ParallelState
def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
fused, n, h, v, c = sys.argv[1] == "fused", *map(int, sys.argv[2:])
st = ParallelState()
head = ParallelLMHead(v, h, state=st, make_vocab_size_divisible_by=v, loss_chunk=c)
x, t = torch.randn(n, 1, h, requires_grad=True), torch.randint(0, v, (n, 1))
run = lambda k: (head(x[:k], labels=t[:k]) if fused else
                 vocab_parallel_cross_entropy(head(x[:k]), t[:k], st, v).sum()).backward()
run(8)  # warm up the kernels
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from now
base = rss("VmRSS")
run(n)
print(rss("VmHWM") - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS is read from Linux /proc")
def test_peak_rss_holds_chunks_of_logits_not_all_of_them():
    """Unfused: the (N × V) softmax and its gradient exist whole, 2·N·V·4 bytes at the peak. Fused: a
    few (c × V) chunk buffers and ∂W, ∂H (the allocator keeps some freed chunks: 4 allowed)."""
    n, h, v, c = 2048, 32, 16384, 128
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    peak = {m: int(subprocess.run([sys.executable, "-c", _RSS_PROBE, m, str(n), str(h), str(v), str(c)],
                                  env=env, check=True, capture_output=True, text=True).stdout)
            for m in ("fused", "unfused")}
    assert peak["unfused"] >= 0.9 * 2 * n * v * 4, peak
    assert peak["fused"] <= 4 * c * v * 4 + 4 * v * h * 4 + 2 * n * h * 4, peak
