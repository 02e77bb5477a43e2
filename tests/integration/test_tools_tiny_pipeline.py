"""`python -m dpdmd_jax.tools.tiny_pipeline`: real argument parsing (`--help`, flags in any order,
one-line errors with exit code 2 for a missing or non-empty folder, before anything is built or
imported), and a pipeline folder with ordinary file modes (the umask's, not safetensors' 0600)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from dpdmd_jax.tools import tiny_pipeline
from tests.helpers import REPO


def _run(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "dpdmd_jax.tools.tiny_pipeline", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_command_line_help_and_bad_folders(tmp_path):
    out = _run("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m dpdmd_jax.tools.tiny_pipeline")
    assert "--family {sd3,sdxl}" in out.stdout and "OUT_DIR" in out.stdout
    assert "--workdir=/tmp/run \\\n" in out.stdout  # the docstring's command lines keep their continuations
    assert os.listdir(tmp_path) == []  # no folder named --help

    missing = _run("--family=sdxl", cwd=tmp_path)
    assert missing.returncode == 2 and "required: OUT_DIR" in missing.stderr

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    full = _run(str(tmp_path / "full"), "--family=sdxl", cwd=tmp_path)
    assert full.returncode == 2 and "exists and is not empty" in full.stderr and "Traceback" not in full.stderr
    assert os.listdir(tmp_path / "full") == ["keep.txt"]

    bad = _run(str(tmp_path / "new"), "--family=sd2", cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice: 'sd2'" in bad.stderr and not (tmp_path / "new").exists()


def test_flags_after_the_folder_and_ordinary_file_modes(tmp_path, capsys):
    """The folder first, then --family: an SDXL pipeline; every file 0644, every folder 0755 under
    umask 022 (the weights were 0600: safetensors writes them through private temporary files)."""
    root = tmp_path / "pipe"
    old = os.umask(0o022)
    try:
        tiny_pipeline.main([str(root), "--family=sdxl", "--seed=1"])
    finally:
        os.umask(old)
    assert "StableDiffusionXLPipeline" in capsys.readouterr().out
    with open(root / "model_index.json") as f:
        assert json.load(f)["_class_name"] == "StableDiffusionXLPipeline"
    modes = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            modes[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
    assert modes["unet/diffusion_pytorch_model.safetensors"] == 0o644  # written by safetensors
    assert {m for p, m in modes.items() if os.path.isfile(root / p)} == {0o644}, modes
    assert {m for p, m in modes.items() if os.path.isdir(root / p)} == {0o755}, modes
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o755
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        tiny_pipeline.make_tiny_pipeline(str(root))
