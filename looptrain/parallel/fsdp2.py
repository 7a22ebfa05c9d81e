"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks.

Units. Each transformer block is its own FSDP unit, and the train module
(embeddings, tied head, readout, the core's small non-block parameters) is the
root unit. The root is not resharded after forward, so the tied embedding --
used at the input and again as the LM head at every exit, both inside the
train module's forward -- is one parameter gathered once: the tie survives
sharding by construction.

Looped blocks. The core's layers run once per loop and the coda once per
exit, i.e. K times per forward. Plain per-block sharding handles that
correctly (the gradients equal single-process ones: autograd sums all K uses
into one AccumulateGrad before FSDP's last post-backward hook of the block
reduce-scatters it once), but it all-gathers every looped block again at each
of its K forward calls and K backward calls: 2K-1 all-gathers of the same
unchanged weights per step where 1 suffices -- the communication of an
unrolled K*N-layer model for the parameters of an N-layer one. So looped
blocks are kept gathered from their first use until the end of the step
(`reshard_after_forward=False`, `set_reshard_after_backward(False)`), and the
backend reshards them itself after the last micro-step's backward and after
evaluation. Per step that is one all-gather and one reduce-scatter per looped
block, still issued block by block so they overlap with compute; the price is
that the whole core is unsharded in memory during the step, as it is used in
every loop anyway. Recipes for which even one unsharded core does not fit can
set `parallel.reshard_looped_blocks=true` to re-gather per call instead.

Mixed precision: parameters are gathered in `parallel.param_dtype`, gradients
reduced in `parallel.reduce_dtype` (fp32 by default); the sharded master
weights and optimizer state stay fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from looptrain.config.schema import RecipeError
from looptrain.optim import build_adamw
from looptrain.parallel.activation import apply_activation_checkpointing, apply_compile
from looptrain.parallel.base import Backend
from looptrain.train_module import StepOutput

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_mesh(device_type: str, world_size: int, replicate: int) -> DeviceMesh:
    """1-D (shard) mesh, or 2-D (replicate, shard) for HSDP when replicate > 1."""
    if replicate < 1 or world_size % replicate:
        raise RecipeError(
            f"parallel.replicate={replicate} does not divide the world size {world_size}; "
            f"HSDP needs world_size = replicate x shard, e.g. parallel.replicate=1 or a divisor of {world_size}"
        )
    if replicate == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (replicate, world_size // replicate), mesh_dim_names=("replicate", "shard"))


def _ensure_process_group(device: torch.device) -> None:
    """fully_shard needs a process group even for one rank (e.g. loading a checkpoint at world 1)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def looped_blocks(model: nn.Module) -> list[nn.Module]:
    """Blocks called more than once per forward: the core's layers (every loop), the coda (every exit)."""
    return [*model.core.layers, *model.coda]


class FSDP2Backend(Backend):
    name = "fsdp2"

    def setup(self, train_module: nn.Module) -> None:
        pcfg = self.recipe.parallel
        _ensure_process_group(self.device)
        world = dist.get_world_size()
        self.mesh = build_mesh(self.device.type, world, pcfg.replicate)
        self.reshard_looped = bool(getattr(pcfg, "reshard_looped_blocks", False))

        model = train_module.model
        # Checkpointing and compilation wrap blocks first, so that each FSDP
        # unit is the (wrapped) block and recomputation runs inside its hooks.
        apply_activation_checkpointing(model, pcfg.activation_checkpointing)
        if pcfg.compile:
            apply_compile(model)
        train_module.to(self.device)

        policy = MixedPrecisionPolicy(param_dtype=_DTYPES[pcfg.param_dtype], reduce_dtype=_DTYPES[pcfg.reduce_dtype])
        for block in model.prelude:
            fully_shard(block, mesh=self.mesh, mp_policy=policy)
        self._kept_gathered: list[FSDPModule] = []
        for block in looped_blocks(model):
            fully_shard(block, mesh=self.mesh, mp_policy=policy, reshard_after_forward=self.reshard_looped)
            if not self.reshard_looped:
                block.set_reshard_after_backward(False)
                self._kept_gathered.append(block)
        fully_shard(train_module, mesh=self.mesh, mp_policy=policy)
        self._module = train_module
        self._optimizer = build_adamw(train_module, self.recipe.optim, fused=self.device.type == "cuda" or None)

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def model(self) -> nn.Module:
        return self._module.model

    def reshard(self) -> None:
        """Free every gathered parameter, leaving only shards (the state between steps).

        Looped blocks stay gathered after backward by design; their gathered
        copies must not outlive an optimizer step (they would be stale), and a
        checkpoint must see shards only.
        """
        for module in self._module.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def forward_backward(
        self,
        tokens: Tensor,
        targets: Tensor,
        *,
        depth: int,
        backprop_loops: Optional[int],
        measure_all_exits: bool,
        last_micro_step: bool,
    ) -> StepOutput:
        # Reduce-scatter only on the last micro-step; earlier ones accumulate
        # unsharded local gradients (and keep looped blocks gathered).
        self._module.set_requires_gradient_sync(last_micro_step)
        with self.autocast():
            out = self._module(tokens, targets, depth=depth, backprop_loops=backprop_loops,
                               measure_all_exits=measure_all_exits)
        (out.loss / self.grad_accum).backward()
        if last_micro_step and self._kept_gathered:
            for block in self._kept_gathered:
                block.reshard()
        return out

    def optimizer_step(self, lr: float) -> Tensor:
        return self._clip_and_step(self._optimizer, lr)

    @torch.no_grad()
    def evaluate(self, tokens: Tensor, targets: Tensor, *, measure_all_exits: bool = True) -> StepOutput:
        try:
            return super().evaluate(tokens, targets, measure_all_exits=measure_all_exits)
        finally:
            self.reshard()
