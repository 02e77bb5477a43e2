"""`python -m dpdmd_jax.plan` as a user runs it: a tiny run compiled ahead of time for a TPU
topology through libtpu on this CPU host (requirements-plan.txt), and the exit codes a script
can key on (0 fits, 3 does not fit, 2 bad input) with the plan.json it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

TINY = ["--config=configs/toy.py:smoke", "--config.backbone=tiny_flow", "--config.model.source=random",
        "--config.data.kind=random"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plan(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpdmd_jax.plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def test_a_tiny_run_is_planned_for_a_tpu_topology_through_libtpu(tmp_path):
    import libtpu  # noqa: F401  (requirements-dev.txt installs it: a missing install fails here, naming it)

    out = tmp_path / "plan.json"
    r = plan(*TINY, "--target=tpu:v5e:2x2", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    p = json.loads(out.read_text())
    assert p["devices"] == 4 and p["device_kind"].startswith("TPU v5") and p["chip"] == "TPU v5e"
    assert p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and p["per_device_batch"] == 2
    m = p["memory_per_device"]
    assert m["capacity"] == 16 * 2**30 and p["fits"] is True and p["margin_bytes"] == m["capacity"] - m["peak"]
    # TPU layouts pad small arrays: the compiled arguments are at least the state's shape-only bytes.
    assert m["round program"]["arguments"] >= sum(m["round arguments"].values()) > 0
    assert p["flops"]["roofline"]["chip"] == "TPU v5e" and p["flops"]["roofline"]["round_s"] > 0
    assert "fits: YES" in r.stdout and "roofline on TPU v5e" in r.stdout


def test_exit_codes_and_the_plan_file(tmp_path):
    out = tmp_path / "plan.json"
    # Does not fit a 0.1 MiB budget: exit 3, the plan still written.
    r = plan(*TINY, "--target=cpu:8", "--memory_gib=0.0001", f"--out={out}")
    assert r.returncode == 3, r.stderr[-3000:]
    assert json.loads(out.read_text())["fits"] is False and "fits: NO" in r.stdout
    # Bad input: one line each, exit 2, no plan written; an existing plan is not overwritten.
    before, fresh = out.read_text(), tmp_path / "fresh.json"
    for args, words in [(["--target=gpu:8", f"--out={fresh}"], "use tpu:<topology>"),
                        (["--target=tpu:v9z:1x1", f"--out={fresh}"], "libtpu cannot describe topology"),
                        (["--target=cpu:8", "--config.batch_size=12", f"--out={fresh}"], "batch_size"),
                        (["--target=cpu:8", f"--out={out}"], "exists")]:
        r = plan(*TINY, *args)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
    assert out.read_text() == before and not fresh.exists()
