"""How the ranks of a training job hold the student: DDP (replicated) or FSDP2 (sharded).

``ddp``: every rank holds the whole model, its gradients and its AdamW state (16 bytes per parameter in
fp32); gradients are all-reduced in buckets. ``fsdp``: `torch.distributed.fsdp.fully_shard` on every
decoder layer, on the input embedding (unless tied to the LM head) and at the root, so each rank holds
1/world of the parameters, gradients and optimizer state; a group's parameters are all-gathered just
before its forward (and again for its backward) and freed after, and gradients are reduce-scattered.
The root group (final norm, LM head) stays gathered from the start of the forward to the end of the
backward, which is what lets the loss read the LM-head weight inside the root module's forward
(`pipeline.train.distill.DistillModule`).

Mixed precision under FSDP is a policy (bf16 compute, fp32 gradient reduction, fp32 master weights),
not autocast. CPU offload (FSDP only) keeps the sharded parameters, gradients and optimizer state in
host memory: the optimizer then steps on the CPU. Activation checkpointing recomputes each decoder
layer's activations in the backward pass (both shardings).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import SettingsError
from pipeline.train.distributed import Dist, backend_for

log = logging.getLogger("gkd.train")

SHARDINGS = ("fsdp", "ddp")


def decoder_layers(model: Any) -> list[nn.Module]:
    """The model's transformer blocks: modules of the classes it names in `_no_split_modules`.

    Hugging Face models list there the blocks that must not be split across devices, which are exactly
    the units worth sharding one by one. Raises SettingsError when the model names none.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise SettingsError(
            f"sharding fsdp: expected the model ({type(model).__name__}) to name its decoder layer class in "
            f"_no_split_modules, got {sorted(names) or 'none'}; use --sharding ddp for this model"
        )
    return layers


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute every decoder layer's activations in the backward (non-reentrant checkpointing).

    Raises SettingsError for a model without Hugging Face gradient checkpointing support.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise SettingsError(
            f"activation_checkpointing: {type(model).__name__} does not support gradient checkpointing; "
            "drop --activation-checkpointing"
        )
    # Non-reentrant: works with FSDP2's hooks and with inputs that do not require grad.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def ensure_process_group(d: Dist, host_collectives: bool = False) -> None:
    """FSDP needs a process group even alone: a one-rank group over an in-memory store."""
    if dist.is_initialized():
        return
    backend = backend_for(d.device, host_collectives)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard(
    module: nn.Module,
    model: Any,
    d: Dist,
    *,
    sharding: str,
    bf16: bool = False,
    cpu_offload: bool = False,
) -> nn.Module:
    """Place `module` (which holds the Hugging Face `model`) on the ranks; returns what to call.

    fsdp: shards every decoder layer of `model`, then `module` as the root, in place (parameters become
    DTensors: build the optimizer after this). ddp: moves `module` to the device and wraps it in
    DistributedDataParallel when there are several ranks (the module itself otherwise).
    """
    if sharding not in SHARDINGS:
        raise SettingsError(f"sharding: expected one of {', '.join(SHARDINGS)}, got {sharding!r}")
    if sharding == "ddp":
        if cpu_offload:
            raise SettingsError("cpu_offload: needs --sharding fsdp (DDP keeps everything on the device)")
        module.to(d.device)
        if not d.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Gradients as views into the all-reduce buckets: one copy of the gradients instead of two.
        ids = [d.device.index] if d.device.type == "cuda" else None
        return DDP(module, device_ids=ids, gradient_as_bucket_view=True)
    return _fully_shard(module, model, d, bf16=bf16, cpu_offload=cpu_offload)


def _fully_shard(module: nn.Module, model: Any, d: Dist, *, bf16: bool, cpu_offload: bool) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    ensure_process_group(d, host_collectives=cpu_offload)
    mesh = init_device_mesh(d.device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None
    )
    offload: OffloadPolicy = (
        CPUOffloadPolicy(pin_memory=d.device.type == "cuda") if cpu_offload else OffloadPolicy()
    )
    layers = decoder_layers(model)
    groups = list(layers)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embed.weight is not head.weight:
        # Its own group, gathered only around its forward and backward. A tied embedding stays in the
        # root group with the LM head: one parameter can belong to one group only.
        groups.insert(0, embed)
    for group in groups:
        fully_shard(group, mesh=mesh, mp_policy=mp, offload_policy=offload)
    # The root group: final norm and LM head (which the loss reads inside the root's forward), plus the
    # embedding when tied and anything else outside the groups above.
    # fully_shard moves parameters and buffers to the mesh's device (shards to the CPU with offload).
    fully_shard(module, mesh=mesh, mp_policy=mp, offload_policy=offload)
    log.info(
        "FSDP: %d groups + root sharded over %d ranks (bf16 %s, cpu offload %s)",
        len(groups),
        dist.get_world_size(),
        bf16,
        cpu_offload,
    )
    return module


def grad_norm_value(total: torch.Tensor) -> float:
    """The global gradient norm from `clip_grad_norm_` (a DTensor under FSDP) as a float."""
    full = getattr(total, "full_tensor", None)
    return float(full() if full is not None else total)
