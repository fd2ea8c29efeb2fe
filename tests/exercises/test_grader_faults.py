"""Every grader, whatever the student's code does, raises a GradingError — nothing else — with a message
that names the problem, within its ``timeout``, and leaves no process behind.

The battery is parametrized over EVERY public ``grade_*`` callable of ``exercises/ex*.py`` (a grader
added without an entry in ``SPECS`` fails ``test_every_grader_is_covered``). Each one is fed a
candidate that raises ZeroDivisionError, one that loops forever, one that returns None, one that
returns a str, one that returns a generator (not picklable: it cannot come back from a rank) and, for
the graders that run the candidate on several ranks, one that hangs in a collective on rank 0 only.
"""
from __future__ import annotations

import importlib
import inspect
import multiprocessing
import os
import pkgutil
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

import exercises
from exercises.grading import GradingError

SHORT = 1.0   # s: the timeout= of the cases that must time out (kept short: the battery runs them all)
SLACK = 12.0  # s: what a grader may take beyond its timeout (fork, stack dump, kill) on a busy machine


# --- the graders ------------------------------------------------------------------------------------

def _all_graders() -> dict[str, Callable]:
    found = {}
    for info in pkgutil.iter_modules(exercises.__path__):
        if not re.match(r"ex\d\d_", info.name):
            continue
        module = importlib.import_module(f"exercises.{info.name}")
        for name, fn in vars(module).items():
            own = getattr(fn, "__module__", "") == module.__name__  # not a grader imported from elsewhere
            if name.startswith("grade_") and callable(fn) and own:
                found[f"{info.name}.{name}"] = fn
    return found


GRADERS = _all_graders()


def _rank_groups_reference(rank, tp, pp, dp):
    from minimegatron.mpu.state import grid_groups
    groups = grid_groups(tp, pp, dp)
    return {k: sorted(next(g for g in groups[k] if rank in g)) for k in ("tp", "dp", "pp")}


def _references() -> dict[str, Callable]:
    """For the multi-rank graders: a correct candidate (the other ranks run it while rank 0 hangs)."""
    from exercises import ex01_tensor_parallel as ex01
    from exercises import ex02_parallel_mlp as ex02
    from exercises import ex03_vocab_parallel as ex03
    from exercises import ex05_sequence_parallel as ex05
    from exercises._ex17_reference import reference_split_sizes
    from minimegatron import collectives, schedules
    from minimegatron.generate import generate, top_p_filter
    from minimegatron.mpu import mappings
    from minimegatron.mpu.cross_entropy import vocab_parallel_cross_entropy

    return {
        "ex00_collectives.grade_ring_all_reduce": collectives.ring_all_reduce,
        "ex00_collectives.grade_all_reduce_via_reduce_scatter_all_gather":
            collectives.all_reduce_via_reduce_scatter_all_gather,
        "ex01_tensor_parallel.grade_copy_to": mappings.copy_to_tensor_model_parallel_region,
        "ex01_tensor_parallel.grade_reduce_from": mappings.reduce_from_tensor_model_parallel_region,
        "ex01_tensor_parallel.grade_column_parallel_linear": ex01.reference_column_parallel_linear,
        "ex01_tensor_parallel.grade_row_parallel_linear": ex01.reference_row_parallel_linear,
        "ex02_parallel_mlp.grade_parallel_mlp_forward": ex02.package_parallel_mlp_forward,
        "ex03_vocab_parallel.grade_vocab_parallel_embedding": ex03.reference_embedding_forward,
        "ex03_vocab_parallel.grade_vocab_parallel_cross_entropy": vocab_parallel_cross_entropy,
        "ex05_sequence_parallel.grade_gather_from_sequence_parallel":
            mappings.gather_from_sequence_parallel_region,
        "ex05_sequence_parallel.grade_sequence_parallel_row_linear":
            ex05.package_sequence_parallel_row_linear,
        "ex06_pipeline.grade_run_schedule": lambda *a: schedules.run_schedule(*a).loss,
        "ex10_training.grade_rank_groups": _rank_groups_reference,
        "ex12_generation.grade_top_p_filter": top_p_filter,
        "ex12_generation.grade_greedy_decode": lambda model, ids, n: generate(model, ids, n),
        "ex17_moe_dispatch.grade_split_sizes": reference_split_sizes,
    }


