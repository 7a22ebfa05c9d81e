"""Import transformers beside a CPU torch whose torchvision is a CUDA build.

transformers imports torchvision when it is installed; the registry's CUDA
torchvision fails next to a CPU torch with `operator torchvision::nms does not
exist` (the same trap as `import streaming`, see looptrain.data.streaming_import).
When, and only when, that exact error occurs, the two operator schemas are
declared and the import is retried. Users with a matching torchvision never take
that path, and the exported modeling code does not need this module.
"""

from __future__ import annotations

import sys
from types import ModuleType


def import_transformers() -> ModuleType:
    """The transformers module, with PreTrainedModel importable."""
    try:
        import transformers
        from transformers import PreTrainedModel  # noqa: F401  (the lazy import that pulls torchvision)
    except (RuntimeError, ModuleNotFoundError) as err:
        if "torchvision::" not in f"{err} {err.__cause__}":
            raise
        from looptrain.data.streaming_import import declare_missing_torchvision_operators

        for name in list(sys.modules):
            if name.split(".")[0] in ("transformers", "torchvision") or name.startswith("transformers_modules"):
                del sys.modules[name]
        declare_missing_torchvision_operators()
        import transformers
        from transformers import PreTrainedModel  # noqa: F401
    return transformers
