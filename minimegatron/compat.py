"""Every torch / DeepSpeed version difference the package meets, wrapped once, here.

Supported and tested in CI (both legs of ``.ci/run``):

==========  ===========================  =================================================
stack       torch                        DeepSpeed
==========  ===========================  =================================================
Gaudi       2.6 – 2.7 (Habana's builds,  0.14.4 (Habana's fork; CI: PyPI's 0.14.4 built
            no triton; CI: PyPI 2.7.1)   with ``--no-build-isolation`` against that torch)
default     2.13                         the newest release (0.19 when this was written)
==========  ===========================  =================================================

What differs across that range, and what this module does about it:

======================================  ==============  ============================================
difference                              versions        wrapped by
======================================  ==============  ============================================
the libuv ``TCPStore`` refuses a        torch < 2.8     :func:`tcp_store` asks for the legacy store
``master_listen_fd``                                    (``use_libuv=False``), same socket
flat collectives renamed                torch ≥ 2.13    :func:`all_gather_single`,
(``all_gather_into_tensor`` →                           :func:`reduce_scatter_single` (looked up at
``all_gather_single``, …; old names                     call time, so the comm counter and the
warn)                                                   graders see the call)
``deepspeed.runtime.zero.muon``         DeepSpeed       :func:`preload_deepspeed` imports it only
(ZeRO's optimizer check imports it)     ≥ 0.17          where it exists
``engine.load_checkpoint`` calls        DeepSpeed       :func:`load_deepspeed_checkpoint` allows
``torch.load`` with torch 2.6's         0.14 on         exactly the three DeepSpeed classes its
``weights_only=True`` default: its      torch ≥ 2.6     checkpoints hold (still no arbitrary
own ZeRO files fail to load                             unpickling); newer DeepSpeed passes
                                                        ``weights_only=False`` itself
======================================  ==============  ============================================

A version below the range is refused with one line naming the versions and the fix
(:func:`check_torch`, :func:`check_deepspeed`), before anything fails deep inside a rank.

**DeepSpeed glue.** The model code never touches DeepSpeed's internals; where the package must reach
past DeepSpeed's documented API, or work around its behaviour, it does so here, once:

======================================  ==============  ============================================
what DeepSpeed does                     versions        what the glue does
======================================  ==============  ============================================
the plain engine asks its ``mpu=`` for  0.14.4 – 0.19   :class:`DeepSpeedMPU` answers them from a
Megatron's names: DP group/rank/size                    ``ParallelState`` (which keeps its own
(gradient all-reduce, ZeRO), model-                     names), and the aliases ``get_pipe_*``
parallel ones (‖g‖ over TP×PP, the                      (pipeline), ``get_slice_*`` (TP) that
``mp_rank_XX`` files), TP, pipeline                     ``utils/bwc.py`` falls back on
``deepspeed.init_distributed`` on the   0.14.4 – 0.19   :func:`init_deepspeed_comm` marks that kernel
CPU builds a shared-memory all-reduce                   unavailable in ``deepspeed.ops.
kernel (a JIT C++ compile, about a                      __compatible_ops__`` first (0.14: the table
minute, for inference only; training                    made at import; 0.19: probed on first read,
runs on gloo)                                           so a one-entry table is set before that),
                                                        then hands it torch's process group
``TiedLayerSpec(tied_weight_attr=)``    < 0.16.5        :data:`TIED_WEIGHT_ATTR`: one plain name
is ``getattr``'d, not followed along                    (``pipe.EmbeddingPipe.tied_weight``), which
dots                                                    every release accepts
the pipeline's second copy of a tied    0.14.4 – 0.19   :func:`is_pipeline_tied_copy` reads the mark,
weight is marked ``p.ds_pipe_                           so that ``training.engine.clip_grad_norm``
replicated = True`` (its optimizers'                    counts the copy once too
norms skip it)
ZeRO-0 fp32 gradient clipping under a   0.14.4 – 0.19   :func:`replace_fp32_gradient_clipping` swaps
pipeline: ``clip_fp32_gradients``                       the engine's method for ours (``training.
counts replicated weights on model-                     engine.clip_grad_norm``), which also records
parallel rank 0 only and the tied                       the norm (``get_global_grad_norm``)
weight twice, and does not record ‖g‖
``DistributedAttention`` (Ulysses):   < 0.15          :func:`deepspeed_ulysses` calls it once per
its reverse all-to-all is right for                     sequence there; passes ``batch_dim_idx=1``
batch 1 only (it transposes dims 0, 2);                 where the signature has it
≥ 0.15 takes ``batch_dim_idx``
``PipelineModule`` names its            0.14.4 – 0.19   :func:`pipe_layer_key` reads a state_dict
state_dict ``{index}.*`` and tied                       key back as (layer index, rest): the one
modules ``tied_modules.{key}.*``                        place that layout is spelled out
calls the flat collectives by their     on torch        :func:`quiet_deepspeed` filters those two
old names (warnings on torch ≥ 2.13)    ≥ 2.13          warnings and DeepSpeed's INFO logging
``deepspeed.initialize`` always builds  0.14.4 – 0.19   :func:`adopt_pipeline_engine` gives the engine
``PipelineEngine`` (0.19: or Dual-                      it built a subclass that only adds methods
PipeVEngine), and ``train_batch`` its                   (``pipe_engine.ZeroBubblePipelineEngine``,
``TrainSchedule`` (0.14 inline, 0.19                    which overrides ``_exec_schedule``,
``_train_schedule()``); both run it as                  ``_exec_backward_pass`` and extends
``_exec_schedule(s)``: per instruction                  ``_INSTRUCTION_MAP``: the same names and
``_INSTRUCTION_MAP[type(cmd)](**kw)``                   signatures in both)
bf16's ``BF16_Optimizer``: the          0.14.4 – 0.19   :func:`pipeline_backward_bookkeeping` does
pipeline clears the low-precision                       the same around a deferred weight-gradient
grads before each backward, adds them                   pass (with ``immediate_grad_update``, off
to fp32 ones after (not on the last                     by default, the optimizer's grad hooks do
stage: ``engine.backward`` does it)                     it and ``update_hp_grads`` returns at once)
the pipeline receives every output      0.14.4 – 0.19   :func:`private_received_gradient` hands that
gradient into one buffer, ``engine.                     backward a copy, so that a deferred weight
grad_layer``, overwritten by the next                   gradient (``pipe_engine``: W after the next
``RecvGrad``; autograd passes it on                     receive) reads its own micro-batch's
uncopied                                                ∂L/∂Y
``PipelineModule`` splits layers only   0.14.4 – 0.19   :func:`set_pipeline_parts` sets ``parts`` and
``uniform`` / ``parameters`` /                          ``_set_bounds`` as ``_partition_layers``
``type:`` (no explicit counts)                          does (``pipe.LanguageModelPipe`` overrides
                                                        it for ``stage_layers``, as 0.19's
                                                        ``DualPipeVModule`` does)
======================================  ==============  ============================================
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import re
import types
import warnings
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist

if TYPE_CHECKING:  # (mpu.mappings imports this module: no import of the mpu package at run time)
    from minimegatron.mpu.state import ParallelState

__all__ = ["MIN_TORCH", "MIN_DEEPSPEED", "VersionError", "version_tuple", "check_torch",
           "check_deepspeed", "tcp_store", "all_gather_single", "reduce_scatter_single",
           "preload_deepspeed", "deepspeed_checkpoint_globals", "load_deepspeed_checkpoint",
           "init_deepspeed_comm", "DeepSpeedMPU", "TIED_WEIGHT_ATTR", "is_pipeline_tied_copy",
           "replace_fp32_gradient_clipping", "pipe_layer_key", "quiet_deepspeed", "adopt_pipeline_engine",
           "pipeline_backward_bookkeeping", "private_received_gradient", "set_pipeline_parts"]

MIN_TORCH = (2, 6)
MIN_DEEPSPEED = (0, 14, 4)
LIBUV_LISTEN_FD_TORCH = (2, 8)  # the first torch whose libuv TCPStore takes a listen fd


class VersionError(RuntimeError):
    """An installed torch or DeepSpeed is older than this project supports."""


def version_tuple(version: str) -> tuple[int, ...]:
    """'2.7.1+cu126' -> (2, 7, 1); '0.14.4+hpu.synapse.v1.22.0' -> (0, 14, 4); '2.6.0a0+git' -> (2, 6, 0)."""
    match = re.match(r"\s*(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"cannot read a version number from {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def check_torch(version: str | None = None) -> None:
    """Refuse a torch older than :data:`MIN_TORCH`, naming the fix."""
    version = version or torch.__version__
    if version_tuple(version) < MIN_TORCH:
        raise VersionError(
            f"torch {version} is older than the {_dotted(MIN_TORCH)} this project supports: upgrade "
            f"torch (pip install 'torch>={_dotted(MIN_TORCH)}'), or on Gaudi use Intel Gaudi software "
            f"1.21 or newer (torch 2.6+)")


def check_deepspeed(version: str | None = None) -> None:
    """Refuse a DeepSpeed older than :data:`MIN_DEEPSPEED` (or none at all), naming the fix; with no
    ``version`` given, check the installed DeepSpeed and the torch under it."""
    if version is None:
        check_torch()
        try:
            version = importlib.metadata.version("deepspeed")
        except importlib.metadata.PackageNotFoundError:
            raise VersionError("DeepSpeed is not installed, and the pipeline and training need it: "
                               "pip install 'deepspeed>=0.14.4' --no-build-isolation (or `make install`)"
                               ) from None
    if version_tuple(version) < MIN_DEEPSPEED:
        raise VersionError(
            f"DeepSpeed {version} is older than the {_dotted(MIN_DEEPSPEED)} this project supports: "
            f"pip install 'deepspeed>={_dotted(MIN_DEEPSPEED)}' --no-build-isolation, or on Gaudi use "
            f"Habana's DeepSpeed fork of 0.14.4 (Intel Gaudi software 1.22+)")


# ---- torch ----------------------------------------------------------------------------------------
def tcp_store(host: str, port: int, world_size: int, is_master: bool, timeout: timedelta,
              listen_fd: int | None = None) -> dist.TCPStore:
    """A rendezvous ``TCPStore``; the master serves it on the already-bound socket ``listen_fd``.

    The libuv store (torch's default since 2.4) learned to take a listen fd in torch 2.8 (PyTorch
    PR #150215); before that it raises NotImplementedError, so the master asks for the legacy store,
    which always could. Clients never pass the fd.
    """
    kwargs = dict(is_master=is_master, timeout=timeout, wait_for_workers=False)
    if is_master and listen_fd is not None:
        kwargs["master_listen_fd"] = listen_fd
        if version_tuple(torch.__version__) < LIBUV_LISTEN_FD_TORCH:
            kwargs["use_libuv"] = False
    return dist.TCPStore(host, port, world_size, **kwargs)


def all_gather_single(output: torch.Tensor, input: torch.Tensor, group=None) -> None:
    """``output`` (N·n, ...) ← every rank's ``input`` (n, ...) concatenated in rank order.

    ``dist.all_gather_single`` on torch ≥ 2.13, ``dist.all_gather_into_tensor`` before."""
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(output, input, group=group)


def reduce_scatter_single(output: torch.Tensor, input: torch.Tensor, group=None) -> None:
    """``output`` (n/N, ...) ← chunk ``rank`` of Σ over ranks of ``input`` (n, ...).

    ``dist.reduce_scatter_single`` on torch ≥ 2.13, ``dist.reduce_scatter_tensor`` before."""
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(output, input,
                                                                               group=group)


# ---- DeepSpeed ------------------------------------------------------------------------------------
# Modules DeepSpeed imports lazily, the first time a ZeRO optimizer is built, which exist only in
# some releases; importing them in the parent saves each forked rank seconds.
_OPTIONAL_DEEPSPEED_MODULES = ("deepspeed.runtime.zero.muon.muon_optimizer",   # DeepSpeed >= 0.17
                               "deepspeed.runtime.zero.muon.original_muon")


def preload_deepspeed() -> None:
    """Import DeepSpeed and the modules its engine and optimizers load (those this release has)."""
    check_deepspeed()
    import deepspeed  # noqa: F401
    import deepspeed.runtime.pipe.engine  # noqa: F401
    import torch._dynamo  # noqa: F401  (DeepSpeed's optimizers pull in torch's compiler stack)

    for name in _OPTIONAL_DEEPSPEED_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # an older DeepSpeed: the engine will not look for it either
            pass


def deepspeed_checkpoint_globals() -> list[type]:
    """The classes DeepSpeed pickles into its own checkpoints (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO-1 pipeline checkpoints)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_checkpoint(engine, load_dir: str, **kwargs):
    """``engine.load_checkpoint(load_dir, **kwargs)`` on every supported DeepSpeed and torch.

    DeepSpeed 0.14's ``torch.load`` takes torch ≥ 2.6's ``weights_only=True`` default and refuses the
    DeepSpeed classes in its own files; those (and only those) are allowed here."""
    with torch.serialization.safe_globals(deepspeed_checkpoint_globals()):
        return engine.load_checkpoint(load_dir, **kwargs)


# ---- DeepSpeed glue (the second table of the module docstring) -----------------------------------
TIED_WEIGHT_ATTR = "tied_weight"  # TiedLayerSpec(tied_weight_attr=[...]): a plain name, no dots


def init_deepspeed_comm() -> None:
    """Hand this process's torch.distributed world to DeepSpeed's comm layer (once; idempotent),
    without building DeepSpeed's CPU shared-memory all-reduce kernel (see the glue table)."""
    import deepspeed
    import deepspeed.comm

    from minimegatron.device import device_type, dist_backend

    if deepspeed.comm.is_initialized():
        return
    if device_type() == "cpu":  # (a partial table, if DeepSpeed has not probed its ops yet: the
        import deepspeed.ops     # full probe runs compilers, and only this entry is ever read)
        vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=dist_backend(), verbose=False)


