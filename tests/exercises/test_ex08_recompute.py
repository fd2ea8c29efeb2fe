"""Exercises 08.1–08.2: the package passes its graders, a hand-written checkpoint passes too, and the
stubs and typical mistakes fail with a message that names the problem."""
import pytest
import torch

from exercises import _ex08_mistakes as M
from exercises import ex08_recompute as ex08
from exercises.grading import GradingError
from minimegatron.measure import korthikanti_activation_bytes


class _HandCheckpoint(torch.autograd.Function):
    """A correct solution of 08.1 (reentrant style); ``replay_rng=False`` is the classic mistake."""

    replay_rng = True

    @staticmethod
    def forward(ctx, run_function, hidden):
        ctx.run_function, ctx.rng = run_function, torch.get_rng_state()
        ctx.save_for_backward(hidden)
        return run_function(hidden)

    @staticmethod
    def backward(ctx, grad_output):
        (hidden,) = ctx.saved_tensors
        with torch.random.fork_rng():
            if _HandCheckpoint.replay_rng:
                torch.set_rng_state(ctx.rng)
            with torch.enable_grad():
                x = hidden.detach().requires_grad_()
                out = ctx.run_function(x)
            torch.autograd.backward(out, grad_output)
        return None, x.grad


def test_references_pass():
    assert ex08.grade_checkpointed_forward(lambda *a: ex08.package_checkpointed_forward(*a)).startswith("✓")
    assert ex08.grade_checkpointed_forward(
        lambda layer, x: torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)).startswith("✓")
    assert ex08.grade_korthikanti_bytes(lambda *a: korthikanti_activation_bytes(*a)).startswith("✓")
    assert ex08.grade_checkpointed_forward(M.checkpoint_with()).startswith("✓")


def test_a_hand_written_checkpoint_passes_and_forgetting_the_rng_is_named(monkeypatch):
    assert ex08.grade_checkpointed_forward(_HandCheckpoint.apply).startswith("✓")
    monkeypatch.setattr(_HandCheckpoint, "replay_rng", False)
    with pytest.raises(GradingError, match=r"dropout=0.1\), gradient of hidden \(the recomputed forward "
                                           r"drew different dropout masks.*wrong values"):
        ex08.grade_checkpointed_forward(_HandCheckpoint.apply)


def test_untouched_stubs_fail_with_not_implemented():
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 08.1"):
        ex08.grade_checkpointed_forward(ex08.checkpointed_forward)
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 08.2"):
        ex08.grade_korthikanti_bytes(ex08.korthikanti_bytes)


def test_no_checkpoint_at_all_keeps_too_much():
    with pytest.raises(GradingError, match=r"dropout=0.0\): your forward kept [\d,]+ B for backward; a "
                                           r"checkpointed layer keeps only its input, 4,096 B"):
        ex08.grade_checkpointed_forward(lambda layer, x: layer(x))


def test_no_grad_without_a_function_is_disconnected():
    def detached(layer, x):
        with torch.no_grad():
            return layer(x)
    with pytest.raises(GradingError, match="the output does not require grad"):
        ex08.grade_checkpointed_forward(detached)


def test_candidate_exceptions_carry_the_traceback():
    def broken(layer, x):
        raise RuntimeError("boom")
    with pytest.raises(GradingError, match=r"(?s)dropout=0.0\): your broken raised RuntimeError: boom\n"
                                           r"Traceback.*in broken\n    raise RuntimeError"):
        ex08.grade_checkpointed_forward(broken)


@pytest.mark.parametrize("entry", M.CHECKPOINT_BATTERY, ids=[b[0] for b in M.CHECKPOINT_BATTERY])
def test_every_checkpoint_mistake_is_named(entry):
    with pytest.raises(GradingError, match=rf"(?s)^Exercise 08.1 \(GPT layer, dropout=0.\d\).*{entry[2]}"):
        ex08.grade_checkpointed_forward(entry[1])


@pytest.mark.parametrize("entry", M.FORMULA_BATTERY, ids=[b[0] for b in M.FORMULA_BATTERY])
def test_every_formula_mistake_is_named(entry):
    with pytest.raises(GradingError, match=rf"^Exercise 08.2 korthikanti_bytes\(.*\): .*{entry[2]}"):
        ex08.grade_korthikanti_bytes(entry[1])


def test_the_package_itself_is_refused():
    with pytest.raises(GradingError, match="Exercise 08.1: that is the reference itself"):
        ex08.grade_checkpointed_forward(ex08.package_checkpointed_forward)
    with pytest.raises(GradingError, match="Exercise 08.2: that is the reference itself"):
        ex08.grade_korthikanti_bytes(korthikanti_activation_bytes)
    assert ex08.TIMEOUT <= 10
