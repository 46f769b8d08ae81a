"""A plan before the job: for a checkpoint and a parallel layout, the bytes each rank reads and holds after the
load, from ``config.json`` and the safetensors headers alone (no tensor data: a hub repo's headers come from
range requests, a header-only checkpoint works).

It is the loader's own truth, not a re-derivation: the model is built on meta and the load planned by the
claiming plugin's adapter exactly as :func:`~automodel_plugins.pipeline.load.describe.describe_checkpoint` does
(``plan_load``, or ``plan_resident`` for ``dequantize=False``: which tensors stay FP8, in which dtype the rest
load), and each rank's region of each tensor comes from :func:`~automodel_plugins.model.placement.shard_region`,
the function the streaming loader reads by. The placements are those of the documented flows:

* ``tp``: the model's ``tp_plan`` as :func:`~automodel_plugins.model.tensor_parallel.tensor_parallel_plan`
  applies it (column-wise weight and bias ``Shard(0)``; row-wise weight ``Shard(1)``, bias replicated);
* ``ep``: fused MoE expert tensors ``Shard(0)`` (by expert) over the ``ep`` mesh dim, as
  :func:`~automodel_plugins.model.expert_parallel.parallelize_experts` places them (FP8-resident experts' scale
  grids too); everything else replicated across it (an expert count ``ep`` does not divide is a ``LayoutError``);
* ``expert_tp`` (with ``tp``): the experts split over the ``tp`` dim by the intermediate dim, as
  :func:`~automodel_plugins.model.expert_tensor_parallel.parallelize_experts_tp` places them (``gate_up_proj``
  ``_StridedShard(1, 2)``: two boxes a rank; ``down_proj`` ``Shard(2)``; their grids with them);
* ``fsdp``: FSDP2's ``fully_shard``: every parameter ``Shard(0)`` over the ``fsdp`` mesh dim (as a
  ``_StridedShard`` where a later mesh dim splits dim 0 too, as FSDP2 over tensor parallelism does);
* buffers (FP8 scales among them) replicated whole on every rank, as the loader holds them.

Reads: each rank's region of every tensor in its stored dtype, plus each FP8 scale it needs whole (for
pieces: the pieces its region overlaps; FP8-resident experts read every piece's scale, or under ``ep`` the grids
of the pieces of the rank's experts). Held: the region in
the loaded dtype (FP8 codes: one byte), FP8 scales as fp32. LoRA (PEFT on ``lora_targets``, rank ``lora_r``):
adapters ``A [r, in]`` and ``B [out, r]`` placed as :func:`tensor_parallel_plan` and FSDP2 place them; on the
fused expert tensors ``lora_target_parameters`` names (``target_parameters``), ``r * E * (d1 + d2)`` a tensor,
split by expert over ``ep`` as :func:`~automodel_plugins.model.expert_parallel.lora_factor_placements` places them
(each rank its experts' rows) and sharded by FSDP2 over ``fsdp``; held in
fp32 (PEFT's ``autocast_adapter_dtype`` default), plus their fp32 gradients and two fp32 Adam(W) states a
parameter. Not counted: activations, temporaries (a dequantized weight in the forward, all-gather buffers),
the CUDA context and allocator slack.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from automodel_plugins.adapters.pieces import PieceGeometry, intersect
from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.errors import LayoutError, NoPluginClaimError
from automodel_plugins.fp8.stacked import is_stacked
from automodel_plugins.model.expert_tensor_parallel import expert_tp_placement
from automodel_plugins.model.fp8_experts import EXPERT_PROJECTIONS, fused_experts_shapes
from automodel_plugins.model.placement import Region, shard_boxes, shard_numel, shard_region
from automodel_plugins.model.tensor_parallel import tensor_parallel_plan
from automodel_plugins.model.tensors import model_tensors
from automodel_plugins.pipeline.composition import adapter_for
from automodel_plugins.pipeline.load.load import build_model, resolve_dtype
from automodel_plugins.pipeline.load.plan import plan_load
from automodel_plugins.pipeline.load.preflight import check_structure
from automodel_plugins.pipeline.load.resident import plan_resident
from automodel_plugins.pipeline.readers import activation_scale_key
from automodel_plugins.registry import Registry, get_registry, pick_winner
from automodel_plugins.sources import CheckpointLocation, HubOptions, load_config, resolve

if TYPE_CHECKING:
    from automodel_plugins.pipeline.load.plan import PlannedTensor

__all__ = ["LORA_TARGETS", "Layout", "MemoryPlan", "RankMemory", "plan_memory"]

LORA_TARGETS = ("q_proj", "v_proj", "q_b_proj", "kv_b_proj")
"""PEFT's default for Mistral and Qwen (``q_proj``, ``v_proj``) and their analogues in MLA attention (DeepSeek V3,
Mistral Large 3: the query and key/value up-projections), which has neither name."""
LORA_OPTIMIZER = "Adam(W): two fp32 states a parameter; adapters and their gradients fp32"
MESH_DIMS = ("fsdp", "ep", "tp")


@dataclass(frozen=True)
class Layout:
    """Degrees of the mesh ``(fsdp, ep, tp)``; the world size is their product."""

    fsdp: int = 1
    ep: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for name in MESH_DIMS:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LayoutError(f"layout {name}={getattr(self, name)!r}: a degree is a positive integer")

    @property
    def world_size(self) -> int:
        return self.fsdp * self.ep * self.tp

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return (self.fsdp, self.ep, self.tp)

    def coordinate(self, rank: int) -> tuple[int, int, int]:
        """Row-major, as ``init_device_mesh(..., (fsdp, ep, tp))`` numbers its ranks."""
        tp, rest = rank % self.tp, rank // self.tp
        return (rest // self.ep, rest % self.ep, tp)

    @classmethod
    def parse(cls, text: str) -> Layout:
        """``"fsdp=8,tp=2"`` (any of fsdp, ep, tp; missing ones are 1)."""
        degrees: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = part.partition("=")
            if name.strip() not in MESH_DIMS or not value.strip().isdigit():
                raise LayoutError(
                    f"layout {text!r}: expected name=degree pairs of {', '.join(MESH_DIMS)}, got {part!r}"
                )
            degrees[name.strip()] = int(value)
        return cls(**degrees)

    def __str__(self) -> str:
        return (
            ",".join(f"{name}={getattr(self, name)}" for name in MESH_DIMS if getattr(self, name) > 1)
            or "1 rank"
        )


@dataclass
class RankMemory:
    """What one rank reads at load and holds after it, in bytes."""

    rank: int
    coordinate: tuple[int, int, int]
    read: int = 0
    held: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Weights by kind: ``fp8_codes``, ``scales`` (fp32), and other tensors by loaded dtype (``bfloat16``, ...)."""
    lora: dict[str, int] = field(default_factory=lambda: {"params": 0, "grads": 0, "optimizer": 0})

    @property
    def weights(self) -> int:
        return sum(self.held.values())

    @property
    def total(self) -> int:
        return self.weights + sum(self.lora.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "coordinate": dict(zip(MESH_DIMS, self.coordinate, strict=True)),
            "read": self.read,
            "held": dict(sorted(self.held.items())),
            "weights": self.weights,
            "lora": dict(self.lora),
            "total": self.total,
        }


