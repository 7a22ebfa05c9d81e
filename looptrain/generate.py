"""Sample text from a looped model with a per-(loop, layer) KV cache, streaming it to the terminal.

    looptrain generate CKPT|RUN_DIR|EXPORT --prompt "In the beginning" --max-new-tokens 64 \
        [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 0] [--depth 8] \
        [--exit-policy max_prob --threshold 0.9 --exit-kv copy]

The model is the transformers export's own class (`looptrain.hf.modeling_looptrain`),
built in-process from the weights, so `looptrain generate` decodes exactly as
`AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)` does.
Each new token runs one forward over itself only; the cache holds the keys and
values of every (loop, layer) of the earlier tokens (`--no-cache` recomputes the
whole prefix every token instead: the reference the cache is measured against).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, TextIO

import torch


class GenerateError(ValueError):
    """A generation input is unusable; the message names it and the fix."""


@dataclass
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_at_eos: bool = True

    def check(self) -> None:
        if self.max_new_tokens < 0:
            raise GenerateError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise GenerateError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise GenerateError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerateError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass
class Knobs:
    """Per-call inference settings of the looped model (None: the config's default)."""

    depth: Optional[int] = None
    exit_policy: Optional[str] = None
    exit_threshold: Optional[float] = None
    exit_kv: Optional[str] = None

    def kwargs(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


# ------------------------------------------------------------------ loading


def _is_export(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and (path / "model_config.json").is_file()


def hf_model_from_export(export_dir: str | Path, **config_overrides):
    """The transformers class of `looptrain.hf` built from an export folder (either format), in eval mode."""
    from safetensors.torch import load_file

    from looptrain.hf.export import hf_config
    from looptrain.hf.runtime import import_transformers

    import_transformers()
    from looptrain.hf.configuration_looptrain import LoopTrainConfig
    from looptrain.hf.modeling_looptrain import LoopTrainForCausalLM

    export_dir = Path(export_dir)
    model_cfg = json.loads((export_dir / "model_config.json").read_text())["model"]
    config = hf_config(model_cfg)
    for key in ("architectures", "auto_map", "model_type", "torch_dtype"):
        config.pop(key)
    config.update(config_overrides)
    model = LoopTrainForCausalLM(LoopTrainConfig(**config))
    model.load_state_dict(load_file(str(export_dir / "model.safetensors")), strict=True)
    return model.eval()


def _recipe_data_dir(path: Path) -> Optional[str]:
    """data.dir of the recipe beside an export / inside a checkpoint / in a run directory."""
    import yaml

    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "recipe.yaml").is_file():
            recipe = yaml.safe_load((candidate / "recipe.yaml").read_text()) or {}
            return (recipe.get("data") or {}).get("dir")
    try:
        from looptrain.checkpoint import payload
        from looptrain.checkpoint.layout import resolve_checkpoint

        recipe = payload.load_recipe_dict(resolve_checkpoint(path))
        return (recipe.get("data") or {}).get("dir")
    except Exception:  # not a checkpoint: no recipe to read
        return None


def load_tokenizer(path: Path, explicit: Optional[str] = None):
    """The export's tokenizer.model, else --tokenizer, else the run's dataset tokenizer."""
    from looptrain.data.tokenizer import Tokenizer

    if explicit:
        candidate = Path(explicit)
        return Tokenizer.load(candidate / "tokenizer.model" if candidate.is_dir() else candidate)
    if (path / "tokenizer.model").is_file():
        return Tokenizer.load(path / "tokenizer.model")
    data_dir = _recipe_data_dir(path)
    if data_dir is None:
        raise GenerateError(f"{path}: no tokenizer.model here and no recipe naming the dataset; pass --tokenizer PATH")
    if not (Path(data_dir) / "tokenizer.model").is_file():
        raise GenerateError(
            f"{path}: the run's dataset {data_dir} has no tokenizer.model; pass --tokenizer DATA_DIR/tokenizer.model"
        )
    return Tokenizer.load(Path(data_dir) / "tokenizer.model")


def load_for_generation(path: str | Path, **config_overrides):
    """(model, source dir) for an export, a checkpoint or a run directory."""
    path = Path(path)
    if not path.exists():
        raise GenerateError(f"{path}: no such file or directory; pass an export, a checkpoint or a run directory")
    if _is_export(path):
        return hf_model_from_export(path, **config_overrides)
    from looptrain.checkpoint.tools import export_checkpoint

    with tempfile.TemporaryDirectory(prefix="looptrain-generate-") as tmp:
        export_checkpoint(path, tmp)
        return hf_model_from_export(tmp, **config_overrides)


# ------------------------------------------------------------------ decoding


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: Optional[torch.Generator]) -> torch.Tensor:
    """(B,) next tokens from (B, V) logits: greedy at temperature 0, else top-k / top-p sampling."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > sampling.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@dataclass
class Step:
    token: int
    loops: float  # loops the new token's prediction used (mean over the call's tokens)
    logits: torch.Tensor  # (V,) the logits it was sampled from


@torch.no_grad()
def generate_steps(
    model,
    prompt_ids: list[int],
    sampling: Sampling,
    knobs: Knobs = Knobs(),
    *,
    use_cache: bool = True,
    eos_id: Optional[int] = None,
) -> Iterator[Step]:
    """Yield the new tokens one at a time (batch 1)."""
    sampling.check()
    if not prompt_ids:
        raise GenerateError("the prompt is empty; pass some text with --prompt")
    cfg = model.config
    depth = knobs.depth if knobs.depth is not None else cfg.inference_depth
    if depth < 1:
        raise GenerateError(f"--depth must be >= 1 loop, got {depth}")
    total = len(prompt_ids) + sampling.max_new_tokens
    if cfg.positions == "learned" and total > cfg.max_seq_len:
        raise GenerateError(
            f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {sampling.max_new_tokens} exceeds the model's "
            f"{cfg.max_seq_len} learned positions; shorten the prompt or generate fewer tokens"
        )
    device = next(model.parameters()).device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    kwargs = {**knobs.kwargs(), "logits_to_keep": 1}  # only the last position's logits are sampled from
    seq = torch.tensor([prompt_ids], device=device)
    out = model(seq, use_cache=use_cache, **kwargs)
    cache = out.past_key_values if use_cache else None
    for _ in range(sampling.max_new_tokens):
        logits = out.logits[:, -1]
        loops = float(out.exit_loops[:, -1].float().mean()) if out.exit_loops is not None else float(depth)
        token = sample_next(logits, sampling, generator)
        yield Step(int(token), loops, logits[0])
        if sampling.stop_at_eos and eos_id is not None and int(token) == eos_id:
            return
        if use_cache:
            out = model(token[:, None], past_key_values=cache, use_cache=True, **kwargs)
        else:
            seq = torch.cat((seq, token[:, None]), dim=1)
            out = model(seq, use_cache=False, **kwargs)


def stream_generate(model, tokenizer, prompt: str, sampling: Sampling, knobs: Knobs, *,
                    use_cache: bool = True, out: Optional[TextIO] = None) -> dict:
    """Print the prompt's continuation as it is produced (to `out`, default the current sys.stdout);
    return the text and timing."""
    out = sys.stdout if out is None else out
    ids: list[int] = []
    printed = ""
    loops: list[float] = []
    start = time.perf_counter()
    for step in generate_steps(model, tokenizer.encode(prompt), sampling, knobs, use_cache=use_cache,
                               eos_id=tokenizer.eos_id):
        ids.append(step.token)
        loops.append(step.loops)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(printed):])
            out.flush()
            printed = text
    seconds = time.perf_counter() - start
    text = tokenizer.decode(ids)
    out.write(text[len(printed):] + "\n")
    out.flush()
    return {"text": text, "tokens": len(ids), "seconds": seconds,
            "mean_loops": sum(loops) / len(loops) if loops else 0.0}
