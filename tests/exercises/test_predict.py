"""Predict, then run: the answer stays hidden until a guess is made, then it is compared and explained."""
from exercises.predict import check_prediction, verdict


def test_no_guess_hides_the_answer():
    text = verdict("the bubble", None, 0.4286, why="3/7")
    assert text.startswith("? Predict first: the bubble") and "0.4286" not in text and "3/7" not in text


def test_close_guess_passes_and_far_guess_is_explained():
    assert verdict("bytes", 11, 11.0).startswith("✓ bytes: you predicted 11")
    assert verdict("bubble", 0.4, 0.43, rel_tol=0.1).startswith("✓")
    wrong = verdict("bubble", 0.25, 0.43, rel_tol=0.1, why="(p-1)/(m+p-1)")
    assert wrong == "✗ bubble: you predicted 0.25, but it is 0.43. Why: (p-1)/(m+p-1)"


def test_pairs_and_non_numbers():
    assert verdict("calls", (1, 1), (1, 1)).startswith("✓")
    assert verdict("calls", (2, 0), (1, 1)).startswith("✗")
    assert verdict("calls", 2, (1, 1)).startswith("✗")
    assert verdict("op", "all-gather", "all-gather").startswith("✓")
    assert verdict("op", "all-reduce", "all-gather").startswith("✗")


def test_check_prediction_prints_the_verdict_once(capsys):
    assert check_prediction("bytes", 11, 11.0) is None
    assert capsys.readouterr().out == "✓ bytes: you predicted 11, measured 11.0.\n"