# DeepSpeed's name -> how a ParallelState answers it ("model parallel": the TP×PP ranks of one replica)
_MPU_ANSWERS: dict[str, Callable[[ParallelState], Any]] = {
    "get_tensor_model_parallel_rank": lambda s: s.tp_rank,
    "get_tensor_model_parallel_world_size": lambda s: s.tp,
    "get_tensor_model_parallel_group": lambda s: s.tp_group,
    "get_tensor_model_parallel_src_rank": lambda s: s.tp_ranks[0],
    "get_pipeline_model_parallel_rank": lambda s: s.pp_rank,
    "get_pipeline_model_parallel_world_size": lambda s: s.pp,
    "get_pipeline_model_parallel_group": lambda s: s.pp_group,
    # DeepSpeed's "data parallel" = the ranks that average gradients: DP × CP (``state.dp_cp_group``)
    "get_data_parallel_rank": lambda s: s.dp_cp_rank,
    "get_data_parallel_world_size": lambda s: s.dp * s.cp,
    "get_data_parallel_group": lambda s: s.dp_cp_group,
    "get_data_parallel_group_ranks": lambda s: list(s.dp_cp_ranks),
    "get_model_parallel_rank": lambda s: s.mp_rank,
    "get_model_parallel_world_size": lambda s: s.tp * s.pp,
    "get_model_parallel_group": lambda s: s.mp_group,
}
for _grid, _megatron in (("pipe", "pipeline_model"), ("slice", "tensor_model")):  # PipelineParallelGrid's
    for _what in ("rank", "world_size", "group"):
        _MPU_ANSWERS[f"get_{_grid}_parallel_{_what}"] = _MPU_ANSWERS[f"get_{_megatron}_parallel_{_what}"]


