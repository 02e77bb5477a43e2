"""The mesh is checked with every other problem, before anything is loaded: in the dry run too
(against this process's devices, unless the processes of a multi-process run have yet to join)."""

import jax

from configs import toy as toy_config
from dpdmd_jax.config import override
from dpdmd_jax.run import preflight


def test_mesh_and_batch_problems_are_listed_with_the_others():
    c = override(toy_config.get_config("smoke"), {"mesh.fsdp": 3, "distill.lambda_div": -1.0})
    problems = preflight.run_problems(c)
    assert any(p.startswith("distill.lambda_div=-1.0 is negative") for p in problems)
    mesh = "mesh: mesh sizes {'data': 1, 'fsdp': 3, 'tensor': 1} use 3 devices but 8"
    assert any(p.startswith(mesh) for p in problems)
    assert not any(p.startswith("mesh:") for p in preflight.run_problems(c, check_mesh=False))
    assert preflight.mesh_problems(override(c, {"mesh.fsdp": -1, "batch_size": 6})) == [
        "batch_size=6 is not divisible by the data x fsdp mesh size 8 (mesh {'data': 1, 'fsdp': 8, 'tensor': 1}); "
        "choose a multiple of 8 (--config.batch_size)"]
    assert preflight.mesh_problems(c, devices=jax.devices()[:3]) == []  # the devices a run is given
