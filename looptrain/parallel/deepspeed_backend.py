"""DeepSpeed ZeRO 0-3: the engine owns data-parallel reduction, sharding, clipping and the step.

The DeepSpeed config is generated from the recipe so that one recipe means
the same run under every backend (micro-batch, accumulation, clipping, AdamW
hyper-parameters and parameter groups), then `parallel.deepspeed` is
deep-merged over it for anything DeepSpeed-specific (offload, bucket sizes,
...). The resolved config is written to `<run_dir>/deepspeed_config.json`.

Optimizer: DeepSpeed's "AdamW" with `torch_adam: true` is `torch.optim.AdamW`
itself -- the same update as the other backends -- and needs no compiled op
(the fused CUDA/CPU Adam kernels would be JIT-built on first use). Recipes
that want the fused kernel can set
`parallel.deepspeed: {optimizer: {params: {torch_adam: false}}}`.

Precision: `train.precision=bf16` enables DeepSpeed's bf16 mode (bf16 weights
for compute, fp32 master weights in the optimizer), so no autocast is added.

On a machine without GPUs DeepSpeed selects its CPU accelerator and gloo; the
first start JIT-builds a small shared-memory comm op (cached under
TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

from looptrain.config.loader import deep_merge
from looptrain.config.schema import Recipe, RecipeError
from looptrain.fileio import write_text_atomic
from looptrain.optim import param_groups
from looptrain.parallel.activation import apply_activation_checkpointing, apply_compile
from looptrain.parallel.base import Backend, reject_fsdp2_options
from looptrain.train_module import StepOutput

CONFIG_FILE = "deepspeed_config.json"

# `import deepspeed` stays inside the functions that run DeepSpeed: it takes seconds
# and probes the accelerator, and the config helpers here (`deepspeed_config`) are
# used without it.


# DeepSpeed keys that the recipe already sets: `parallel.deepspeed` may repeat
# them with the same value but not change them, or one recipe would mean
# different runs under different backends.
RECIPE_OWNED = {
    ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("gradient_accumulation_steps",): "train.grad_accum",
    ("train_batch_size",): "train.micro_batch_size and train.grad_accum",
    ("gradient_clipping",): "optim.clip_grad_norm",
    ("zero_optimization", "stage"): "parallel.zero_stage",
    ("bf16", "enabled"): "train.precision",
    ("optimizer", "params", "lr"): "optim.lr",
    ("optimizer", "params", "betas"): "optim.betas",
    ("optimizer", "params", "eps"): "optim.eps",
    ("optimizer", "params", "weight_decay"): "optim.weight_decay",
}


def _lookup(config: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def check_overrides(generated: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Reject `parallel.deepspeed` entries that would contradict the recipe, naming the recipe key to use."""
    for path, recipe_key in RECIPE_OWNED.items():
        value = _lookup(overrides, path)
        if value is not None and value != _lookup(generated, path):
            raise RecipeError(
                f"parallel.deepspeed.{'.'.join(path)}={value!r} contradicts the recipe "
                f"({_lookup(generated, path)!r}); set {recipe_key} instead"
            )
    if _lookup(overrides, ("fp16", "enabled")):
        raise RecipeError(
            "parallel.deepspeed.fp16: fp16 loss scaling skips steps on overflow, which looptrain treats as a "
            "non-finite step and halts; use train.precision=bf16"
        )
    if "scheduler" in overrides:
        raise RecipeError(
            "parallel.deepspeed.scheduler: the learning rate follows optim.schedule under every backend; "
            "remove the DeepSpeed scheduler and set optim.schedule"
        )