@dataclass(frozen=True)
class Spec:
    function: str        # the name of the exercise's function (the bad candidates are named after it)
    multi_rank: bool     # runs the candidate on forked ranks (or partly: rank_groups, top_p_filter)
    takes_class: bool = False
    one_process_first: bool = False  # checks in one process first, then on ranks (two timeouts)


SPECS = {
    "ex00_collectives.grade_ring_all_reduce": Spec("ring_all_reduce", True),
    "ex00_collectives.grade_all_reduce_via_reduce_scatter_all_gather":
        Spec("all_reduce_via_reduce_scatter_all_gather", True),
    "ex01_tensor_parallel.grade_copy_to": Spec("copy_to", True),
    "ex01_tensor_parallel.grade_reduce_from": Spec("reduce_from", True),
    "ex01_tensor_parallel.grade_column_parallel_linear": Spec("column_parallel_linear", True),
    "ex01_tensor_parallel.grade_row_parallel_linear": Spec("row_parallel_linear", True),
    "ex02_parallel_mlp.grade_parallel_mlp_forward": Spec("parallel_mlp_forward", True),
    "ex02_parallel_mlp.grade_fused_qkv_rows": Spec("fused_qkv_rows", False),
    "ex03_vocab_parallel.grade_vocab_parallel_embedding": Spec("vocab_parallel_embedding_forward", True),
    "ex03_vocab_parallel.grade_vocab_parallel_cross_entropy":
        Spec("vocab_parallel_cross_entropy_forward", True),
    "ex04_gpt_to_llama.grade_rms_norm": Spec("rms_norm", False),
    "ex04_gpt_to_llama.grade_apply_rope": Spec("apply_rope", False),
    "ex05_sequence_parallel.grade_gather_from_sequence_parallel": Spec("gather_from_sequence_parallel", True),
    "ex05_sequence_parallel.grade_sequence_parallel_row_linear": Spec("sequence_parallel_row_linear", True),
    "ex06_pipeline.grade_one_f_one_b_order": Spec("one_f_one_b_order", False),
    "ex06_pipeline.grade_run_schedule": Spec("run_schedule", True),
    "ex07_zero.grade_zero1_partition": Spec("zero1_partition", False),
    "ex07_zero.grade_zero1_adamw": Spec("Zero1AdamW", True, takes_class=True),
    "ex08_recompute.grade_checkpointed_forward": Spec("checkpointed_forward", False),
    "ex08_recompute.grade_korthikanti_bytes": Spec("korthikanti_bytes", False),
    "ex09_data.grade_build_sample_index": Spec("build_sample_index", False),
    "ex10_training.grade_rank_coordinates": Spec("rank_coordinates", False),
    "ex10_training.grade_rank_groups": Spec("rank_groups", True, one_process_first=True),
    "ex10_training.grade_replica_micro_batches": Spec("replica_micro_batches", False),
    "ex10_training.grade_choose_layout": Spec("choose_layout", False),
    "ex11_checkpoints.grade_reshard": Spec("reshard", False),
    "ex12_generation.grade_top_p_filter": Spec("top_p_filter", True, one_process_first=True),
    "ex12_generation.grade_greedy_decode": Spec("greedy_decode", True),
    "ex13_gaudi.grade_model_flops_utilization": Spec("model_flops_utilization", False),
    "ex14_context_parallel.grade_merge_partial": Spec("merge_partial", False),
    "ex14_context_parallel.grade_ring_step": Spec("ring_step", False),
    "ex14_context_parallel.grade_zigzag_positions": Spec("zigzag_positions", False),
    "ex15_pipeline_schedules.grade_interleaved_order": Spec("interleaved_order", False),
    "ex15_pipeline_schedules.grade_zb_h1_order": Spec("zb_h1_order", False),
    "ex16_data_parallel.grade_bucketed_ddp": Spec("BucketedDDP", True, takes_class=True),
    "ex16_data_parallel.grade_zero2_adamw": Spec("Zero2AdamW", True, takes_class=True),
    "ex16_data_parallel.grade_zero3": Spec("Zero3Model", True, takes_class=True),
    "ex17_moe_dispatch.grade_permute_by_expert": Spec("permute_by_expert", False),
    "ex17_moe_dispatch.grade_split_sizes": Spec("split_sizes", True),
}


