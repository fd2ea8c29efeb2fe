"""Exercise 13.1: the reference and a hand-written solution pass; the stub and every wrong formula of
the battery (exercises/_ex13_mistakes.py) fail with the message that names the mistake."""
import pytest

from benchmarks.gpu_llama_1b import mfu, training_flops_per_token
from exercises import _ex13_mistakes as M
from exercises import ex13_gaudi as ex13
from exercises.grading import GradingError


def reference(tokens_per_s, num_cards, n_params, num_layers, hidden_size, seq_len, peak_tflops,
              attention=True):
    flops = training_flops_per_token(n_params, num_layers, hidden_size, seq_len, attention)
    return mfu(tokens_per_s / num_cards, flops, peak_tflops * 1e12)


def test_reference_and_hand_written_solution_pass():
    assert ex13.grade_model_flops_utilization(reference).startswith("✓ Exercise 13.1")
    assert ex13.grade_model_flops_utilization(M.mfu).startswith("✓ Exercise 13.1")


def test_untouched_stub_fails():
    with pytest.raises(GradingError, match="Exercise 13.1 is not implemented yet"):
        ex13.grade_model_flops_utilization(ex13.model_flops_utilization)
    with pytest.raises(GradingError, match="ZeroDivisionError"):
        ex13.grade_model_flops_utilization(lambda *a, **k: 1 / 0)
    assert ex13.TIMEOUT <= 10


@pytest.mark.parametrize("entry", M.BATTERY, ids=[b[0] for b in M.BATTERY])
def test_every_mistake_is_named(entry):
    with pytest.raises(GradingError, match=entry[2]):
        ex13.grade_model_flops_utilization(entry[1])
