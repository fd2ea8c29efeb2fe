"""Each benchmark runs end to end at a toy size (--quick) and writes its table and figure.

Smoke tests only: no timing is asserted (benchmarks report, they do not pass or fail on speed).
"""
import pytest

from benchmarks import ddp_overlap, notebook_suite, plan_examples, run_all, throughput_vs_hf, tp_scaling


def test_throughput_vs_hf_quick(tmp_path):
    pytest.importorskip("transformers")
    rows = throughput_vs_hf.main(["--quick", "--models", "llama", "--fused-ab", "--out", str(tmp_path)])
    assert [r["model"] for r in rows] == ["llama"] and rows[0]["ratio"] > 0 and rows[0]["cpu_ratio"] > 0
    text = (tmp_path / "throughput_vs_hf_quick.md").read_text()
    assert "| llama | quick |" in text
    assert text.index("## Fused vs unfused LM head + loss") < text.rindex("| llama | quick |")  # its row
    assert (tmp_path / "throughput_vs_hf_quick.png").stat().st_size > 0


def test_breakdown_lists_every_block():
    pytest.importorskip("transformers")
    rows = throughput_vs_hf.breakdown("gpt", "quick", reps=1)
    assert [r[0] for r in rows] == ["embedding", "1 × norm", "1 × attention", "1 × mlp", "1 × layer",
                                   "LM head + loss, fused (default)", "LM head + loss, unfused", "AdamW step"]
    assert all(ours > 0 and hf > 0 for _, ours, hf in rows)


def test_tp_scaling_quick(tmp_path):
    rows = tp_scaling.main(["--quick", "--models", "gpt", "--out", str(tmp_path)])
    assert [r["tp"] for r in rows] == [1, 2]
    assert rows[0]["ops"] == {} and rows[1]["ops"]["all_reduce"][0] > 0
    assert (tmp_path / "tp_scaling_quick.png").exists()


def test_ddp_overlap_quick(tmp_path):
    rows = ddp_overlap.main(["--quick", "--out", str(tmp_path)])
    assert [r["bucket_mb"] for r in rows] == [0.01, 1.0]
    assert all(0.0 <= r["hidden_share"] <= 1.0 for r in rows)
    text = (tmp_path / "ddp_overlap_quick.md").read_text()
    assert "naive" in text and "overlapped" in text
    assert (tmp_path / "ddp_overlap_quick.png").stat().st_size > 0


def test_notebook_suite_quick(tmp_path):
    [row] = notebook_suite.main(["--quick", "--out", str(tmp_path)])
    assert row["error"] == "" and row["cells"] == 2
    assert "00_quick.ipynb" in (tmp_path / "notebook_suite_quick.md").read_text()


def test_run_all_parses_and_skips(tmp_path):
    assert run_all.main(["--quick", "--skip", "throughput", "tp", "ddp", "notebooks", "plan", "--out",
                         str(tmp_path)]) == {}


def test_plan_examples_quick(tmp_path):
    sections = plan_examples.main(["--quick", "--out", str(tmp_path)])
    assert len(sections) == 2 and all("Published layouts" in s for s in sections)
    assert "Llama-3-70B on 64 × H100" in (tmp_path / "plan_examples_quick.md").read_text()