class DeepSpeedMPU:
    """``deepspeed.initialize(mpu=DeepSpeedMPU(state))``: a method per ``_MPU_ANSWERS`` entry (20), e.g.
    ``get_model_parallel_rank()`` = ``state.mp_rank``; ``hasattr`` is False for other (optional) names."""

    def __init__(self, state: ParallelState) -> None:
        self.state = state


for _name, _answer in _MPU_ANSWERS.items():
    setattr(DeepSpeedMPU, _name, lambda self, _answer=_answer: _answer(self.state))


def is_pipeline_tied_copy(param: torch.Tensor) -> bool:
    """True for the pipeline's second copy of a tied weight (the last stage's): count it once."""
    return bool(getattr(param, "ds_pipe_replicated", False))


def replace_fp32_gradient_clipping(engine, clip: Callable[[], float]) -> None:
    """Make the engine's ZeRO-0 fp32 clipping call ``clip()`` (which scales the gradients and returns
    ‖g‖) and record that norm, where ``engine.get_global_grad_norm()`` reads it."""
    def clip_fp32_gradients(self) -> None:
        self._global_grad_norm = clip()

    engine.clip_fp32_gradients = types.MethodType(clip_fp32_gradients, engine)


def adopt_pipeline_engine(engine, cls: type) -> None:
    """Turn the ``PipelineEngine`` that ``deepspeed.initialize`` built into ``cls``, a subclass of it that
    adds methods and class attributes only (its state is the engine's, so nothing is re-initialised)."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if type(engine) is not PipelineEngine or not issubclass(cls, PipelineEngine) or "__init__" in vars(cls):
        raise TypeError(f"cannot make a {type(engine).__name__} a {cls.__name__}: the engine must be "
                        "deepspeed.initialize's PipelineEngine, and the class a PipelineEngine subclass "
                        "without an __init__ of its own")
    engine.__class__ = cls


@contextlib.contextmanager
def pipeline_backward_bookkeeping(engine):
    """What DeepSpeed's pipeline does around a backward outside ``engine.backward``: with bf16's
    ``BF16_Optimizer``, clear the low-precision grads before, add them to the fp32 ones after."""
    bf16 = getattr(engine, "using_bf16_optimizer", False)
    if bf16:
        engine.optimizer.clear_lp_grads()
    yield
    if bf16:
        engine.optimizer.update_hp_grads(clear_lp_grads=False)


@contextlib.contextmanager
def private_received_gradient(engine):
    """During one pipeline backward, ``engine.grad_layer`` (the received ∂L/∂output) is a copy that
    nothing overwrites; DeepSpeed's buffer is put back after it, for the next receive."""
    received = engine.grad_layer
    if received is not None:
        engine.grad_layer = (received.clone() if torch.is_tensor(received) else
                             type(received)(t.clone() for t in received))
    try:
        yield
    finally:
        engine.grad_layer = received


