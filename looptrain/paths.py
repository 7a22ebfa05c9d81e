"""How paths in recipes and on the command line are read, and how errors name them.

One rule for every path key (`data.dir`, `out_dir`, `checkpoint.resume`, and the
paths given to `prepare`, `eval`, `inspect`, `export`): a relative path is
resolved against the current directory of the process that reads it, as in any
shell command. Only `base:` inside a recipe is relative to the recipe file
(it names another recipe, not data). Errors name the resolved absolute path,
so a run started from an unexpected directory says where it looked.
"""

from __future__ import annotations

import os
from pathlib import Path


def shown(path: str | os.PathLike) -> str:
    """`path` for an error message: absolute, with a note when it was given relative."""
    given = Path(path)
    if given.is_absolute():
        return str(given)
    return f"{Path.cwd() / given} ({os.fspath(path)} relative to the current directory)"
