"""The trainer with a mixture-of-experts LLaMA and expert parallelism, on real gloo ranks.

The reference is the single-rank run of the same MoE model (E = 4 experts, top-2, aux loss on): with
``ep`` consecutive dp replicas sharing out the experts (all-to-all dispatch, expert gradients summed
over the expert-data-parallel group, each expert counted once in ‖g‖), the per-step losses, learning
rates and gradient norms are the single rank's, at ep2·dp2, ep2·dp2·tp2 + SP and ep4. Clipping is
active at every step (clip_grad = 0.05 < ‖g‖), so a norm that counts an expert twice, or misses one,
changes the losses. Without the aux loss (which a pipeline cannot carry across stages: refused) the
same holds at ep2·dp2·pp2 and ep2·dp2·cp2.

Capacity dropping is per rank's tokens: a rank drops the slots past ``⌈cf·n·k/E⌉`` of *its* micro-batch
(the router runs before the all-to-all). A single-rank run with the same micro-batch size sees the same
micro-batches (step t reads global batch t, each replica a contiguous part of it), so it drops the same
slots: the losses agree — and differ from the run that drops none.

Checkpoints hold every expert by its global index: a run saved at ep2·dp2·tp2 resumes at ep4 and on one
rank with the losses of the run that never stopped, and one saved at pp2·dp2·ep2 on one rank.
(The EP ranks that are not the writer send their experts with training/checkpoint_transfer.py: every
expert in the saved file is the proof it arrived.)
"""
import pytest
import torch
from safetensors import safe_open

pytest.importorskip("deepspeed")
from minimegatron.training import TrainConfig, validate  # noqa: E402
from tests.training.runs import Runs  # noqa: E402

TINY = dict(model="llama", steps=4, num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=128,
            seq_len=16, micro_batch_size=2, global_batch_size=8, lr=3e-3, warmup_steps=2, clip_grad=0.05,
            progress=False, num_experts=4, moe_top_k=2, moe_aux_loss_coeff=0.01)
ATOL = 2e-5   # another layout: fp32 round-off, as in tests/test_train.py

pytestmark = pytest.mark.usefixtures("deepspeed_preloaded")  # imported once, before any fork


run = Runs(TINY, require_clipping=True)  # every reference step is clipped


@pytest.fixture(scope="module")
def reference():
    """The single-rank run per variant of the model (aux loss on / off, capacity dropping)."""
    return run.once


def assert_same_run(history, expected, aux: bool = True):
    torch.testing.assert_close(history.loss, expected.loss, rtol=0, atol=ATOL)
    torch.testing.assert_close(history.lr, expected.lr, rtol=0, atol=0)
    torch.testing.assert_close(history.grad_norm, expected.grad_norm, rtol=1e-5, atol=0)
    if aux:  # logged at pp = 1: the routers' load-balancing loss, global-batch mean
        torch.testing.assert_close(history.aux_loss, expected.aux_loss, rtol=0, atol=ATOL)
        assert len(history.aux_loss) == TINY["steps"] and min(history.aux_loss) > 0


@pytest.mark.parametrize("layout,variant", [
    (dict(dp=2, ep=2), {}),
    (dict(tp=2, dp=2, ep=2, sequence_parallel=True), {}),
    (dict(dp=4, ep=4), {}),
    (dict(pp=2, dp=2, ep=2), dict(moe_aux_loss_coeff=0.0)),
    (dict(cp=2, dp=2, ep=2), dict(moe_aux_loss_coeff=0.0)),
    (dict(dp=2, ep=2), dict(moe_capacity_factor=1.0)),
], ids=["ep2-dp2", "ep2-dp2-tp2-sp", "ep4", "ep2-dp2-pp2", "ep2-dp2-cp2", "ep2-dp2-capacity"])
def test_expert_parallel_gives_the_single_rank_run(reference, layout, variant):
    pieces = layout.get("pp", 1) > 1 or layout.get("cp", 1) > 1  # aux: not logged / over pieces
    assert_same_run(run(**layout, **variant), reference(**variant), aux=not pieces)


def test_capacity_drops_and_the_aux_loss_count(reference):
    """The variants above are other runs: dropping slots and the aux loss each change the losses."""
    base = reference()
    for other in (reference(moe_capacity_factor=1.0), reference(moe_aux_loss_coeff=0.0)):
        assert max(abs(a - b) for a, b in zip(other.loss, base.loss)) > 1e-4


def test_a_checkpoint_holds_every_expert_and_resumes_at_another_ep(reference, tmp_path):
    full = reference()
    assert_same_run(run(tp=2, dp=2, ep=2, save=str(tmp_path / "ck"), save_interval=2), full)
    with safe_open(tmp_path / "ck" / "iter_0000002" / "model.safetensors", "pt") as fh:
        experts = {k.split(".experts.")[1].split(".")[0] for k in fh.keys() if ".experts." in k}
    assert experts == {"0", "1", "2", "3"}
    for layout in (dict(dp=4, ep=4), {}):
        resumed = run(**layout, load=str(tmp_path / "ck"), load_step=2)
        torch.testing.assert_close(resumed.loss, full.loss[2:], rtol=0, atol=ATOL)
        torch.testing.assert_close(resumed.grad_norm, full.grad_norm[2:], rtol=1e-5, atol=0)
    # the router's training settings may change on resume (a fine-tune with other capacity / aux weight)
    validate(TrainConfig(**{**TINY, "load": str(tmp_path / "ck"), "load_step": 2, "moe_capacity_factor": 1.5,
                            "moe_aux_loss_coeff": 0.1}))
    with pytest.raises(ValueError, match=r"num_experts: 4 in the checkpoint, 8 in this run"):
        validate(TrainConfig(**{**TINY, "load": str(tmp_path / "ck"), "load_step": 2, "num_experts": 8}))


def test_a_pipeline_checkpoint_sends_every_stages_experts(reference, tmp_path):
    """pp2·dp2·ep2: the second stage's two EP ranks each send their experts to the writer."""
    full = reference(moe_aux_loss_coeff=0.0)
    run(pp=2, dp=2, ep=2, moe_aux_loss_coeff=0.0, save=str(tmp_path / "ck"), save_interval=2)
    resumed = run(moe_aux_loss_coeff=0.0, load=str(tmp_path / "ck"), load_step=2)
    torch.testing.assert_close(resumed.loss, full.loss[2:], rtol=0, atol=ATOL)
