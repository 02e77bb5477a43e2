"""The jitted sample function closes over no array, for every backbone (on several processes JAX
refuses to embed one that spans other hosts' devices: the MMDiT's position table did, and
two-process SD3 sampling crashed at every compile). Two processes sampling the tiny pipelines:
tests/integration/test_sample_pipelines.py."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from configs import toy as toy_config
from dpdmd_jax.sampling import sampler as sampling_sampler
from dpdmd_jax.run import setup as setup_lib
from dpdmd_jax.parallel import mesh as mesh_lib


@pytest.mark.parametrize("backbone", ["mmdit", "unet"])
def test_the_sample_function_closes_over_no_array(backbone):
    """Every frozen array (the model's buffers, such as the MMDiT's position table) is an argument of
    the jitted sampler, for the student and the teacher: traced, its program holds no jax.Array
    constant (numpy constants, such as the step grid, are fine: every process has them)."""
    c = toy_config.get_config("smoke" if backbone == "mmdit" else "unet")
    setup = setup_lib.build(c)
    assert jax.tree.leaves(setup.frozen.buffers) or backbone == "unet"  # the MMDiT has some to close over
    put = lambda x: mesh_lib.global_batch(setup.mesh, np.asarray(x))
    cond = jax.tree.map(put, setup.data.embed(np.zeros(8, np.int32)))
    ids = put(np.arange(8, dtype=np.int32))
    for sampler in ("student", "teacher"):
        fn = sampling_sampler.make_sample_fn(setup, sampler, root_seed=0)
        traced = fn.func.jitted.trace(*fn.args, setup.frozen.teacher, ids, ids, cond, cond)
        closed = [x.shape for x in traced.jaxpr.consts if isinstance(x, jax.Array)]
        assert not closed, f"{sampler} sampler closes over arrays of shapes {closed}"


def _global(mesh, x):
    return mesh_lib.global_batch(mesh, np.asarray(x))


def test_each_device_samples_only_its_rows():
    """On 8 devices the sampler's program does about 1/8 of the one-device program's FLOPs: the
    models' activations are split like the batch (`parallel.mesh.rows_split`), not computed whole
    on every device, as XLA's propagation from the FSDP-sharded parameters had it (0.22 of the
    work for the student, 0.35 for the teacher's guided sampler, before the split)."""
    flops = {}
    for n in (1, 8):
        setup = setup_lib.build(toy_config.get_config("smoke"), devices=jax.devices()[:n])
        put = functools.partial(_global, setup.mesh)
        cond = jax.tree.map(put, setup.data.embed(np.zeros(8, np.int32)))
        ids = put(np.arange(8, dtype=np.int32))
        for sampler in ("student", "teacher"):
            fn = sampling_sampler.make_sample_fn(setup, sampler, root_seed=0)
            compiled = fn.func.compile(*fn.args, setup.frozen.teacher, ids, ids, cond, cond)
            flops[sampler, n] = compiled.cost_analysis()["flops"]
    for sampler in ("student", "teacher"):
        assert flops[sampler, 8] < 0.2 * flops[sampler, 1], (sampler, flops)