@dataclass
class MemoryPlan:
    """Per-rank figures for one checkpoint, layout and load."""

    path: str
    layout: Layout
    dequantize: bool
    lora_r: int
    lora_targets: tuple[str, ...]
    ranks: list[RankMemory]
    lora_target_parameters: tuple[str, ...] = ()
    expert_tp: bool = False
    """The FP8-resident experts split over ``tp`` (``parallelize_experts_tp``), not replicated across it."""

    @property
    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda rank: (rank.total, -rank.rank))

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "layout": {name: getattr(self.layout, name) for name in MESH_DIMS},
            "world_size": self.layout.world_size,
            "dequantize": self.dequantize,
            "expert_tp": self.expert_tp,
            "lora": {
                "r": self.lora_r,
                "targets": list(self.lora_targets),
                "target_parameters": list(self.lora_target_parameters),
                "optimizer": LORA_OPTIMIZER,
            }
            if self.lora_r
            else None,
            "worst_rank": self.worst.to_dict(),
            "total": {
                "read": sum(r.read for r in self.ranks),
                "weights": sum(r.weights for r in self.ranks),
                "total": sum(r.total for r in self.ranks),
            },
            "ranks": [rank.to_dict() for rank in self.ranks],
            "not_counted": "activations, temporaries (dequantized weights in the forward, all-gather buffers), "
            "CUDA context and allocator slack",
        }


