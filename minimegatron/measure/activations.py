"""Count the bytes autograd keeps for backward, per transformer layer (see ``activation_formulas``).

Every op that needs its input (or output) in backward hands that tensor to autograd, which *saves* it
until backward runs. ``torch.autograd.graph.saved_tensors_hooks(pack, unpack)`` lets us watch every
such tensor as it is saved. :class:`SavedActivationCounter` records each one and attributes it to the
transformer layer whose forward is running (forward pre/post hooks on the layer modules)::

    with SavedActivationCounter(model) as acts:
        loss = model(ids, labels=labels)        # forward only: what is saved is what backward needs
    acts.per_layer()   # {"layers.0": bytes, "layers.1": bytes, ..., "other": bytes}

Rules, so that the count is the memory actually held:

* **each storage once**: ``q, k, v = qkv.chunk(3)`` are three views of one storage; saving all three
  keeps one ``3·s·b·h/t`` buffer alive, not three. A storage is counted in full, once, for the first
  layer that saved it (a layer's input is the previous layer's output: it belongs to the layer that
  keeps it, the consumer, as in Korthikanti et al.).
* **parameters are not activations**: ``F.linear`` saves its weight too; storages of the model's
  parameters (and of tensors marked as ``nn.Parameter``) are skipped.
* **recomputation**: ``torch.utils.checkpoint`` (non-reentrant) stores its inputs with a
  ``save_for_backward`` we see, and runs the wrapped forward under hooks of its own, which we don't
  — exactly what it keeps: the inputs, not the inner activations. While counting, a checkpoint that
  wraps a whole layer (full recompute) charges its inputs to that layer. (Tensors passed inside a
  tuple, like RoPE's ``(cos, sin)``, are kept alive by reference, not saved: they are not seen.)

Only the forward should run inside the counter (the count is what waits for backward).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

__all__ = ["SavedTensor", "SavedActivationCounter"]


@dataclass
class SavedTensor:
    """One newly kept storage: who saved it first, its shape as saved, and the storage's bytes."""

    owner: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    bytes: int


class SavedActivationCounter:
    """Record the storages autograd saves for backward inside ``with``, grouped by layer.

    ``model``: the parameters to exclude and where to find layers; ``layer_types``: module classes
    counted as one "layer" (default: every module whose class is named ``ParallelTransformerLayer``).
    Tensors saved outside any layer go to ``"other"``.
    """

    def __init__(self, model: nn.Module | None = None, layer_types: tuple[type, ...] | None = None,
                 layers: dict[str, nn.Module] | None = None) -> None:
        self.model = model
        self.records: list[SavedTensor] = []
        self._seen: set[int] = set()
        self._param_storages: set[int] = set()
        self._owner = ["other"]
        self._handles: list = []
        if layers is None:
            layers = {}
            if model is not None:
                for name, m in model.named_modules():
                    if (layer_types and isinstance(m, layer_types)) or (
                            not layer_types and type(m).__name__ == "ParallelTransformerLayer"):
                        layers[name or type(m).__name__] = m
        self.layers = layers
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    # ---- hooks ------------------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor):
        if isinstance(t, nn.Parameter):
            return t
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse)
            return t
        key = storage.data_ptr()
        if key in self._param_storages or key in self._seen or storage.nbytes() == 0:
            return t
        self._seen.add(key)
        self.records.append(SavedTensor(self._owner[-1], tuple(t.shape), t.dtype, storage.nbytes()))
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def _enter_layer(self, name: str):
        def hook(module, args):
            self._owner.append(name)
        return hook

    def _leave_layer(self, module, args, output):
        if len(self._owner) > 1:
            self._owner.pop()

    def _charged_checkpoint(self, fn, *args, **kwargs):
        """torch.utils.checkpoint.checkpoint, with the saved inputs charged to the layer ``fn`` is."""
        owner = next((name for name, m in self.layers.items()
                      if fn is m or getattr(fn, "__self__", None) is m), None)
        if owner is None:
            return self._checkpoint(fn, *args, **kwargs)
        self._owner.append(owner)
        try:
            return self._checkpoint(fn, *args, **kwargs)
        finally:
            self._owner.pop()

    # ---- context manager --------------------------------------------------------------------------
    def __enter__(self) -> "SavedActivationCounter":
        if self.model is not None:
            self._param_storages = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        for name, m in self.layers.items():
            self._handles.append(m.register_forward_pre_hook(self._enter_layer(name)))
            self._handles.append(m.register_forward_hook(self._leave_layer))
        self._checkpoint = torch.utils.checkpoint.checkpoint
        torch.utils.checkpoint.checkpoint = self._charged_checkpoint
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        torch.utils.checkpoint.checkpoint = self._checkpoint
        for h in self._handles:
            h.remove()
        self._handles = []
        self._owner = ["other"]

    # ---- results ----------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.records)

    def per_layer(self) -> dict[str, int]:
        """``{layer name: bytes}`` in model order, then ``"other"`` (embedding, head, loss, ...)."""
        out: dict[str, int] = {name: 0 for name in self.layers}
        for r in self.records:
            out[r.owner] = out.get(r.owner, 0) + r.bytes
        if "other" in out and not out["other"]:
            del out["other"]
        return out

    def layer_bytes(self, name: str | None = None) -> int:
        """Bytes of one layer (default: the first one)."""
        name = name or next(iter(self.layers))
        return sum(r.bytes for r in self.records if r.owner == name)

    def table(self, owner: str | None = None) -> str:
        """Markdown table of the saved storages (shape as saved, dtype, bytes), optionally one owner."""
        rows = defaultdict(lambda: [0, 0])
        for r in self.records:
            if owner is None or r.owner == owner:
                key = (r.owner, r.shape, str(r.dtype).replace("torch.", ""))
                rows[key][0] += 1
                rows[key][1] += r.bytes
        lines = ["| owner | shape | dtype | count | bytes |", "|---|---|---|---:|---:|"]
        lines += [f"| {o} | {tuple(s)} | {d} | {c} | {b:,} |" for (o, s, d), (c, b) in rows.items()]
        return "\n".join(lines)