def set_pipeline_parts(module, parts: list[int]) -> None:
    """Inside ``PipelineModule._partition_layers``: stage ``i`` holds layers ``[parts[i], parts[i+1])``."""
    stage = module._topo.get_coord(module.global_rank).pipe
    module.parts = list(parts)
    module._set_bounds(start=parts[stage], stop=parts[stage + 1])


def pipe_layer_key(key: str) -> tuple[int | None, str]:
    """A ``PipelineModule`` state_dict key as (layer index, rest): ``'3.mlp.w'`` -> ``(3, 'mlp.w')``;
    a tied module's ``'tied_modules.embed.w'`` -> ``(None, 'w')`` (its index: where the key's spec is)."""
    head, rest = key.split(".", 1)
    if head == "tied_modules":
        return None, rest.split(".", 1)[1]
    return int(head), rest


def deepspeed_ulysses(local_attention: Callable, group) -> Callable:
    """DeepSpeed's ``DistributedAttention`` (scatter heads = dim 2, gather the sequence = dim 0) around
    ``local_attention``, as ``f(q, k, v)`` for q/k/v ``(s/cp, b, heads, d)`` on every release."""
    import inspect

    import deepspeed.comm
    from deepspeed.sequence.layer import DistributedAttention
    if not deepspeed.comm.is_initialized():
        init_deepspeed_comm()
    attention = DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=0)
    if "batch_dim_idx" in inspect.signature(attention.forward).parameters:
        return lambda q, k, v: attention(q, k, v, 1)  # (s, b, ...): the batch is dim 1
    return lambda q, k, v: torch.cat([attention(*(t[:, i:i + 1] for t in (q, k, v)))  # one sequence
                                      for i in range(q.size(1))], dim=1)              # at a time


def quiet_deepspeed() -> None:
    """DeepSpeed's INFO logging off, and torch ≥ 2.13's deprecation warnings for DeepSpeed's calls of
    ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` filtered (ours use the new names)."""
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*is deprecated")
