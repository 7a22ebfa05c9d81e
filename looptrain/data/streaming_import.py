"""Import mosaicml-streaming lazily, in a way that also works beside CPU torch.

Why this module exists
----------------------
`import streaming` always imports `streaming.vision`, which imports
torchvision. The torchvision wheel on the package registry is a CUDA build;
beside a CPU-only torch its compiled operators do not load, and its Python
side then fails while registering fake (meta) kernels for operators it
expects the compiled library to have defined:

    RuntimeError: operator torchvision::nms does not exist

looptrain never uses torchvision's operators; it only needs streaming's MDS
reader and writer. So when (and only when) the import fails with exactly that
error, we declare the schemas of the operators that torchvision's Python side
registers kernels for unconditionally (`torchvision::nms`,
`torchvision::qnms`) through `torch.library`, drop the half-imported modules
and import again. With a working torchvision (CUDA torch, or a matching CPU
torchvision) the first import succeeds and nothing is declared, so the real
compiled operators are never shadowed. The declared operators have no kernel:
calling them would fail, and nothing in looptrain or streaming's MDS path
calls them.

The alternative, installing a CUDA torch, costs gigabytes and silently
replaces the CPU torch, so it is not a fix we impose on users.

`import streaming` costs seconds, so it happens here on first use and never
at `import looptrain` time.
"""

from __future__ import annotations

import re
import sys
import threading
from types import ModuleType

# Operators whose fake kernels torchvision registers at import time without
# checking that its compiled library defined them, with their real schemas.
TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING_OPERATOR = re.compile(r"operator torchvision::(\w+) does not exist")

_lock = threading.Lock()
_fallback_library = None  # keeps the torch.library registration alive
_streaming: ModuleType | None = None


def _operator_exists(name: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def declare_missing_torchvision_operators() -> list[str]:
    """Declare the known torchvision operator schemas that do not exist yet; return their names."""
    global _fallback_library
    import torch

    missing = [name for name in TORCHVISION_SCHEMAS if not _operator_exists(name)]
    if missing:
        if _fallback_library is None:
            # FRAGMENT: add to the namespace even if torchvision's compiled
            # library registered some of its operators.
            _fallback_library = torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            _fallback_library.define(TORCHVISION_SCHEMAS[name])
    return missing


def _forget_modules(*packages: str) -> None:
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in packages):
            del sys.modules[name]


def import_streaming() -> ModuleType:
    """Return the `streaming` module, importing it once (see the module docstring)."""
    global _streaming
    with _lock:
        if _streaming is not None:
            return _streaming
        try:
            import streaming
        except RuntimeError as err:
            match = _MISSING_OPERATOR.search(str(err))
            if not match or match.group(1) not in TORCHVISION_SCHEMAS:
                raise
            _forget_modules("streaming", "torchvision")
            declare_missing_torchvision_operators()
            import streaming
        from looptrain.data.shm import install_prefix_registration

        install_prefix_registration(streaming)
        _streaming = streaming
        return streaming
