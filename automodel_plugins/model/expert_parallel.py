"""Expert parallelism of fused MoE experts, FP8-resident (:class:`~automodel_plugins.model.fp8_experts.Fp8Experts`)
or dequantized (the stock experts module), from the model's own ``ep_plan`` and with transformers' own pieces.

transformers 5.25 declares expert parallelism in each MoE config's ``base_model_ep_plan`` (Qwen3-VL-MoE,
Mistral 4: ``gate_up_proj`` / ``down_proj`` ``"grouped_gemm"``, the experts module ``"ep_dispatch_experts"``) and
applies it with ``transformers.distributed.expert_parallel``:

* ``MoEParamShard`` (``grouped_gemm``) places a fused parameter ``Shard(0)`` over the EP mesh (a DTensor on meta,
  so nothing is allocated) and sets the module's ``num_experts`` to its local count;
* ``EpDispatchExpertsParallel`` (``ep_dispatch_experts``) replaces the module's forward: its ``AutoEP`` sends each
  (token, expert) pair to the rank owning the expert with an all-to-all (``AllToAllEP``), runs the module's own
  forward there on local expert ids with its parameters as local tensors, and sends the results back, where the
  routing weights are applied (both all-to-alls are differentiable).

Both are used here as they are. What they do not know, and this module adds: an ``Fp8Experts`` keeps its block
scales in **buffers** (``gate_up_proj_scale_inv [E, ...]``, and static activation scales ``[E]`` when the
checkpoint has them), which a parameter style leaves whole. They are placed ``Shard(0)`` beside their codes, so each rank reads and holds only its experts' codes and grids, and the
forward context hands them to the experts' forward as local tensors with the codes. The plan is checked first:
an expert count the EP degree does not divide is a :class:`~automodel_plugins.errors.ExpertParallelError`
naming the module and both sizes (transformers raises a bare ``ValueError`` half-way through the model).

PEFT LoRA on the experts (``target_parameters``: :class:`~automodel_plugins.model.fp8_experts_lora.
Fp8ExpertsParamWrapper`) is split with them: each rank holds its experts' rows of every factor, as DTensors on the
EP mesh (:func:`lora_factor_placements`), whichever order PEFT and :func:`parallelize_experts` ran in.

Without tensor parallelism every rank holds its own batch, so ``AutoEP`` always runs the all-to-all (its
all-reduce variant needs the EP group to share one batch). The flow on an ``(ep, dp)`` mesh: ``build_model`` on
meta (PEFT, if any) -> :func:`parallelize_experts` on ``mesh["ep"]`` -> :func:`fully_shard_experts` on
``mesh["dp"]`` -> ``fully_shard`` of each decoder layer and the root on the whole mesh (HSDP: sharded over dp,
replicated over ep, so the other gradients are averaged over every rank) -> ``to_empty`` -> ``load_weights``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from automodel_plugins.errors import ExpertParallelError
from automodel_plugins.model.fp8_experts import EXPERT_PROJECTIONS, Fp8Experts, fused_experts_shapes
from automodel_plugins.model.placement import is_dtensor
from automodel_plugins.model.tensor_parallel import pattern_of
from automodel_plugins.model.tensors import unwrap_peft

__all__ = ["expert_parallel_plan", "fully_shard_experts", "lora_factor_placements", "parallelize_experts"]

MODULE_STYLE = "ep_dispatch_experts"
"""The ``ep_plan`` style of an experts module (its fused parameters' ``grouped_gemm`` entries go with it)."""
EP_LORA_MESH = "_ep_lora_mesh"
"""The attribute :func:`parallelize_experts` leaves on an experts module: the EP mesh its LoRA factors split over
(PEFT applied later reads it)."""


def lora_factor_placements(r: int) -> tuple[Any, Any]:
    """The placements over the EP mesh dim of PEFT's expert LoRA factors of rank ``r`` (a ``ParamWrapper`` over
    ``[E, ...]``) that give each rank exactly its experts' factors, ``(lora_A, lora_B)``:

    * ``lora_A.weight [r * E, in]`` is expert-major (PEFT reads it as ``[E, r, in]``): ``Shard(0)``;
    * ``lora_B.weight [out, r * E]`` is expert-minor (read as ``[out, r, E]``: column ``k * E + e``), so an expert's
      columns are ``r`` apart: ``_StridedShard(1, split_factor=r)`` (the ``r`` runs of ``E`` columns, each
      chunked over the ranks) gives rank ``i`` the columns ``k * E + e`` of its experts ``e``, in PEFT's order,
      which reads locally as ``[out, r, E / ep]``."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return Shard(0), _StridedShard(1, split_factor=r)


def expert_parallel_plan(model: nn.Module) -> dict[str, nn.Module]:
    """Experts module name (in ``model``, a PEFT model included) -> module, for every module the model's
    ``ep_plan`` names ``ep_dispatch_experts``; where it has no plan, every fused experts module (an
    ``Fp8Experts``, or a stock module whose forward ``Fp8Experts`` reproduces)."""
    base = unwrap_peft(model)
    prefix = next((name for name, module in model.named_modules() if module is base), "")
    prefix = f"{prefix}." if prefix else ""
    plan = getattr(base, "ep_plan", None) or getattr(base, "_ep_plan", None) or {}
    patterns = [pattern_of(p) for p, style in dict(plan).items() if style == MODULE_STYLE]
    found = {}
    for name, module in base.named_modules():
        planned = any(p.fullmatch(name) for p in patterns)
        if planned or (not patterns and (isinstance(module, Fp8Experts) or fused_experts_shapes(module))):
            found[prefix + name] = experts_under_peft(module)
    return found


def experts_under_peft(module: nn.Module) -> nn.Module:
    """The experts module itself under PEFT's ``ParamWrapper``s (LoRA ``target_parameters`` nests one a
    targeted tensor around it; the model's ``ep_plan`` names the outermost)."""
    while _is_param_wrapper(module) and isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def _is_param_wrapper(module: nn.Module) -> bool:
    """PEFT's ``ParamWrapper`` or a subclass (FSDP2's ``FSDPParamWrapper`` included), told by class name as PEFT
    does (no import of PEFT here)."""
    return any(kind.__name__ == "ParamWrapper" for kind in type(module).__mro__)


def _lora_wrappers(model: nn.Module, experts: nn.Module) -> list[nn.Module]:
    """The ``Fp8ExpertsParamWrapper``s (one a targeted tensor, nested) whose base is ``experts``, outermost first."""
    return [
        module
        for module in model.modules()
        if callable(getattr(module, "shard_lora_over_experts", None)) and module.get_base_layer() is experts
    ]


def _unit_of(model: nn.Module, experts: nn.Module) -> nn.Module:
    """The outermost module of ``experts`` and the LoRA wrappers around it: what FSDP2 shards as one unit, so the
    factors, DTensors on the EP mesh like the codes, are sharded over dp with them."""
    wrappers = _lora_wrappers(model, experts)
    inner = {id(w.base_layer) for w in wrappers}
    outer = [w for w in wrappers if id(w) not in inner]
    return outer[0] if outer else experts


def _stock_lora_wrapper(model: nn.Module, experts: nn.Module) -> str | None:
    """The name of a stock PEFT ``ParamWrapper`` directly around ``experts``, if any."""
    for name, module in model.named_modules():
        if (
            type(module).__name__ == "ParamWrapper"
            and type(module).__qualname__ != "Fp8ExpertsParamWrapper"
            and getattr(module, "base_layer", None) is experts
        ):
            return name
    return None


def _check(name: str, module: nn.Module, ep: int) -> None:
    if getattr(module, "_is_expert_parallel", False) or getattr(module, "_is_hooked", False):
        raise ExpertParallelError(f"{name} is already expert-parallel (parallelize_experts ran on it before)")
    missing = [
        leaf for leaf in EXPERT_PROJECTIONS if not isinstance(module._parameters.get(leaf), nn.Parameter)
    ]
    if missing:
        raise ExpertParallelError(
            f"{name} ({type(module).__name__}) has no fused expert parameter {missing[0]!r}: expert parallelism "
            f"splits {EXPERT_PROJECTIONS} by expert"
        )
    held = [leaf for leaf in EXPERT_PROJECTIONS if is_dtensor(module._parameters[leaf])]
    if held:
        raise ExpertParallelError(
            f"{name}.{held[0]} is already a DTensor ({tuple(module._parameters[held[0]].placements)!r}): apply "
            "parallelize_experts to the model built on meta, before fully_shard or any other placement"
        )
    experts = int(module._parameters["gate_up_proj"].shape[0])
    if experts % ep:
        raise ExpertParallelError(
            f"{name} ({type(module).__name__}) has {experts} experts, which {ep} expert-parallel ranks cannot "
            f"split evenly (each rank holds experts // ep of them, as transformers' grouped_gemm style does): "
            f"choose an EP degree that divides {experts}"
        )


def _singleton_mesh(device_type: str) -> Any:
    """A 1-rank mesh of this rank alone: the ``tp_mesh`` of transformers' EP implementations without tensor
    parallelism (every rank its own batch). Collective: every rank creates every 1-rank group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    group, _ = dist.new_subgroups(group_size=1)
    return DeviceMesh.from_group(group, device_type, mesh_dim_names=("tp",))


def _dispatch_style() -> Any:
    """transformers' ``EpDispatchExpertsParallel`` with its forward context (which hands the experts' forward its
    DTensor parameters as local tensors) extended to the module's DTensor buffers: an ``Fp8Experts``' grids."""
    from transformers.distributed.expert_parallel import EpDispatchExpertsParallel

    class LocalBuffersDispatch(EpDispatchExpertsParallel):
        def context_around_forward(self, module: nn.Module, mesh: Any) -> Any:
            stack = contextlib.ExitStack()
            stack.enter_context(super().context_around_forward(module, mesh))
            stack.enter_context(_local_buffers(module))
            return stack

    return LocalBuffersDispatch()


@contextlib.contextmanager
def _local_buffers(module: nn.Module) -> Iterator[None]:
    """The module's DTensor buffers (an ``Fp8Experts``' scale grids) as their local parts for the forward."""
    originals = {name: b for name, b in module._buffers.items() if b is not None and is_dtensor(b)}
    module._buffers.update({name: b.to_local() for name, b in originals.items()})  # type: ignore[attr-defined]
    try:
        yield
    finally:
        module._buffers.update(originals)


def stock_lora_refusal(where: str) -> str:
    return (
        f"{where}: PEFT LoRA target_parameters on dequantized experts under expert parallelism is not supported "
        "(stock PEFT parametrizes the whole fused tensor, a DTensor of every expert, which the dispatched "
        "forward cannot run); load the experts FP8-resident (dequantize=False), whose adapters run on each "
        "rank's experts, or adapt the attention only"
    )


def parallelize_experts(
    model: nn.Module, ep_mesh: Any, *, tp_mesh: Any = None, implementation: str = "auto"
) -> dict[str, str]:
    """Expert parallelism on the 1-D ``ep_mesh`` for every experts module of ``expert_parallel_plan(model)``:
    its fused parameters (and an ``Fp8Experts``' scale grids) ``Shard(0)``, its forward dispatching tokens to
    the experts' ranks. Call it on the model built on meta (after PEFT, before ``fully_shard``), then
    ``to_empty`` and ``load_weights``: each rank reads only its experts' pieces (codes and grids).

    ``tp_mesh``: the ranks sharing one batch (transformers' meaning); default a 1-rank mesh per rank, every rank
    its own batch. ``implementation``: a name of transformers' ``EPImplementationInterface`` (``"auto"``,
    ``"all_to_all"``, ``"all_reduce"`` with a shared batch). Returns module name -> what it holds.

    LoRA factors on the experts (PEFT's ``target_parameters``, applied before or after this call) become DTensors
    on ``ep_mesh`` holding this rank's experts' rows (:func:`lora_factor_placements`): their gradients are
    DTensors too and, like the experts', already sum every rank's tokens routed to them (the all-to-all's
    backward): divide them by the number of batches, do not all-reduce them (:func:`fully_shard_experts` does
    this under FSDP2)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from transformers.distributed.expert_parallel import MoEParamShard

    if ep_mesh.ndim != 1:
        raise ExpertParallelError(
            f"the expert-parallel mesh must be 1-D (one dim of your mesh: mesh['ep']), got {ep_mesh!r}"
        )
    modules = expert_parallel_plan(model)
    if not modules:
        raise ExpertParallelError(
            f"{type(unwrap_peft(model)).__name__} has no fused experts module (no ep_plan entry "
            f"{MODULE_STYLE!r} and no module with fused {EXPERT_PROJECTIONS}): nothing to split by expert"
        )
    ep = ep_mesh.size()
    for name, module in modules.items():
        _check(name, module, ep)
        wrapper = _stock_lora_wrapper(model, module)
        if wrapper is not None:
            raise ExpertParallelError(stock_lora_refusal(wrapper))
    tp_mesh = _singleton_mesh(ep_mesh.device_type) if tp_mesh is None else tp_mesh
    parameters, dispatch, applied = MoEParamShard(Shard(0), shards_expert_dim=True), _dispatch_style(), {}
    for name, module in modules.items():
        for leaf in EXPERT_PROJECTIONS:
            parameters.shard_param(module, leaf, ep_mesh)
        if isinstance(module, Fp8Experts):
            for scale in (*Fp8Experts.SCALE_NAMES, *Fp8Experts.ACTIVATION_NAMES):
                if module._buffers.get(scale) is None:
                    continue  # no static activation scales (dynamic activations)
                module._buffers[scale] = distribute_tensor(
                    module._buffers[scale], ep_mesh, [Shard(0)], src_data_rank=None
                )
        dispatch.install_forward(module, ep_mesh, tp_mesh=tp_mesh, ep_implementation=implementation)
        module._is_hooked = True
        setattr(module, EP_LORA_MESH, ep_mesh)
        for wrapper in _lora_wrappers(model, module):  # PEFT ran first: split its factors now
            wrapper.shard_lora_over_experts(ep_mesh)
        applied[name] = (
            f"{type(module).__name__}: {module.num_experts} of {module.num_experts * ep} experts a rank"
        )
    return applied


def fully_shard_experts(model: nn.Module, dp_mesh: Any, **fsdp_kwargs: Any) -> list[str]:
    """FSDP2 over the 1-D ``dp_mesh`` (the data-parallel dim beside the EP dim) of every experts module
    :func:`parallelize_experts` split; call it before ``fully_shard`` of the decoder layers. An expert's gradient
    already sums the tokens of its EP group's batches (the all-to-all's backward), so it is divided by all
    ``dp x ep`` batches, as transformers' ``apply_fully_sharded_data_parallelism`` does: with ``dp > 1``
    FSDP2 sums and divides locally (a custom divide factor would be a ``PREMUL_SUM``, which gloo refuses);
    with ``dp == 1`` there is no reduction and FSDP2 divides by the factor itself. With LoRA on the experts the
    unit is the outermost PEFT wrapper (experts and factors together: the factors are DTensors on the EP mesh,
    whose gradients follow the same rule). Returns the modules sharded."""
    from torch.distributed.fsdp import fully_shard

    done = []
    for name, module in expert_parallel_plan(model).items():
        if not getattr(module, "_is_expert_parallel", False):
            raise ExpertParallelError(f"{name} is not expert-parallel: run parallelize_experts on it first")
        ep = module._parameters["gate_up_proj"].device_mesh.size()
        unit = _unit_of(model, module)
        fully_shard(unit, mesh=dp_mesh, **fsdp_kwargs)
        unit.set_gradient_divide_factor(float(dp_mesh.size() * ep))
        if dp_mesh.size() > 1:
            unit.set_force_sum_reduction_for_comms(True)
        done.append(name)
    return done
