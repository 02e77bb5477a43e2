"""The planner (`dpdmd_jax.run.plan`): targets, the arguments of an ahead-of-time compile, bad input
named before anything compiles, preset sources.

The memory test plans the `tiny_flow` test backbone on the 8 virtual CPU devices (its round compiles
in seconds; the planner's code path is the same for every backbone). The fit verdict, `--search` and
the FLOPs count against a whole unrolled round compile several rounds each:
tests/integration/test_plan_compile.py; the TPU-topology compile through libtpu:
tests/integration/test_plan_cli.py.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy
from dpdmd_jax.config import ConfigError, override
from dpdmd_jax.run import plan as plan_lib

CPU8 = plan_lib.Target("cpu", "8")


def tiny(**overrides):
    c = override(toy.get_config("smoke"), {"backbone": "tiny_flow", "model.source": "random", "data.kind": "random"})
    return override(c, overrides)


def test_targets_parse_and_bad_ones_say_the_accepted_forms(monkeypatch):
    assert plan_lib.parse_target("tpu:v5p:2x2x1") == plan_lib.Target("tpu", "v5p:2x2x1")
    assert plan_lib.parse_target("cpu:8") == CPU8
    assert plan_lib.parse_target("local") == plan_lib.Target("local")
    for bad in ("gpu:8", "cpu:0", "cpu:x", "tpu:v5p", "tpu:", "v5p:2x2x1", "local:1"):
        with pytest.raises(plan_lib.PlanError, match="use tpu:<topology>"):
            plan_lib.parse_target(bad)
    # No libtpu: one line naming the install, before anything is built.
    monkeypatch.setattr(plan_lib.importlib.util, "find_spec", lambda name: None)
    (problem,) = plan_lib.target_problems(plan_lib.Target("tpu", "v5p:2x2x1"))
    assert "libtpu" in problem and "requirements-plan.txt" in problem
    assert plan_lib.target_problems(CPU8) == []


def test_a_tpu_plan_leaves_out_the_xla_cpu_flags_libtpu_would_abort_on(monkeypatch, capsys):
    """libtpu parses XLA_FLAGS itself and aborts on flags it does not know (the tests' own
    --xla_cpu_use_fusion_emitters=false once killed the TPU plan CLI); the generic ones stay."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_use_fusion_emitters=false "
                                    "--xla_backend_optimization_level=0")
    monkeypatch.delenv("ALLOW_MULTIPLE_LIBTPU_LOAD", raising=False)
    plan_lib.prepare_jax(plan_lib.Target("tpu", "v5p:2x2x1"))
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    assert "leaving out --xla_cpu_use_fusion_emitters=false" in capsys.readouterr().out


def test_the_compiled_arguments_are_the_state_the_run_holds():
    """The per-device split (shape-only sums over the shardings) adds up to XLA's argument bytes of
    the compiled round, less exactly the arguments XLA dropped as unread; the state is split over
    the 8 devices (fsdp), so each holds an eighth of the parameters."""
    c, _ = plan_lib.plannable(tiny(batch_size=8))
    run = plan_lib.abstract_run(c, jax.devices()[:8])
    lowered, state, batch = plan_lib.lower_round(run)
    compiled = lowered.compile()
    leaves = jax.tree.leaves((state, run.frozen, batch))
    kept = lowered._lowering.compile_args["kept_var_idx"]  # the arguments the program reads
    dropped = sum(plan_lib.device_bytes(x) for i, x in enumerate(leaves) if i not in kept)
    held = sum(plan_lib.arguments(run, state, batch).values())
    assert held - dropped == compiled.memory_analysis().argument_size_in_bytes
    whole = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state.student))
    assert plan_lib.device_bytes(state.student) < whole / 4  # split, not replicated


def test_bad_input_is_named_before_anything_compiles():
    with pytest.raises(ConfigError, match="batch_size"):
        plan_lib.plan(tiny(batch_size=12), CPU8)  # 12 rows do not split over 8 devices
    with pytest.raises(ConfigError, match="regression.distance='lpips' cannot be planned yet"):
        plan_lib.plan(tiny(**{"regression.weight": 0.25, "regression.distance": "lpips"}), CPU8)
    with pytest.raises(plan_lib.PlanError, match="exists"):
        plan_lib.write_json(__file__, {})


def test_a_preset_source_builds_its_architecture_with_random_weights_on_the_mesh(monkeypatch):
    """`model.source="preset:NAME"`: the architecture of a named preset, random weights initialised on
    their shardings, the same shapes `abstract_teacher` (what the planner compiles) gives; an
    unknown name lists the presets. (A tiny preset stands in for sd3.5-medium here.)"""
    import dataclasses

    from flax import nnx

    from dpdmd_jax import backbones
    from dpdmd_jax.models import mmdit
    from dpdmd_jax.parallel.mesh import make_mesh, mesh_rules
    from dpdmd_jax.toy.teacher import toy_config

    arch = {k: v for k, v in dataclasses.asdict(toy_config()).items() if k in mmdit._DIFFUSERS_FIELDS}
    monkeypatch.setitem(mmdit.PRESETS, "tiny-test", arch)
    c = override(toy.get_config(), {"model.source": "preset:tiny-test", "data.kind": "random", "evals": {},
                                    "model.scan_layers": True})
    backbone = backbones.get(c)
    assert backbone.check_source() == []
    model = backbone.load(make_mesh(fsdp=8, devices=jax.devices()[:8]), mesh_rules(c))
    params = nnx.state(model, nnx.Param)
    shapes = nnx.state(backbone.abstract_teacher(), nnx.Param)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(lambda x: (x.shape, x.dtype), shapes)
    big = max(jax.tree.leaves(params), key=lambda x: x.size)
    assert len(big.sharding.device_set) == 8 and not big.sharding.is_fully_replicated
    assert float(jnp.std(big)) > 0  # random weights, not zeros

    bad = backbones.get(override(c, {"model.source": "preset:sd9"}))
    (problem,) = bad.check_source()
    assert "preset:sd9" in problem and "preset:sd3.5-medium" in problem
