"""Secrets from the environment never reach a file a run writes.

A real tiny training (W&B offline, checkpoints, DeepSpeed config) and an
emitted sbatch script run with fake credentials in the environment (and one
smuggled into the recipe and the cluster profile); no file under the run or
output directories may contain any of the values.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

SECRETS = {
    "WANDB_API_KEY": "wandbkey0123456789abcdef0123456789abcdef",
    "AWS_ACCESS_KEY_ID": "AKIAFAKEACCESSKEY0001",
    "AWS_SECRET_ACCESS_KEY": "fakeAwsSecret/0123456789+abcdefghijklmn",
    "AWS_SESSION_TOKEN": "fakeSessionTokenXYZ0123456789",
    "AZURE_STORAGE_KEY": "fakeAzureStorageKey0123456789==",
    "AZURE_CLIENT_SECRET": "fakeAzureClientSecret987654",
    "OCI_CLI_KEY_CONTENT": "fakeOciPrivateKeyContent555",
    "HF_TOKEN": "hf_fakeHuggingFaceToken00001",
    "DB_PASSWORD": "fakeDatabasePassword4242",
}


def leaked(place: Path) -> list[str]:
    """'file: NAME' for every file at or under `place` that contains a secret value."""
    found = []
    for path in [place] if place.is_file() else place.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {name}" for name, value in SECRETS.items() if value.encode() in data]
    return found


def env_with_secrets(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    credentials = tmp_path / "gcp.json"
    credentials.write_text('{"private_key": "fakeGooglePrivateKey31337"}')
    env.update(SECRETS)
    env.update({"GOOGLE_APPLICATION_CREDENTIALS": str(credentials), "TMPDIR": str(tmp_path),
                "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    return env


@pytest.mark.slow
def test_a_run_and_its_sbatch_script_hold_no_secrets(tmp_path, bible_data):
    out = tmp_path / "runs"
    recipe = {
        "name": "secret", "out_dir": str(out),
        "model": {"vocab_size": 512, "d_model": 32, "n_heads": 2, "core_layers": 1, "loops": 2, "max_seq_len": 64},
        "data": {"dir": bible_data},
        "train": {"steps": 4, "micro_batch_size": 2, "log_every": 2, "val_every": 4, "val_batches": 1,
                  "device": "cpu"},
        "checkpoint": {"every": 2},
        "tracking": {"mode": "offline", "tags": ["t"]},
    }
    recipe_file = tmp_path / "secret.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    env = env_with_secrets(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "looptrain.cli", "train", str(recipe_file)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "train.log").write_text(proc.stdout + proc.stderr)  # the console log is a file a run writes too

    profile = yaml.safe_load((ROOT / "slurm" / "local.yaml").read_text())
    profile["nodes"] = 1
    profile["setup"] = list(profile.get("setup") or []) + [
        f"export AWS_SECRET_ACCESS_KEY={SECRETS['AWS_SECRET_ACCESS_KEY']}",
        "export WANDB_API_KEY=$WANDB_API_KEY",
    ]
    profile_file = tmp_path / "cluster.yaml"
    profile_file.write_text(yaml.safe_dump(profile))
    script = tmp_path / "job.sh"
    proc = subprocess.run([sys.executable, "-m", "looptrain.cli", "launch", str(recipe_file), "--cluster",
                           str(profile_file), "--emit-sbatch", str(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "launch.log").write_text(proc.stdout + proc.stderr)
    text = script.read_text()
    assert "export WANDB_API_KEY=$WANDB_API_KEY" in text  # a reference to the environment is kept
    assert "AWS_SECRET_ACCESS_KEY" in text  # the line stays, its value does not
    bash = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert bash.returncode == 0, bash.stderr

    files = list((out / "secret").rglob("*"))
    assert any(p.name == "manifest.json" for p in files) and any("wandb" in str(p) for p in files)
    written = [out, script, tmp_path / "train.log", tmp_path / "launch.log"]  # not the inputs made above
    assert [hit for place in written for hit in leaked(place)] == []


def test_redaction_by_name_by_assignment_and_by_environment_value():
    from looptrain.redact import REDACTED, is_secret_name, redact, redact_shell

    for name in ("WANDB_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING", "OCI_CLI_KEY_CONTENT", "apiKey",
                 "DB_PASSWORD", "GOOGLE_APPLICATION_CREDENTIALS"):
        assert is_secret_name(name), name
    for name in ("ce_chunk_tokens", "keep_last", "tokens", "max_tokens", "OMP_NUM_THREADS", "monkey"):
        assert not is_secret_name(name), name
    env = {"AWS_SECRET_ACCESS_KEY": SECRETS["AWS_SECRET_ACCESS_KEY"], "HOME": "/home/someone/long"}
    record = {
        "setup": ["export OMP_NUM_THREADS=1", "export HF_TOKEN=hf_literalNotInTheEnvironment", "X=$WANDB_API_KEY"],
        "overrides": ["optim.lr=1e-3", "parallel.deepspeed.comet.api_key=literal0123456789"],
        "deepspeed": {"comet": {"api_key": "literal0123456789", "enabled": True}},
        "note": f"copied {SECRETS['AWS_SECRET_ACCESS_KEY']} by hand",
        "home": "/home/someone/long",
    }
    out = redact(record, env)
    assert out["setup"] == ["export OMP_NUM_THREADS=1", f"export HF_TOKEN={REDACTED}", "X=$WANDB_API_KEY"]
    assert out["overrides"] == ["optim.lr=1e-3", f"parallel.deepspeed.comet.api_key={REDACTED}"]
    assert out["deepspeed"]["comet"] == {"api_key": REDACTED, "enabled": True}
    assert out["note"] == "copied <redacted:AWS_SECRET_ACCESS_KEY> by hand" and out["home"] == record["home"]
    script = redact_shell("export WANDB_API_KEY=abc123abc123\nexport OMP_NUM_THREADS=1\n", env)
    assert script.splitlines() == [
        'export WANDB_API_KEY="${WANDB_API_KEY:?set WANDB_API_KEY in the environment that submits this job}"',
        "export OMP_NUM_THREADS=1",
    ]
