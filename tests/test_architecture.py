"""The one-way import order of ARCHITECTURE.md, read from its layer table and checked on the source.

Every import of one looptrain package or top-level module by another (lazy and
TYPE_CHECKING imports included: they are dependencies all the same) must point
to a lower layer. A failure names the import; either remove it or, when the new
arrow is intended, move the package in ARCHITECTURE.md's table and say why there.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "looptrain"
# Third-party modules that mean parallelism, data loading or tracking: the model and the
# objectives take tensors and configs only.
FORBIDDEN_BELOW = {
    "model": ("torch.distributed", "deepspeed", "streaming", "wandb", "submitit"),
    "objectives": ("torch.distributed", "deepspeed", "streaming", "wandb", "submitit"),
}


def layer_table() -> dict[str, int]:
    """`| N | `name`, `name` |` rows of ARCHITECTURE.md -> {name: N}."""
    layers = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        match = re.match(r"^\| (\d+) \| (.+) \|$", line)
        if match:
            for name in re.findall(r"`([a-z_]+)`", match.group(2)):
                layers[name] = int(match.group(1))
    return layers


def unit_of(module: str) -> str:
    """looptrain.model.readout -> model; looptrain.train -> train."""
    return module.split(".")[1]


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """(module, line) for every import in a file under `root`, relative imports resolved, in line order."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x, from ..y import z
                base = list(path.relative_to(root).with_suffix("").parts)[: -node.level]
                found.append((".".join(base + ([node.module] if node.module else [])), node.lineno))
            elif node.module:
                found.append((node.module, node.lineno))
    return sorted(found, key=lambda item: item[1])


@functools.lru_cache(maxsize=None)
def package_imports() -> dict[Path, tuple[str, list[tuple[str, int]]]]:
    """{file: (its unit, its imports)} over the package, parsed once per session."""
    return {path: (unit, imports_of(path)) for path, unit in source_units().items()}


def source_units() -> dict[Path, str]:
    units = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel == Path("__init__.py"):
            continue  # the package's own __init__ imports nothing
        units[path] = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    return units


def test_every_package_and_module_has_a_layer():
    layers = layer_table()
    assert layers, "ARCHITECTURE.md has no layer table"
    missing = sorted(set(source_units().values()) - set(layers))
    assert not missing, f"looptrain units in no layer: {missing}; add each to the layer table of ARCHITECTURE.md"
    stale = sorted(set(layers) - set(source_units().values()))
    assert not stale, f"ARCHITECTURE.md lists units that do not exist: {stale}"


def test_imports_point_down_the_layers_only():
    layers = layer_table()
    wrong = []
    for path, (unit, imports) in package_imports().items():
        for module, line in imports:
            if not module.startswith("looptrain."):
                continue
            target = unit_of(module)
            if target != unit and layers.get(target, -1) >= layers[unit]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {unit} (layer {layers[unit]}) imports {module} "
                             f"(layer {layers.get(target)})")
    assert not wrong, "imports against the layer order of ARCHITECTURE.md:\n" + "\n".join(wrong)


def test_model_and_objectives_know_nothing_of_parallelism_data_or_tracking():
    wrong = []
    for path, (unit, imports) in package_imports().items():
        for module, line in imports:
            if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN_BELOW.get(unit, ())):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {unit} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_the_package_imports_nothing_from_the_scripts_around_it():
    wrong = [f"{path.relative_to(ROOT)}:{line}: imports {module}"
             for path, (_, imports) in package_imports().items() for module, line in imports
             if module.split(".")[0] in ("tools", "benchmarks", "tests", "repro")]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: an import inside a function and a relative import are both found."""
    pkg = tmp_path / "looptrain" / "model"
    pkg.mkdir(parents=True)
    source = pkg / "x.py"
    source.write_text("def f():\n    from looptrain.train import Trainer\n\nfrom ..parallel import base\n")
    assert imports_of(source, root=tmp_path) == [("looptrain.train", 2), ("looptrain.parallel", 4)]
