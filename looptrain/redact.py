"""Keeping credentials out of every file a run writes.

W&B API keys and object-store credentials (AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AZURE_*_KEY, OCI keys, ...) live in the environment of the
processes that need them. Run directories, checkpoints, sbatch scripts and
logs are copied, shared and uploaded, so nothing that writes one may copy a
credential into it: the writers of recipes (recipe.yaml, the checkpoint's
recipe.json, W&B's config, launch records), DeepSpeed's config file and
emitted sbatch scripts pass their content through `redact`, which

* replaces the value of every mapping key that names a secret
  (`*key*`, `*secret*`, `*token*`, `*password*`, `*credential*`, as a word
  of the name: `api_key`, `AWS_SECRET_ACCESS_KEY`, not `ce_chunk_tokens`), and
* replaces every occurrence of a secret environment variable's value (a
  variable whose name names a secret, e.g. one typed into a recipe override).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

REDACTED = "<redacted>"
_WORDS = {"key", "keys", "secret", "secrets", "token", "password", "passwd", "passphrase", "credential",
          "credentials", "apikey", "accesskey", "secretkey", "privatekey"}
_SPLIT = re.compile(r"[^a-z0-9]+")
_MIN_VALUE_LEN = 8  # shorter values ("1", "true") are not worth hiding and would redact ordinary text


def is_secret_name(name: str) -> bool:
    """Whether a variable or mapping key names a credential (a word of it is key/secret/token/...)."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(name)).lower()  # apiKey -> api_key
    words = [w for w in _SPLIT.split(snake) if w]
    return any(w in _WORDS for w in words) or "connection_string" in snake


def secret_values(environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """{value: name} of the environment's credentials, longest value first."""
    env = os.environ if environ is None else environ
    found = {v: k for k, v in env.items() if is_secret_name(k) and len(v) >= _MIN_VALUE_LEN}
    return dict(sorted(found.items(), key=lambda kv: -len(kv[0])))


def redact_text(text: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """`text` with every secret environment value replaced by <redacted:NAME>."""
    for value, name in secret_values(environ).items():
        if value in text:
            text = text.replace(value, f"<redacted:{name}>")
    return text


def redact(obj: Any, environ: Optional[Mapping[str, str]] = None) -> Any:
    """A copy of a JSON-like value with secret-named keys' values and secret environment values replaced."""
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if is_secret_name(str(key)) and value not in (None, "", [], {}) and not isinstance(value, (Mapping, bool)):
                out[key] = REDACTED
            else:
                out[key] = redact(value, environ)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, environ) for v in obj)
    if isinstance(obj, str):
        return redact_text(_ASSIGNMENT.sub(_hide_assignment, obj), environ)
    return obj


# `NAME=value` inside a string (a profile's setup line, a recipe override in a launch record)
_ASSIGNMENT = re.compile(r"(?<![\w.])([A-Za-z_][\w.]*)=([^\s'\"]+)")


def _hide_assignment(match: re.Match) -> str:
    name, value = match.group(1), match.group(2)
    if is_secret_name(name.rsplit(".", 1)[-1]) and not value.startswith("$"):
        return f"{name}={REDACTED}"
    return match.group(0)


_EXPORT = re.compile(r"^(\s*(?:export\s+)?)([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def redact_shell(text: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """A shell script with no credential in it: `[export] NAME=literal` of a secret NAME becomes a
    reference to the submitting environment (sbatch passes it to the job), and secret environment
    values anywhere else are replaced."""
    lines = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        match = _EXPORT.match(body)
        if match and is_secret_name(match.group(2)) and not match.group(3).strip().startswith("$"):
            prefix, name = match.group(1), match.group(2)
            body = f'{prefix}{name}="${{{name}:?set {name} in the environment that submits this job}}"'
            line = body + ("\n" if line.endswith("\n") else "")
        lines.append(line)
    return redact_text("".join(lines), environ)