# --- the bad candidates -----------------------------------------------------------------------------

_PRIVATE: dict[str, Any] = {}  # per process: forked ranks start with it empty


def _hang_on_rank_0() -> None:
    """On launched ranks: rank 0 alone enters a barrier of a group of its own (it waits forever); the
    group is made at every rank's first call (new_group is collective), so the others go on."""
    if not dist.is_initialized():
        return
    if "group" not in _PRIVATE:
        _PRIVATE["group"] = dist.new_group()
    if dist.get_rank() == 0:
        dist.barrier(group=_PRIVATE["group"])


def _raise(*args, **kwargs):
    return 1 / 0


def _loop(*args, **kwargs):
    while True:
        pass


BAD_VALUES = {"none": lambda: None, "str": lambda: "not a tensor", "generator": lambda: (i for i in range(3))}
BEHAVIOURS = ["raises", "loops", "none", "str", "generator", "hangs_one_rank"]


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = fn.__qualname__ = name
    return fn


def _function_candidate(behaviour: str, name: str, reference: Callable | None) -> Callable:
    if behaviour == "raises":
        return _named(lambda *a, **k: _raise(), name)
    if behaviour == "loops":
        return _named(lambda *a, **k: _loop(), name)
    if behaviour == "hangs_one_rank":
        def hang(*a, **k):
            _hang_on_rank_0()
            return reference(*a, **k)
        return _named(hang, name)
    bad = BAD_VALUES[behaviour]

    def returns_bad(*a, **k):
        if reference is not None and dist.is_initialized():
            reference(*a, **k)  # do the work (every collective), then return the wrong thing
        return bad()
    return _named(returns_bad, name)


def _misbehave(behaviour: str) -> None:
    """What every class candidate does first in the method that misbehaves."""
    if behaviour == "raises":
        _raise()
    if behaviour == "loops":
        _loop()
    if behaviour == "hangs_one_rank":
        _hang_on_rank_0()