def plan_memory(
    path: str | Path | CheckpointLocation,
    *,
    world_size: int | None = None,
    fsdp: int | None = None,
    tp: int = 1,
    ep: int = 1,
    dequantize: bool = True,
    lora_r: int = 0,
    lora_targets: Sequence[str] = LORA_TARGETS,
    lora_target_parameters: Sequence[str] = (),
    dtype: torch.dtype | None = None,
    registry: Registry | None = None,
    hub: HubOptions | None = None,
    expert_tp: bool = False,
) -> MemoryPlan:
    """The bytes each rank reads and holds after loading ``path`` (a directory, a hub repo id, a header-only
    checkpoint) on a ``fsdp x ep x tp`` mesh (``fsdp`` defaults to what ``world_size`` leaves), FP8-resident
    (``dequantize=False``) or not, with LoRA of rank ``lora_r`` on ``lora_targets`` (PEFT's ``target_modules``)
    and on ``lora_target_parameters`` (PEFT's ``target_parameters``: fused expert tensors such as
    ``"mlp.experts.gate_up_proj"``); ``expert_tp``: the experts split over the ``tp`` dim by
    :func:`~automodel_plugins.model.expert_tensor_parallel.parallelize_experts_tp` (not by expert). Reads headers
    only."""
    if expert_tp and ep > 1:
        raise LayoutError(
            f"expert_tp splits the experts over the tp dim, without expert parallelism: got ep={ep}"
        )
    if fsdp is None:
        if world_size is None:
            fsdp = 1
        elif world_size % (tp * ep):
            raise LayoutError(f"world_size {world_size} is not a multiple of tp x ep = {tp * ep}")
        else:
            fsdp = world_size // (tp * ep)
    layout = Layout(fsdp=fsdp, ep=ep, tp=tp)
    if world_size is not None and world_size != layout.world_size:
        raise LayoutError(f"world_size {world_size} != fsdp x ep x tp = {layout.world_size}")
    registry = registry or get_registry()
    location = resolve(path, hub or HubOptions())
    config = load_config(location)
    plugin = pick_winner(registry.claims(config))
    if plugin is None:
        raise NoPluginClaimError(f"{path}: no plugin claims this config; the plan needs the host's loader")
    with Checkpoint.open(location, download=False) as checkpoint:
        check_structure(config, checkpoint)
        model = build_model(config, dtype=resolve_dtype(config, dtype), registry=registry)
        targets = model_tensors(model)
        adapter = adapter_for(registry, plugin, config, checkpoint)
        plan = (
            plan_load(targets, adapter, checkpoint)
            if dequantize
            else plan_resident(model, targets, adapter, checkpoint)
        )
        placer = _Placer(model, layout, expert_tp=expert_tp)
        ranks = [RankMemory(rank, layout.coordinate(rank)) for rank in range(layout.world_size)]
        parameters = {name for name, _ in model.named_parameters()}
        for name, planned in plan.items():
            _account(ranks, name, planned, placer, checkpoint, is_parameter=name in parameters)
        if lora_r:
            _account_lora(ranks, model, placer, lora_r, tuple(lora_targets))
            _account_expert_lora(ranks, placer, lora_r, tuple(lora_target_parameters))
        directory = str(checkpoint.directory)
    return MemoryPlan(
        directory,
        layout,
        dequantize,
        lora_r,
        tuple(lora_targets),
        ranks,
        tuple(lora_target_parameters),
        expert_tp=placer.expert_tp,
    )


