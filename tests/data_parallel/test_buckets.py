"""Gradient buckets: the assignment against hand-counted layouts, views that autograd fills in place."""
import pytest
import torch
from torch import nn

from minimegatron.data_parallel.buckets import MiB, GradBuckets, assign_buckets
from minimegatron.gpt import GPTModel, count_parameters
from tests.layers.hf_reference import tiny_gpt


class Toy(nn.Module):
    """Registration order w1 (300), w2 (50), w3 (60), big (1000), w4 (200), w5 (150) elements, and a
    Linear whose weight is also registered a second time under another name (a tied weight)."""

    def __init__(self) -> None:
        super().__init__()
        for name, n in (("w1", 300), ("w2", 50), ("w3", 60), ("big", 1000), ("w4", 200), ("w5", 150)):
            setattr(self, name, nn.Parameter(torch.randn(n)))
        self.head = nn.Linear(4, 4, bias=False)   # 16 elements
        self.tied = nn.Module()
        self.tied.weight = self.head.weight       # the same Parameter, second name


def test_assignment_matches_a_hand_count_reverse_order_oversized_alone_and_tied_once():
    toy = Toy()
    plan = GradBuckets(toy.named_parameters(), bucket_size_mb=400 * 4 / MiB)  # a cap of 400 floats
    # reversed: head 16, w5 150, w4 200 (=366) | big 1000 > cap: alone | w3 60, w2 50 (=110),
    # w1 300 would make 410 > 400: | w1
    assert [b.names for b in plan.buckets] == [["head.weight", "w5", "w4"], ["big"], ["w3", "w2"], ["w1"]]
    assert [b.offsets for b in plan.buckets] == [[0, 16, 166], [0], [0, 60], [0]]
    assert [b.numel for b in plan.buckets] == [366, 1000, 110, 300]
    assert plan.names.count("head.weight") == 1 and "tied.weight" not in plan.names
    # the pure rule on sizes alone, and the dtype rule
    assert assign_buckets([5, 5, 5], 10) == [[0, 1], [2]]
    assert assign_buckets([30, 5, 5], 10) == [[0], [1, 2]]
    assert assign_buckets([4, 4, 4], 100, dtypes=["f32", "f64", "f64"]) == [[0], [1, 2]]
    assert len(GradBuckets(toy.named_parameters(), bucket_size_mb=1.0)) == 1  # all fit in one


def test_gradients_are_views_of_the_bucket_and_autograd_accumulates_into_them():
    toy = Toy()
    plan = GradBuckets(toy.named_parameters(), bucket_size_mb=400 * 4 / MiB)
    reference = Toy()
    reference.load_state_dict(toy.state_dict())
    x = torch.randn(3, 4)

    def loss(m):  # every parameter used; the tied weight twice
        vectors = [m.w1, m.w2, m.w3, m.big, m.w4, m.w5]
        return sum((p * (i + 1)).pow(2).sum() for i, p in enumerate(vectors)) \
            + (x @ m.head.weight.t() @ m.tied.weight.t()).sum()

    for _ in range(2):  # twice: the second backward accumulates
        loss(toy).backward()
        loss(reference).backward()
    for bucket in plan.buckets:
        for i, (name, p) in enumerate(zip(bucket.names, bucket.params)):
            assert p.grad.data_ptr() == bucket.buffer[bucket.offsets[i]:].data_ptr(), name
            torch.testing.assert_close(p.grad, dict(reference.named_parameters())[name].grad)
    flat = torch.cat([dict(reference.named_parameters())[n].grad.flatten() for n in plan.buckets[0].names])
    torch.testing.assert_close(plan.buckets[0].buffer, flat)
    plan.zero_grad()
    assert all(p.grad.abs().sum() == 0 for p in toy.parameters())
    toy.w1.grad = None  # optimizer.zero_grad(set_to_none=True): attach_grads re-points it
    plan.attach_grads()
    assert toy.w1.grad.data_ptr() == plan.buckets[3].buffer.data_ptr()


def test_gpt_plan_covers_every_parameter_once_in_reverse_order_within_the_cap():
    config = tiny_gpt()
    model = GPTModel(config, init_seed=0)
    cap_mb = 0.05
    plan = GradBuckets(model.named_parameters(), bucket_size_mb=cap_mb)
    names = [n for n, _ in model.named_parameters()]
    assert plan.names == names[::-1]
    assert names.count("embedding.word_embeddings.weight") == 1  # tied: the head owns no weight
    padding_rows = model.lm_head.padded_vocab_size - config.vocab_size  # one table: tied
    assert sum(b.numel for b in plan.buckets) == count_parameters(config) + padding_rows * config.hidden_size
    for b in plan.buckets:
        assert b.nbytes <= cap_mb * MiB or len(b.params) == 1
    for first, second in zip(plan.buckets, plan.buckets[1:]):  # a bucket closes only when the next
        assert first.nbytes + second.params[0].numel() * 4 > cap_mb * MiB  # parameter would not fit
    rows = plan.rows()
    assert [r["name"] for r in rows] == plan.names and "| bucket |" in plan.table()
    assert f"{len(plan.buckets)} buckets" in plan.describe()


def test_plot_returns_a_figure_and_bad_sizes_are_one_clear_error():
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    plan = GradBuckets(GPTModel(tiny_gpt(), init_seed=0).named_parameters(), bucket_size_mb=0.05)
    fig = plan.plot()
    assert isinstance(fig, Figure) and len(fig.axes[0].patches) == len(plan.names)
    for bad in (0, -1.0, "25", True):
        with pytest.raises(ValueError, match="bucket_size_mb must be a number > 0"):
            GradBuckets(nn.Linear(2, 2).named_parameters(), bucket_size_mb=bad)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        GradBuckets(nn.Linear(2, 2).requires_grad_(False).named_parameters())
