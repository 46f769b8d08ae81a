"""Watch, at the dispatcher, for float copies of FP8-resident weights: how many are alive at once, whether one
outlives its layer, and whether autograd saves one for backward.

Every tensor an aten op creates is seen by a ``TorchDispatchMode``; those with the shape of a watched weight
(or its transpose) and a 16- or 32-bit float dtype are dequantized copies, tracked by weak reference. Autograd's saved
tensors are seen through ``saved_tensors_hooks``. Use inputs whose 2-D activation views do not share a weight's
shape (an odd token count does it)::

    with watch_weight_copies(model) as watch:
        model(**batch).loss.backward()
    assert watch.peak_alive <= 1 and watch.alive_after_layers == [0] * watch.layer_calls
    assert watch.saved_copies == []
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["WeightCopyWatch", "held_bytes", "watch_weight_copies"]


def held_bytes(model: nn.Module) -> int:
    """Parameter and persistent-buffer bytes of ``model`` (what a checkpoint fills; rotary tables aside): FP8
    codes count one byte, their fp32 scales four, as ``inspect``'s ``bytes_after_load*`` count them."""
    tensors = [*model.parameters()] + [
        buffer
        for module in model.modules()
        for name, buffer in module.named_buffers(recurse=False)
        if name not in module._non_persistent_buffers_set
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class WeightCopyWatch:
    """What :func:`watch_weight_copies` saw. ``created``: float tensors of a weight's shape that ops allocated;
    ``peak_alive``: most of them alive at once (distinct storages); ``alive_after_layers``: how many were alive
    right after each watched layer's forward returned; ``saved_copies``: ``(shape, dtype)`` of float tensors of
    a weight's shape that autograd saved for backward; ``saved``: every saved ``(shape, dtype)``."""

    shapes: frozenset[tuple[int, ...]]
    existing: frozenset[int] = frozenset()
    """Storages of the model's own tensors: views of them (a transposed BF16 weight) are not copies."""
    created: int = 0
    peak_alive: int = 0
    alive_after_layers: list[int] = field(default_factory=list)
    saved_copies: list[tuple[tuple[int, ...], torch.dtype]] = field(default_factory=list)
    saved: list[tuple[tuple[int, ...], torch.dtype]] = field(default_factory=list)
    _refs: list[weakref.ref] = field(default_factory=list, repr=False)

    @property
    def layer_calls(self) -> int:
        return len(self.alive_after_layers)

    def alive(self) -> int:
        """Dequantized copies alive now, counted once per storage (a transposed view is the same copy)."""
        return len(self._alive_storages())

    def _alive_storages(self) -> set[int]:
        alive = [tensor for tensor in (ref() for ref in self._refs) if tensor is not None]
        self._refs = [weakref.ref(tensor) for tensor in alive]  # forget the dead ones
        return {tensor.untyped_storage().data_ptr() for tensor in alive}

    def _is_copy(self, tensor: torch.Tensor) -> bool:
        wide_float = tensor.dtype.is_floating_point and tensor.dtype.itemsize >= 2  # not the FP8 codes
        return (
            wide_float
            and tuple(tensor.shape) in self.shapes
            and tensor.untyped_storage().data_ptr() not in self.existing
        )

    def _record(self, tensor: torch.Tensor) -> None:
        if self._is_copy(tensor):
            # a view (a transpose) of a copy still alive is that copy, not a new one
            self.created += tensor.untyped_storage().data_ptr() not in self._alive_storages()
            self._refs.append(weakref.ref(tensor))
            self.peak_alive = max(self.peak_alive, self.alive())


class _Mode(TorchDispatchMode):
    def __init__(self, watch: WeightCopyWatch) -> None:
        super().__init__()
        self.watch = watch

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.watch._record(leaf)
        return out


@contextlib.contextmanager
def watch_weight_copies(
    model: nn.Module, layers: Iterable[nn.Module] | None = None
) -> Iterator[WeightCopyWatch]:
    """Watch ``layers`` (default: every FP8-resident layer of ``model``: ``Fp8Linear`` and ``Fp8Experts``, whose
    copies are one expert's matrix or a whole fused tensor) while the block runs."""
    from automodel_plugins.model.fp8_experts import Fp8Experts
    from automodel_plugins.model.fp8_linear import Fp8Linear

    resident = (Fp8Linear, Fp8Experts)
    watched = list(layers) if layers is not None else [m for m in model.modules() if isinstance(m, resident)]
    shapes = set()
    for layer in watched:
        if isinstance(layer, Fp8Experts):  # one expert's matrix, and the whole fused tensor
            for experts, rows, cols in layer.shapes.values():
                shapes |= {(rows, cols), (cols, rows), (experts, rows, cols), (experts, cols, rows)}
            continue
        out_features, in_features = layer.out_features, layer.in_features
        shapes |= {(out_features, in_features), (in_features, out_features)}
    existing = frozenset(t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()])
    watch = WeightCopyWatch(frozenset(shapes), existing)

    def after_layer(module: nn.Module, args: Any, output: Any) -> None:
        watch.alive_after_layers.append(watch.alive())

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        entry = (tuple(tensor.shape), tensor.dtype)
        watch.saved.append(entry)
        if watch._is_copy(tensor):
            watch.saved_copies.append(entry)
        return tensor

    handles = [layer.register_forward_hook(after_layer) for layer in watched]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), _Mode(watch):
            yield watch
    finally:
        for handle in handles:
            handle.remove()
