"""Write a trained model as a Hugging Face folder that needs no looptrain to load.

    looptrain export CKPT|RUN_DIR|EXPORT OUT            # --format hf (default)

OUT then holds
    config.json, configuration_looptrain.py, modeling_looptrain.py
                       AutoConfig / AutoModelForCausalLM with trust_remote_code=True
    model.safetensors  the weights under looptrain's own names (a tied head stored once)
    model_config.json  looptrain's export config: OUT is also a plain looptrain export
                       (`load_exported`, `looptrain eval`)
    tokenizer.model, tokenization_looptrain.py, tokenizer_config.json, special_tokens_map.json
                       AutoTokenizer with trust_remote_code=True (lossless sentencepiece)
    generation_config.json, recipe.yaml, README.md (model card: recipe, training
                       tokens, per-loop norm statistics at the last log before the save)

The modeling code is the three `*_looptrain.py` files of this package, copied as
they are; they import torch, transformers and sentencepiece only.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
CODE_FILES = ("configuration_looptrain.py", "modeling_looptrain.py", "tokenization_looptrain.py")
WEIGHTS_FILE = "model.safetensors"
LOOPTRAIN_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.model"

# Every ModelConfig field the exported modeling code implements, with the values it
# knows (None: any value). A field missing here, or a value outside its set, cannot
# be expressed and is refused at export time instead of loading into a wrong model.
EXPRESSIBLE: dict[str, Optional[tuple]] = {
    "vocab_size": None, "d_model": None, "n_heads": None, "prelude_layers": None, "core_layers": None,
    "coda_layers": None, "loops": None, "max_seq_len": None, "mlp_ratio": None, "norm_eps": None,
    "rope_theta": None, "tied_embeddings": (True, False), "bias": (True, False), "init_std": None,
    "initial_state_std": None, "alpha_init": None, "alpha_ref_rms": None, "exit_gate": (True, False),
    "norm": ("rmsnorm", "layernorm"),
    "block_style": ("prenorm", "sandwich"),
    "positions": ("learned", "rope"),
    "injection": ("none", "add", "concat", "contractive"),
    "initial_state": ("embeddings", "zeros", "noise"),
    "readout": ("rmsnorm", "raw", "final_only", "alpha"),
    "recurrence": ("residual", "rmsnorm", "contractive"),
}
TRAINING_ONLY = ("dropout", "init")  # no effect on an inference forward pass


class ExportError(ValueError):
    """The source cannot be exported; the message names the problem and the fix."""


def check_expressible(model: dict[str, Any], where: str) -> None:
    for key, value in model.items():
        if key in TRAINING_ONLY:
            continue
        if key not in EXPRESSIBLE:
            raise ExportError(
                f"{where}: model.{key}={value!r} cannot be expressed in the transformers export (its modeling code "
                "has no such option); export with --format looptrain instead"
            )
        allowed = EXPRESSIBLE[key]
        if allowed is not None and value not in allowed:
            raise ExportError(
                f"{where}: model.{key}={value!r} cannot be expressed in the transformers export (supported: "
                f"{', '.join(map(str, allowed))}); export with --format looptrain instead"
            )


def hf_config(model: dict[str, Any]) -> dict[str, Any]:
    """config.json: the architecture, the inference knobs' defaults, and where the code is."""
    config = {k: v for k, v in model.items() if k not in TRAINING_ONLY}
    config.update(
        architectures=["LoopTrainForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_looptrain.LoopTrainConfig",
            "AutoModelForCausalLM": "modeling_looptrain.LoopTrainForCausalLM",
        },
        model_type="looptrain",
        inference_depth=model["loops"],
        exit_policy="none",
        exit_threshold=2.0,
        exit_kv="copy",
        initial_state_seed=None,
        hidden_size=model["d_model"],
        num_attention_heads=model["n_heads"],
        max_position_embeddings=model["max_seq_len"],
        num_hidden_layers=model["prelude_layers"] + model["core_layers"] + model["coda_layers"],
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        use_cache=True,
        torch_dtype="float32",
    )
    return config


def tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "LoopTrainTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_looptrain.LoopTrainTokenizer", None]},
        "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": None,
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
        "split_special_tokens": True,
        "model_max_length": 1_000_000_000,
    }


# ------------------------------------------------------------------ sources


