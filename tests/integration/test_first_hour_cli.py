"""A new user's first hour with `python -m dpdmd_jax.main`: --help shows what there is, --dry_run
checks everything and prints every config field with its origin, a mistyped field or flag is one
line, every problem of a run is listed at once before the workdir is touched, and a lone process of
a multi-process launch says what it waits for; the package installs with its assets. (The parts
that run in this process: tests/unit/test_first_hour.py.)"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from configs import sd35 as sd35_config
from configs import toy as toy_config
from dpdmd_jax.run import preflight
from dpdmd_jax.config import ConfigError, override
from dpdmd_jax.run import train as run_train
from dpdmd_jax.run import workdir as workdir_lib
from tests.helpers import REPO


def _main(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dpdmd_jax.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_help_lists_the_multiprocess_flags_and_the_dry_run():
    out = _main("--help")
    assert out.returncode == 0, out.stderr
    for flag in ("--config", "--workdir", "--dry_run", "--coordinator_address", "--num_processes", "--process_id"):
        assert flag in out.stdout, flag


def test_mistyped_fields_and_flags_are_one_line(tmp_path):
    workdir = f"--workdir={tmp_path / 'run'}"
    typo = _main("--config=configs/toy.py", workdir, "--config.distill.lamda_div=0.5")
    assert typo.returncode == 2 and _error_lines(typo.stderr) == [
        "Error: --config.distill.lamda_div: the config has no field 'lamda_div'; did you mean "
        "--config.distill.lambda_div? (`python -m dpdmd_jax.main --config=... --workdir=... --dry_run` prints every "
        "field of a config with its value)"]
    unknown = _main("--config=configs/toy.py", workdir, "--config.distill.foo=1")
    assert unknown.returncode == 2 and len(_error_lines(unknown.stderr)) == 1
    assert "--config.distill.foo: the config has no field 'foo'" in unknown.stderr
    process = _main("--config=configs/toy.py", workdir, "--coordinator_address=localhost:1234", "--num_processes=2",
                    "--process_id=5")
    assert process.returncode == 2
    assert _error_lines(process.stderr) == ["Error: --process_id=5 must lie in 0..1 (--num_processes=2)."]
    assert not os.path.exists(tmp_path / "run")


def test_dry_run_prints_every_field_with_its_origin_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    out = _main("--config=configs/toy.py:k10", f"--workdir={workdir}", "--config.distill.lambda_div=0.5", "--dry_run")
    assert out.returncode == 0, out.stderr
    rows = {m.group(1): (m.group(2), m.group(3)) for m in
            re.finditer(r"^  (\S+)\s+(.+?)\s{2,}(default|variant|command line)$", out.stdout, re.M)}
    assert rows["distill.anchor_k"] == ("10", "variant")
    assert rows["distill.lambda_div"] == ("0.5", "command line")
    assert rows["num_rounds"] == ("200", "default")
    flat = preflight._flatten(toy_config.get_config("k10"))
    assert set(rows) == set(flat)  # every field, nothing else
    assert f"{workdir}: new run" in out.stdout and "every check passed" in out.stdout
    assert not os.path.exists(workdir)

    # Every problem at once, one line each, and still nothing written.
    afile = tmp_path / "afile"
    afile.write_text("")
    bad = _main("--config=configs/toy.py", f"--workdir={afile / 'run'}", "--config.batch_size=0",
                "--config.teacher.cfg_scale=0.5", "--dry_run")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    problems = [line for line in bad.stderr.splitlines() if line.startswith("  - ")]
    assert any("batch_size=0 must be a positive integer" in p for p in problems)
    assert any("teacher.cfg_scale=0.5 must be >= 1" in p for p in problems)
    assert any(f"{afile} is a file, not a folder" in p for p in problems)


def test_workdir_problems_name_what_is_wrong(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert preflight.workdir_problems(str(afile)) == [
        f"--workdir={afile} exists and is a file, not a folder: choose another --workdir."]
    assert "is a file, not a folder" in preflight.workdir_problems(str(afile / "a" / "b"))[0]
    assert preflight.workdir_problems(str(tmp_path / "new" / "run")) == []
    # A folder no one can write into (root included: immutable, as a read-only mount would be).
    locked = tmp_path / "locked"
    locked.mkdir()
    subprocess.run(["chattr", "+i", str(locked)], check=True)
    try:
        assert preflight.workdir_problems(str(locked / "run")) == [
            f"--workdir={locked / 'run'} cannot be written ({locked}: Operation not permitted): choose a folder you "
            f"can write, or fix the permissions of {locked}."]
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


@pytest.fixture(scope="module")
def tiny_sd3(tiny_sd3_pipeline, tmp_path_factory):
    root, _ = tiny_sd3_pipeline  # a session fixture of tests/conftest.py
    prompts = os.path.join(tmp_path_factory.mktemp("tiny_sd3_prompts"), "prompts.txt")
    with open(prompts, "w") as f:
        f.write("a cat\na dog\n")
    return root, prompts


def test_every_missing_component_is_listed_before_the_workdir_is_touched(tiny_sd3, tmp_path):
    root, prompts = tiny_sd3
    broken = str(tmp_path / "broken")
    shutil.copytree(root, broken)
    shutil.rmtree(os.path.join(broken, "vae"))
    shutil.rmtree(os.path.join(broken, "tokenizer_2"))
    for name in os.listdir(os.path.join(broken, "transformer")):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(broken, "transformer", name))
    c = override(sd35_config.get_config("tiny"), {"model.source": broken, "data.prompt_file": prompts})
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        run_train.train(c, str(workdir))
    message = str(e.value)
    assert "has no .safetensors weights" in message
    assert "has no vae/ folder" in message and "decodes the sample grids" in message
    assert "tokenizer_2" in message
    assert not os.path.exists(workdir)
    # The corrected command finds nothing in its way.
    assert preflight.run_problems(override(c, {"model.source": root}), str(workdir)) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_a_lone_process_says_what_it_waits_for(tmp_path):
    address = f"localhost:{_free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "dpdmd_jax.main", "--config=configs/toy.py:smoke",
                             f"--workdir={tmp_path / 'run'}", f"--coordinator_address={address}", "--num_processes=2",
                             "--process_id=0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        t0 = time.time()
        while not any("still waiting" in line for line in lines):
            assert time.time() - t0 < 120, lines
            lines.append(proc.stderr.readline())
    finally:
        proc.kill()
        proc.communicate()
    waiting = f"process 0 of 2: waiting for all 2 processes to join the coordinator at {address}"
    assert any(line.startswith(waiting + " ...") for line in lines), lines
    assert any(line.startswith(waiting + ": still waiting after") for line in lines), lines


def test_main_without_config_resumes_the_recorded_config(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    c = override(toy_config.get_config("smoke"), {"distill.lambda_div": 0.25, "num_rounds": 7})
    workdir_lib.check_workdir_config(str(workdir), c)  # the record a run of `c` leaves
    out = _main(f"--workdir={workdir}", "--config.num_rounds=9", "--dry_run")
    assert out.returncode == 0, out.stderr
    assert re.search(r"^  distill\.lambda_div\s+0\.25\s+recorded$", out.stdout, re.M)
    assert re.search(r"^  num_rounds\s+9\s+command line$", out.stdout, re.M)
    changed = _main(f"--workdir={workdir}", "--config.distill.lambda_div=0.5", "--dry_run")
    assert changed.returncode == 2 and "distill.lambda_div: 0.25 -> 0.5" in changed.stderr
    nothing = _main(f"--workdir={tmp_path / 'empty'}", "--dry_run")
    assert nothing.returncode == 2 and "--config" in nothing.stderr and "Traceback" not in nothing.stderr


def test_the_package_installs_with_its_assets_and_dependencies(tmp_path):
    import zipfile

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), REPO], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    shutil.rmtree(os.path.join(REPO, "build"), ignore_errors=True)  # setuptools' staging folder
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "dpdmd_jax/main.py" in names and "dpdmd_jax/toy/assets/teacher/diffusion_pytorch_model.safetensors" in names
    with open(os.path.join(REPO, "requirements.txt")) as f:
        wanted = [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]
    assert all(f"Requires-Dist: {req}" in metadata for req in wanted)