def _class_candidate(key: str, behaviour: str) -> type:
    """For the graders of a class: the reference with one method that misbehaves; the bad values go where
    the grader reads them (exp_avg after the last step, p.grad after the sync, unit.shard on release)."""
    if key == "ex07_zero.grade_zero1_adamw":
        from exercises.ex07_zero import STEPS, ReferenceZero1AdamW

        class Zero1AdamW(ReferenceZero1AdamW):
            @torch.no_grad()
            def step(self) -> None:
                _misbehave(behaviour)
                super().step()
                if behaviour in BAD_VALUES and self.step_count == STEPS:  # after the last step
                    self.exp_avg = BAD_VALUES[behaviour]()

        return Zero1AdamW
    from exercises import _ex16_reference as ex16
    from exercises._ex16_mistakes import STEPS as ZERO_STEPS

    class BucketedDDP(ex16.ReferenceBucketedDDP):
        def on_grad_ready(self, param) -> None:
            _misbehave(behaviour)
            super().on_grad_ready(param)

        def finish_grad_sync(self) -> None:
            super().finish_grad_sync()
            for p in self.bucket_of if behaviour in BAD_VALUES else ():
                p.grad = BAD_VALUES[behaviour]()  # None; a str or a generator: torch refuses, naming the type

    class Zero2AdamW(ex16.ReferenceZero2AdamW):
        @torch.no_grad()
        def step(self) -> None:
            _misbehave(behaviour)
            super().step()
            if behaviour in BAD_VALUES and self.step_count == ZERO_STEPS:
                self.exp_avg = BAD_VALUES[behaviour]()

    class Zero3Model(ex16.ReferenceZero3Model):
        def gather(self, unit) -> None:
            _misbehave(behaviour)
            super().gather(unit)

        def release(self, unit) -> None:
            super().release(unit)
            if behaviour in BAD_VALUES:
                unit.shard = BAD_VALUES[behaviour]()

    return {"ex16_data_parallel.grade_bucketed_ddp": BucketedDDP, "ex16_data_parallel.grade_zero2_adamw":
            Zero2AdamW, "ex16_data_parallel.grade_zero3": Zero3Model}[key]


EXPECTED = {  # what the message must say, by behaviour
    "raises": r"raised.*ZeroDivisionError",
    "loops": r"timeout",
    "none": r"None",
    "str": r"\bstr\b",
    "generator": r"generator",
    "hangs_one_rank": r"timeout",
}


# --- no process left behind -------------------------------------------------------------------------

def _children() -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is this one (zombies included)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            found.append((int(entry), fields[0]))
    return found


def _helper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("minimegatron-")]


def _assert_nothing_left_behind() -> None:
    deadline = time.monotonic() + 3.0
    while (multiprocessing.active_children() or _children() or _helper_threads()) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert multiprocessing.active_children() == []
    assert _children() == [], "child processes of the test process are still there"
    assert _helper_threads() == [], "the threads that forked the children are still there"


# --- the battery ------------------------------------------------------------------------------------

CASES = [(key, behaviour) for key in sorted(GRADERS) for behaviour in BEHAVIOURS
         if behaviour != "hangs_one_rank" or SPECS.get(key, Spec("", False)).multi_rank]


def test_every_grader_is_covered():
    assert len(GRADERS) >= 28
    assert sorted(GRADERS) == sorted(SPECS), "add the new grader to SPECS (and, if multi-rank, a reference)"
    assert sorted(k for k, s in SPECS.items() if s.multi_rank and not s.takes_class) == sorted(_references())


@pytest.mark.parametrize("key", sorted(GRADERS))
def test_every_grader_has_a_timeout_keyword(key):
    parameter = inspect.signature(GRADERS[key]).parameters.get("timeout")
    assert parameter is not None, f"{key} has no timeout= keyword"
    assert isinstance(parameter.default, float) and parameter.default > 0


@pytest.mark.parametrize("key, behaviour", CASES, ids=[f"{k.split('.')[1]}-{b}" for k, b in CASES])
def test_grader_reports_a_fault_as_a_grading_error(key, behaviour):
    spec, grade = SPECS[key], GRADERS[key]
    if spec.takes_class:
        candidate = _class_candidate(key, behaviour)
    else:
        candidate = _function_candidate(behaviour, spec.function, _references().get(key))
    must_time_out = behaviour in ("loops", "hangs_one_rank")
    timeout = SHORT if must_time_out else inspect.signature(grade).parameters["timeout"].default
    start = time.monotonic()
    with pytest.raises(GradingError) as caught:  # nothing but a GradingError
        grade(candidate, timeout=timeout)
    elapsed = time.monotonic() - start
    message = str(caught.value)
    assert type(caught.value) is GradingError
    assert re.search(EXPECTED[behaviour], message, flags=re.S), message[:3000]
    stages = 2 if spec.one_process_first else 1
    assert elapsed < stages * timeout + SLACK, f"took {elapsed:.1f} s with timeout={timeout:g}"
    if not spec.multi_rank or spec.one_process_first:  # one process: it names the function, shows its line
        if behaviour == "raises":
            assert f"your {spec.function} raised ZeroDivisionError: division by zero" in message
            assert "test_grader_faults.py" in message and "return 1 / 0" in message, message
        if behaviour == "loops":
            assert f"timeout: your {spec.function} did not return within {SHORT:g} s" in message, message
            assert "while True" in message, message  # where it was stuck
    elif behaviour == "loops":
        assert re.search(r"timeout — your code hung on ranks \[", message), message[:2000]
    _assert_nothing_left_behind()


