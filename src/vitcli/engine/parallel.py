"""How the objective is spread over processes: DDP replicas or FSDP2 shards, set up once.

- DDP: gradients all-reduced once per optimizer step; `accumulating` skips the sync on the other
  micro-steps.
- FSDP2: `fully_shard` on every encoder block, then on the model, then (mpp / mae) on the objective
  with its own parameters; the parameters become DTensor shards in place, so their names (and
  checkpoints) do not change.
- Activation checkpointing: every block recomputes its activations in backward.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch

from vitcli.engine.cluster import DistEnv


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing: every encoder block recomputes its activations in backward.

    The block's forward is wrapped in place (parameter names, and so checkpoints, do not change).
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def wrap(objective: torch.nn.Module, strategy: str, env: DistEnv, *, activation_checkpointing: bool):
    """(the module the loop calls, the DDP wrapper or None). `objective.model` keeps its parameter
    names; under FSDP its parameters become DTensor shards in place."""
    model = objective.model
    if activation_checkpointing:
        checkpoint_blocks(model)
    if not env.active:
        return objective, None
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        own = [p for name, p in objective.named_parameters() if not name.startswith("model.")]
        if own:  # mpp / mae call the encoder's parts, not its forward: each gathers its shards on its own
            fully_shard(model.patch_embed, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if own:  # the decoder, [mask] token and head are sharded with the objective as the root
            for method in ("encode_patches", "forward_features", "forward_head"):
                register_fsdp_forward_method(model, method)
            fully_shard(objective, mesh=mesh)
        return objective, None
    if env.world_size == 1:
        return objective, None
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(
        objective,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        gradient_as_bucket_view=True,
    )
    return ddp, ddp


def accumulating(ddp, *, last: bool):
    """DDP: skip the gradient all-reduce on every micro-step but the last of an optimizer step.
    (FSDP reduce-scatters every micro-step, which keeps gradients sharded, i.e. small.)"""
    return ddp.no_sync() if ddp is not None and not last else nullcontext()


def grad_scaler(device: torch.device, enabled: bool, sharded: bool):
    if sharded and enabled:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, enabled=True)
    return torch.amp.GradScaler(device.type, enabled=enabled)