def deepspeed_config(recipe: Recipe, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config a recipe implies, with `parallel.deepspeed` merged over it."""
    t, o, p = recipe.train, recipe.optim, recipe.parallel
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": float(o.clip_grad_norm or 0.0),
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,
            },
        },
        "steps_per_print": 2**31 - 1,  # looptrain logs; DeepSpeed's own step log would only repeat it
        "wall_clock_breakdown": False,
    }
    check_overrides(config, p.deepspeed)
    return deep_merge(config, p.deepspeed)


def write_config(config: dict[str, Any], run_dir: str) -> str:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, CONFIG_FILE)
    write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True))
    return path


def prepare_for_zero3(train_module: nn.Module) -> None:
    """Make the parameters used outside their own module's forward visible to ZeRO-3.

    ZeRO-3 gathers a parameter only around its owning module's forward and
    backward, found through hooks on the module's input/output tensors. The
    LM head weight (the tied token embedding) is used by the loss -- in
    forward and, for exit-gated supervision, again in the per-token chunked
    cross-entropy's backward, which recomputes the logits -- long after
    the embedding's own forward, and learned positions are indexed directly.
    So they are registered as external parameters of the train module, and
    the train module's forward returns `(loss,)` instead of a `StepOutput`
    dataclass (ZeRO-3 looks for tensors in tuples, lists and dicts only), so
    that its pre-backward hook fires and gathers them again for backward.
    The class is swapped in place, so parameter names and state dicts are
    unchanged; the full `StepOutput` is kept on the module for the backend.
    """
    import deepspeed

    model = train_module.model
    external = [model.head_weight]
    pos_embed = getattr(model, "pos_embed", None)
    if pos_embed is not None:
        external.append(pos_embed.weight)
    for param in external:
        deepspeed.zero.register_external_parameter(train_module, param)

    base = type(train_module)

    def forward(self, *args, **kwargs):
        self.last_step_output = base.forward(self, *args, **kwargs)
        return (self.last_step_output.loss,)

    train_module.__class__ = type(f"ZeRO3{base.__name__}", (base,), {"forward": forward})


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def setup(self, train_module: nn.Module) -> None:
        import deepspeed

        # DeepSpeed still calls the collectives torch renamed; the warning repeats
        # on every call of every rank and says nothing a user can act on.
        warnings.filterwarnings(
            "ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
            category=FutureWarning,
        )
        pcfg = self.recipe.parallel
        reject_fsdp2_options(self.recipe)
        if pcfg.activation_checkpointing != "none" or pcfg.compile:
            apply_activation_checkpointing(train_module.model, pcfg.activation_checkpointing)
            if pcfg.compile:
                apply_compile(train_module.model)
        self.ds_config = deepspeed_config(self.recipe, self.env.world_size)
        if self.env.is_main:
            write_config(self.ds_config, self.recipe.run_dir)
        if self.ds_config["zero_optimization"].get("stage", 0) == 3:
            prepare_for_zero3(train_module)
        train_module.to(self.device)
        self.engine, self._optimizer, _, _ = deepspeed.initialize(
            model=train_module,
            model_parameters=param_groups(train_module, self.recipe.optim),
            config=self.ds_config,
        )

    @property
    def module(self) -> nn.Module:
        return self.engine

    @property
    def model(self) -> nn.Module:
        return self.engine.module.model

    def autocast(self):
        return contextlib.nullcontext()  # bf16 is DeepSpeed's own mode, see the module docstring

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
        # The trainer owns accumulation: tell the engine which backward ends the
        # step (gradients are reduced there), and step once in optimizer_step.
        self.engine.set_gradient_accumulation_boundary(last_micro_step)
        out = self._forward(tokens, targets, depth=depth, backprop_loops=backprop_loops,
                            measure_all_exits=measure_all_exits)
        self.engine.backward(out.loss)  # divides by gradient_accumulation_steps itself
        return out

    def _forward(self, tokens: Tensor, targets: Tensor, **kwargs) -> StepOutput:
        returned = self.engine(tokens, targets, **kwargs)
        if isinstance(returned, StepOutput):
            return returned
        # ZeRO-3 (see prepare_for_zero3): the returned loss carries ZeRO's backward hook.
        train_module = self.engine.module
        out, train_module.last_step_output = train_module.last_step_output, None
        return dataclasses.replace(out, loss=returned[0])

    @torch.no_grad()
    def evaluate(self, tokens: Tensor, targets: Tensor, *, measure_all_exits: bool = True) -> StepOutput:
        was_training = self.engine.training
        self.engine.eval()
        try:
            return self._forward(tokens, targets, measure_all_exits=measure_all_exits)
        finally:
            self.engine.train(was_training)

    def optimizer_step(self, lr: float) -> Tensor:
        """One engine step; the pre-clip global grad norm, or NaN when DeepSpeed skipped the step.

        ZeRO skips a step whose gradients are not finite and zeroes them, but
        keeps reporting the previous step's norm; the trainer must see the
        non-finite step to halt, so a skipped step reads as NaN.
        """
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if not self.engine.was_step_applied():
            norm = math.nan
        if norm is None:
            norm = math.nan
        if isinstance(norm, Tensor):
            return norm.detach().float().to(self.device)
        return torch.tensor(float(norm), device=self.device)