# --- a few more faults, once each ---------------------------------------------------------------------

def test_a_backward_that_never_returns_is_a_timeout():
    from exercises.ex08_recompute import grade_checkpointed_forward

    class Forever(torch.autograd.Function):
        @staticmethod
        def forward(ctx, run_function, hidden):
            return run_function(hidden.detach())  # keeps only the input (nothing else is saved)

        @staticmethod
        def backward(ctx, grad):
            while True:
                pass

    with pytest.raises(GradingError, match=r"(?s)timeout: your Forever.apply did not return within 1 s .*"
                                           r"backward. It was stopped here:.*while True"):
        grade_checkpointed_forward(Forever.apply, timeout=SHORT)
    _assert_nothing_left_behind()


def test_a_process_that_exits_is_named():
    from exercises.ex00_collectives import grade_ring_all_reduce
    from exercises.ex09_data import grade_build_sample_index

    def exits(lengths, seq_len):
        os._exit(3)

    with pytest.raises(GradingError, match=r"your exits crashed the grader's process \(exit code 3"):
        grade_build_sample_index(exits)

    def rank_exits(x, group=None):
        os._exit(3)

    with pytest.raises(GradingError, match=r"your code crashed rank \d: .*died without a result"):
        grade_ring_all_reduce(rank_exits, world_sizes=(2,))
    _assert_nothing_left_behind()


def test_a_tensor_of_the_wrong_shape_or_dtype_is_named():
    from exercises.ex04_gpt_to_llama import grade_rms_norm
    from exercises.ex12_generation import grade_top_p_filter

    with pytest.raises(GradingError, match=r"output: wrong shape \(3,\), expected \(4, 2, 16\)"):
        grade_rms_norm(lambda x, w, eps: torch.zeros(3))
    with pytest.raises(GradingError, match=r"got dtype torch.int64, expected the logits' torch.float32"):
        grade_top_p_filter(lambda logits, p: torch.zeros(logits.shape, dtype=torch.long))
    with pytest.raises(GradingError, match=r"output: wrong values"):  # NaN is never close to a number
        grade_rms_norm(lambda x, w, eps: torch.full_like(x, float("nan")))


def test_a_nan_is_never_the_right_number():
    from exercises.ex08_recompute import grade_korthikanti_bytes

    with pytest.raises(GradingError, match=r"got nan B"):
        grade_korthikanti_bytes(lambda *a: float("nan"))


def test_the_grader_prints_its_verdict_in_the_parent(capfd):
    from exercises.ex09_data import grade_build_sample_index
    from minimegatron.data.samples import build_sample_index

    assert grade_build_sample_index(lambda lengths, seq_len: build_sample_index(lengths, seq_len)).startswith("✓")
    assert capfd.readouterr().out.count("✓ Exercise 09.1") == 1


@pytest.mark.parametrize("timeout", [0, -1.0, float("inf"), float("nan"), "20", True])
def test_a_bad_timeout_is_refused_before_anything_runs(timeout):
    from exercises.ex00_collectives import grade_ring_all_reduce
    from exercises.ex09_data import grade_build_sample_index

    for grade in (grade_build_sample_index, grade_ring_all_reduce):
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
            grade(_raise, timeout=timeout)