class _Placer:
    """The placements a tensor gets under the layout (see the module docstring)."""

    def __init__(self, model: nn.Module, layout: Layout, *, expert_tp: bool = False) -> None:
        from torch.distributed.tensor.parallel import ColwiseParallel

        self.layout, self.expert_tp = layout, expert_tp and layout.tp > 1
        self.styles = {
            name: "colwise" if isinstance(style, ColwiseParallel) else "rowwise"
            for name, style in (tensor_parallel_plan(model).items() if layout.tp > 1 else ())
        }
        self.expert_shapes = {
            name: shapes
            for name, module in model.named_modules()
            if (shapes := fused_experts_shapes(module)) is not None
        }
        self.experts = {name: shapes["gate_up_proj"][0] for name, shapes in self.expert_shapes.items()}
        for name, experts in self.experts.items():
            if experts % layout.ep:
                raise LayoutError(
                    f"layout ep={layout.ep}: {name} has {experts} experts, which {layout.ep} expert-parallel "
                    "ranks cannot split evenly"
                )

    def expert_box(self, module: str, shape: tuple[int, ...], coordinate: tuple[int, ...]) -> Any:
        """The box of an expert tensor that this rank's EP shard holds (its experts, whole), or None when the
        tensor is not split by expert: FP8-resident experts hold (and read) the scale grids of that box."""
        from torch.distributed.tensor import Replicate, Shard

        if module not in self.experts or self.layout.ep == 1:
            return None
        region = self.region(shape, [Replicate(), Shard(0), Replicate()], coordinate)
        return tuple((part.start, part.stop) for part in region)

    def tp_dim(self, module: str, leaf: str) -> int | None:
        style = self.styles.get(module)
        if style == "colwise" and leaf in ("weight", "bias"):
            return 0
        if style == "rowwise" and leaf == "weight":
            return 1
        return None

    def placements(self, module: str, leaf: str, *, parameter: bool, tp_dim: int | None = None) -> list[Any]:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.placement_types import _StridedShard

        tp = self.tp_dim(module, leaf) if tp_dim is None else tp_dim
        ep = 0 if module in self.experts and leaf in EXPERT_PROJECTIONS else None
        if self.expert_tp and ep == 0:  # expert tensor parallelism: placed as parallelize_experts_tp does
            return [Shard(0) if parameter else Replicate(), Replicate(), expert_tp_placement(leaf)]
        later_dim0 = (self.layout.ep if ep == 0 else 1) * (self.layout.tp if tp == 0 else 1)
        if not parameter:
            fsdp: Any = Replicate()
        elif later_dim0 > 1:
            fsdp = _StridedShard(0, split_factor=later_dim0)
        else:
            fsdp = Shard(0)
        return [
            fsdp,
            Replicate() if ep is None else Shard(0),
            Replicate() if tp is None else Shard(tp),
        ]

    def boxes(
        self, shape: tuple[int, ...], placements: list[Any], coordinate: tuple[int, ...]
    ) -> list[Region]:
        """The rectangles this rank holds (several for expert TP's ``gate_up_proj``: gate rows and up rows)."""
        return shard_boxes(shape, self.layout.mesh_shape, coordinate, placements)

    def scale_split(self, module: str) -> int:
        """The ranks an FP8-resident experts module's scale grids are split over (with their codes)."""
        if module not in self.experts:
            return 1
        return self.layout.tp if self.expert_tp else self.layout.ep

    def region(self, shape: tuple[int, ...], placements: list[Any], coordinate: tuple[int, ...]) -> Region:
        if not shape:
            return ()
        return shard_region(shape, self.layout.mesh_shape, coordinate, placements)


def _numel(region: Region) -> int:
    return math.prod(part.stop - part.start for part in region)


def _account(
    ranks: list[RankMemory],
    name: str,
    planned: PlannedTensor,
    placer: _Placer,
    checkpoint: Checkpoint,
    *,
    is_parameter: bool,
) -> None:
    module, _, leaf = name.rpartition(".")
    placements = placer.placements(module, leaf, parameter=is_parameter)
    kept = planned.action == "kept_fp8"
    kind = "fp8_codes" if kept else str(planned.dtype).removeprefix("torch.")
    shape = planned.shape
    parts = planned.source.parts()
    cache: dict[tuple[int, ...], tuple[int, int]] = {}
    for rank in ranks:
        key = tuple(
            coordinate
            for coordinate, p in zip(rank.coordinate, placements, strict=True)
            if not _replicated(p)
        )
        if key not in cache:
            regions = placer.boxes(shape, placements, rank.coordinate)
            grids = placer.expert_box(module, shape, rank.coordinate) if kept else None
            cache[key] = (
                sum(_numel(region) for region in regions) if shape else 1,
                _read_bytes(planned, parts, regions, shape, checkpoint, kept, grids),
            )
        elements, read = cache[key]
        rank.held[kind] += elements * planned.dtype.itemsize
        if kept:
            rank.held["scales"] += planned.scale_numel * 4 // placer.scale_split(module)
        rank.read += read


def _replicated(placement: Any) -> bool:
    from torch.distributed.tensor import Replicate

    return isinstance(placement, Replicate)


