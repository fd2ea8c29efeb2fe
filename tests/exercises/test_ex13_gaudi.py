"""Exercise 13.1: the reference passes its grader; the stub and typical mistakes fail precisely."""
import pytest

from benchmarks.gpu_llama_1b import mfu, training_flops_per_token
from exercises import ex13_gaudi as ex13
from exercises.grading import GradingError


def reference(tokens_per_s, num_cards, n_params, num_layers, hidden_size, seq_len, peak_tflops,
              attention=True):
    flops = training_flops_per_token(n_params, num_layers, hidden_size, seq_len, attention)
    return mfu(tokens_per_s / num_cards, flops, peak_tflops * 1e12)


def test_reference_passes():
    assert ex13.grade_model_flops_utilization(reference).startswith("✓ Exercise 13.1")


def test_untouched_stub_fails():
    with pytest.raises(GradingError, match="Exercise 13.1 is not implemented yet"):
        ex13.grade_model_flops_utilization(ex13.model_flops_utilization)


@pytest.mark.parametrize("mistake,message", [
    (lambda t, c, *a, **k: reference(t * c, c, *a, **k), "divide tokens/s by num_cards"),
    (lambda *a, **k: 100 * reference(*a, **k), "return a fraction"),
    (lambda *a, attention=True: reference(*a, attention=False), "attention term 12·L·h·s is missing"),
    (lambda *a, **k: None, "expected a float"),
    (lambda *a, **k: 1 / 0, "ZeroDivisionError"),
])
def test_typical_mistakes_are_named(mistake, message):
    with pytest.raises(GradingError, match=message):
        ex13.grade_model_flops_utilization(mistake)