@dataclasses.dataclass
class Source:
    """What an export is made from: weights + model config, and whatever is known about training."""

    weights_dir: Path  # holds model.safetensors + model_config.json (a looptrain export)
    recipe: Optional[dict]  # the resolved recipe as a dict
    tokens: Optional[int]
    step: Optional[int]
    metrics: dict
    label: str


def _is_looptrain_export(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file() and (path / LOOPTRAIN_CONFIG_FILE).is_file()


def _read_source(path: Path, scratch: Path) -> Source:
    """A looptrain export (old or hf format), a checkpoint, or a run directory (its latest checkpoint)."""
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory; pass a checkpoint, a run directory or an export")
    if _is_looptrain_export(path):
        recipe = None
        if (path / "recipe.yaml").is_file():
            import yaml

            recipe = yaml.safe_load((path / "recipe.yaml").read_text())
        card = path / "looptrain_training.json"
        info = json.loads(card.read_text()) if card.is_file() else {}
        return Source(path, recipe, info.get("tokens"), info.get("step"), info.get("metrics", {}), path.name)

    from looptrain.checkpoint import payload
    from looptrain.checkpoint.errors import CheckpointError
    from looptrain.checkpoint.layout import resolve_checkpoint
    from looptrain.checkpoint.manifest import read_manifest
    from looptrain.checkpoint.tools import export_checkpoint

    try:
        ckpt = resolve_checkpoint(path)
    except FileNotFoundError as err:
        raise ExportError(f"{path}: neither an export nor a checkpoint ({err})") from None
    export_checkpoint(ckpt, scratch)  # validates the manifest, consolidates the shards
    manifest = read_manifest(ckpt)
    recipe = payload.load_recipe_dict(ckpt)
    try:
        metrics = dict(payload.load_trainer_state(ckpt).last_metrics or {})
    except CheckpointError:
        metrics = {}
    run = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.name
    return Source(scratch, recipe, manifest.get("tokens"), manifest.get("step"), metrics, f"{run}@{ckpt.name}")


def _model_dict(weights_dir: Path) -> dict[str, Any]:
    data = json.loads((weights_dir / LOOPTRAIN_CONFIG_FILE).read_text())
    model = data.get("model")
    if not isinstance(model, dict) or not model:
        raise ExportError(f"{weights_dir / LOOPTRAIN_CONFIG_FILE}: no model section; re-export the checkpoint")
    return model


def _tokenizer_path(source: Source, explicit: Optional[str]) -> Optional[Path]:
    if explicit:
        path = Path(explicit)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise ExportError(f"--tokenizer {explicit}: no sentencepiece model there; pass DATA_DIR/{TOKENIZER_FILE}")
        return path
    if (source.weights_dir / TOKENIZER_FILE).is_file():
        return source.weights_dir / TOKENIZER_FILE
    data_dir = ((source.recipe or {}).get("data") or {}).get("dir")
    if data_dir is None:
        raise ExportError(
            f"{source.label}: no recipe says which dataset (and so which tokenizer) it was trained on; "
            f"pass --tokenizer DATA_DIR/{TOKENIZER_FILE} or --no-tokenizer"
        )
    path = Path(data_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise ExportError(
            f"{source.label}: the run's dataset {data_dir} has no {TOKENIZER_FILE}; pass --tokenizer "
            f"DATA_DIR/{TOKENIZER_FILE} (the one the run was prepared with) or --no-tokenizer"
        )
    return path


# ------------------------------------------------------------------ model card


def _norm_table(metrics: dict) -> list[str]:
    loops = sorted({int(k.rsplit("/", 1)[1]) for k in metrics if k.startswith("norm/") and k.rsplit("/", 1)[1].isdigit()})
    if not loops:
        return ["No per-loop norm statistics were recorded with this model."]
    cols = [("RMS", "norm/rms/"), ("mean ‖h‖", "norm/mean/"), ("p99 ‖h‖", "norm/p99/"), ("max ‖h‖", "norm/max/"),
            ("train CE", "train/loss_exit/")]
    cols = [(name, prefix) for name, prefix in cols if any(prefix + str(k) in metrics for k in loops)]
    lines = ["| loop | " + " | ".join(name for name, _ in cols) + " |", "|---:|" + "---:|" * len(cols)]
    for k in loops:
        cells = []
        for _, prefix in cols:
            value = metrics.get(prefix + str(k))
            cells.append("-" if value is None else f"{value:.4g}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def model_card(model: dict, source: Source, recipe_yaml: Optional[str], has_tokenizer: bool) -> str:
    K = model["loops"]
    tokens = f"{source.tokens:,}" if source.tokens is not None else "unknown"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [looptrain, looped-lm, custom_code]",
        "---",
        f"# {source.label}",
        "",
        f"A looped language model trained with looptrain: {model['prelude_layers']} prelude + "
        f"{model['core_layers']} core layers looped K={K} times + {model['coda_layers']} coda layers, "
        f"d_model {model['d_model']}, {model['n_heads']} heads, vocabulary {model['vocab_size']}, "
        f"readout `{model['readout']}`, recurrence `{model['recurrence']}`, injection `{model['injection']}`.",
        "",
        f"- training tokens: {tokens}" + (f" (step {source.step})" if source.step is not None else ""),
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)          # depth K",
        f"deep = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True, inference_depth={2 * K})",
        "tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)" if has_tokenizer else "# no tokenizer",
        "ids = tok(\"In the beginning\", return_tensors=\"pt\").input_ids",
        "out = model.generate(ids, max_new_tokens=32, depth=8, exit_policy=\"max_prob\", exit_threshold=0.9)",
        "```",
        "",
        "Inference knobs (config defaults, also per call): `depth` (loops per token, default K), `exit_policy` "
        "(none, fixed, max_prob, margin, logit_margin, entropy, kl, gate), `exit_threshold`, `exit_kv` "
        "(copy: an exited token's deeper keys/values are those of its exit loop; compute: it runs to full depth "
        "for the cache).",
        "",
        f"## Per-loop norm statistics (raw state h_k, last log before step {source.step})",
        "",
        *_norm_table(source.metrics),
        "",
        "## Recipe",
        "",
        "```yaml",
        (recipe_yaml or "# not recorded").rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ export


def export_hf(
    source_path: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: Optional[str] = None,
    with_tokenizer: bool = True,
) -> Path:
    """Write the transformers folder for a checkpoint, run directory or export; returns out_dir."""
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="looptrain-export-") as tmp:
        source = _read_source(Path(source_path), Path(tmp))
        model = _model_dict(source.weights_dir)
        check_expressible(model, source.label)
        tok_path = _tokenizer_path(source, tokenizer) if with_tokenizer else None
        if tok_path is not None:
            _check_tokenizer(tok_path, model["vocab_size"])
        out.mkdir(parents=True, exist_ok=True)
        _write_weights(source.weights_dir / WEIGHTS_FILE, out / WEIGHTS_FILE)
        if source.weights_dir.resolve() != out.resolve():
            shutil.copyfile(source.weights_dir / LOOPTRAIN_CONFIG_FILE, out / LOOPTRAIN_CONFIG_FILE)
        (out / "config.json").write_text(json.dumps(hf_config(model), indent=2) + "\n")
        for name in CODE_FILES:
            shutil.copyfile(HERE / name, out / name)
        (out / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False, "max_new_tokens": 128}, indent=2) + "\n")
        if tok_path is not None:
            if tok_path.resolve() != (out / TOKENIZER_FILE).resolve():
                shutil.copyfile(tok_path, out / TOKENIZER_FILE)
            (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
            (out / "special_tokens_map.json").write_text(json.dumps(
                {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}, indent=2) + "\n")
        recipe_yaml = _recipe_yaml(source.recipe)
        if recipe_yaml is not None:
            (out / "recipe.yaml").write_text(recipe_yaml)
        (out / "looptrain_training.json").write_text(json.dumps(
            {"tokens": source.tokens, "step": source.step, "metrics": source.metrics}, indent=1) + "\n")
        (out / "README.md").write_text(model_card(model, source, recipe_yaml, tok_path is not None))
    return out


def _recipe_yaml(recipe: Optional[dict]) -> Optional[str]:
    if not recipe:
        return None
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False)


def _check_tokenizer(path: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as err:
        raise ExportError(f"{path}: not a sentencepiece model ({err}); pass the dataset's {TOKENIZER_FILE}") from None
    if sp.GetPieceSize() > vocab_size:
        raise ExportError(
            f"{path}: {sp.GetPieceSize()} pieces, more than the model's vocab_size {vocab_size}; "
            "this is not the tokenizer the model was trained with"
        )


def _write_weights(src: Path, dst: Path) -> None:
    """Re-save with the metadata transformers requires (format=pt); names and values unchanged."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    save_file(tensors, str(dst), metadata={"format": "pt", "looptrain_format": "looptrain-model"})