def _read_bytes(
    planned: PlannedTensor,
    parts: Sequence[Any],
    regions: Sequence[Region],
    shape: tuple[int, ...],
    checkpoint: Checkpoint,
    kept: bool,
    grids: Any = None,
) -> int:
    """What the streaming loader reads for ``regions`` of this tensor (one box, or expert TP's two): its bytes of
    each stored piece they overlap,
    and the scales it needs whole (kept FP8 experts: every piece's, or those of the pieces overlapping
    ``grids``, the box of the rank's experts under expert parallelism; a kept static activation scale)."""
    boxes = [tuple((part.start, part.stop) for part in region) for region in regions]
    total = 0
    for piece in parts:
        info = checkpoint.info(piece.key)
        if not planned.source.is_assembled:
            total += (
                sum(_numel(region) for region in regions) * info.dtype.itemsize
                if shape
                else info.dtype.itemsize
            )
            overlap: Any = True
        else:
            geometry = PieceGeometry.of(piece, shape, len(info.shape))
            overlaps = [o for wanted in boxes if (o := intersect(geometry.box, wanted)) is not None]
            overlap = overlaps[0] if overlaps else None
            for part in overlaps:
                total += math.prod(stop - start for start, stop in part) * info.dtype.itemsize
        if piece.scale_key is None:
            continue
        scale_bytes = checkpoint.info(piece.scale_key).nbytes
        if kept and grids is not None:
            box = PieceGeometry.of(piece, shape, len(info.shape)).box
            held = intersect(box, grids)
            if held is not None and len(info.shape) == 3 and is_stacked(tuple(info.shape), piece.block_size):
                # a piece stacking experts: the loader reads the grids of the rank's experts only
                total += scale_bytes * (held[0][1] - held[0][0]) // (box[0][1] - box[0][0])
            elif held is not None or overlap is not None:
                total += scale_bytes
        elif overlap is not None or kept:
            total += scale_bytes
    activation = activation_scale_key(planned.source) if kept else None
    if activation is not None:  # the static activation scale a resident module keeps: read whole
        total += checkpoint.info(activation).nbytes
    return total


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    """PEFT's ``target_modules`` list rule: the name, or its last components, equal a target."""
    return any(name == t or name.endswith("." + t) for t in targets) or any(
        re.fullmatch(t, name) for t in targets if any(c in t for c in "*[]()\\")
    )


def _account_lora(
    ranks: list[RankMemory], model: nn.Module, placer: _Placer, r: int, targets: tuple[str, ...]
) -> None:
    """PEFT LoRA of rank ``r`` on every ``nn.Linear`` matching ``targets``: A ``[r, in]``, B ``[out, r]``,
    placed as ``tensor_parallel_plan`` places them (column-wise: B by rows; row-wise: A by columns) and
    sharded by FSDP2; fp32 adapter, fp32 gradient, two fp32 Adam states."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not _matches(name, targets):
            continue
        style = placer.styles.get(name)
        a_dim = 1 if style == "rowwise" else None
        b_dim = 0 if style == "colwise" else None
        for shape, tp_dim in (((r, module.in_features), a_dim), ((module.out_features, r), b_dim)):
            placements = placer.placements("", "lora", parameter=True, tp_dim=tp_dim)
            for rank in ranks:
                nbytes = _numel(placer.region(shape, placements, rank.coordinate)) * 4
                rank.lora["params"] += nbytes
                rank.lora["grads"] += nbytes
                rank.lora["optimizer"] += 2 * nbytes


def _account_expert_lora(ranks: list[RankMemory], placer: _Placer, r: int, targets: tuple[str, ...]) -> None:
    """PEFT LoRA of rank ``r`` on every fused expert tensor ``[E, rows, cols]`` matching ``targets`` (a
    ``ParamWrapper``): A ``[r * E, cols]`` and B ``[rows, r * E]``, ``r * E * (rows + cols)`` a tensor. Under
    expert parallelism split by expert as
    :func:`~automodel_plugins.model.expert_parallel.parallelize_experts` splits them
    (:func:`~automodel_plugins.model.expert_parallel.lora_factor_placements`: A ``Shard(0)``, B
    ``_StridedShard(1, split_factor=r)``), then FSDP2's ``Shard(0)`` over ``fsdp`` (``_StridedShard`` over A's
    EP split, as FSDP2 composes over a split of dim 0); fp32, fp32 gradients, two fp32 Adam states."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    from automodel_plugins.model.expert_parallel import lora_factor_placements

    if not targets:
        return
    ep = placer.layout.ep
    for module, shapes in placer.expert_shapes.items():
        for leaf, (experts, rows, cols) in shapes.items():
            if not _matches(f"{module}.{leaf}", targets):
                continue
            ep_a, ep_b = lora_factor_placements(r) if ep > 1 else (Replicate(), Replicate())
            fsdp_a = _StridedShard(0, split_factor=ep) if ep > 1 else Shard(0)
            for shape, placements in (
                ((r * experts, cols), [fsdp_a, ep_a, Replicate()]),
                ((rows, r * experts), [Shard(0), ep_b, Replicate()]),
            ):
                for rank in ranks:
                    nbytes = shard_numel(shape, placer.layout.mesh_shape, rank.coordinate, placements) * 4
                    rank.lora["params"] += nbytes
                    rank.lora["grads"] += nbytes
                    rank.lora["optimizer"] += 2 * nbytes
