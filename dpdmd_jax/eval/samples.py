"""VAE-decoded sample grids of the student for a fixed set of prompts x seeds, to TensorBoard.

The prompts are the first `num_prompts` of the data source (`eval_cond`), each with the same
`seeds` noises at every evaluation, so grids of successive rounds compare sample for sample. The
VAE is loaded from the pipeline (fp32 by default: the SDXL VAE gives NaNs in fp16) and sharded like
the teacher; sampling and decoding run in one jitted program.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpdmd_jax.core import NoPrompts, TrainState
from dpdmd_jax.eval.grid import image_grid
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.parallel.multihost import SyncedJit
from dpdmd_jax.sampling.sampler import SamplingRun


def _vae(run: SamplingRun, dtype: str) -> tuple[nnx.GraphDef, nnx.State]:
    """The VAE in `dtype`: an LPIPS regression run's own (`Frozen.perceptual`, float32) when it is
    that dtype, rather than a second copy on device; else loaded."""
    p = run.frozen.perceptual
    if p is not None and all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(p.vae)):
        return p.vae_graphdef, p.vae
    return nnx.split(run.backbone.load_vae(run.mesh, run.rules, dtype))


class SampleGrid:
    def __init__(self, run: SamplingRun, workdir: str, num_prompts: int = 4, seeds: int = 4, vae_dtype: str = "float32",
                 scale: int = 1):
        d, mesh = run.distiller, run.mesh
        if not run.backbone.has_vae():
            raise ValueError(f"the samples evaluator decodes with a VAE; backbone {run.config.backbone!r} has none")
        try:
            cond = jax.device_get(run.data.eval_cond(num_prompts))
        except NoPrompts as e:
            raise ValueError(f"the samples evaluator needs prompts; data.kind={run.config.data.kind!r}: {e}") from e
        prompts = jax.tree.leaves(cond)[0].shape[0]
        n = prompts * seeds
        pad = -n % mesh_lib.batch_divisor(mesh)  # extra samples to fill the mesh, dropped after decoding
        rows = np.concatenate([np.repeat(np.arange(prompts), seeds), np.zeros(pad, int)])
        self.cond = jax.tree.map(lambda x: mesh_lib.global_batch(mesh, np.asarray(x)[rows]), cond)
        noise = np.asarray(jax.random.normal(jax.random.key(4321), (seeds, *d.latent_shape)))
        self.eps = mesh_lib.global_batch(mesh, np.concatenate([np.tile(noise, (prompts, 1, 1, 1)),
                                                               np.zeros((pad, *d.latent_shape), noise.dtype)]))
        self.n, self.cols, self.scale = n, seeds, scale
        self.buffers, self.frozen, self.distiller = run.frozen.buffers, run.frozen, d
        vae_graph, self.vae_state = _vae(run, vae_dtype)
        key = jax.random.key(4322)  # stochastic (VP) student steps

        def sample_and_decode(params, buffers, vae_state, eps, cond):
            z = d.sample(params, buffers, eps, cond, key)
            images = run.backbone.decode(nnx.merge(vae_graph, vae_state), z.astype(jnp.float32))
            return jnp.clip(images, -1.0, 1.0)

        self._run = SyncedJit(sample_and_decode, "sample_grid", out_shardings=mesh_lib.replicated(mesh))

    def grid(self, state: TrainState) -> np.ndarray:
        """[prompts * H * scale, seeds * W * scale, 3] in [0, 1]."""
        student = self.distiller.weights("student", state.student, self.frozen)  # LoRA: base + adapters
        images = self._run(student, self.buffers, self.vae_state, self.eps, self.cond)
        return image_grid(np.asarray(images.addressable_data(0))[: self.n], cols=self.cols, scale=self.scale)

    def run(self, step: int, state: TrainState, writer: Any) -> None:
        writer.write_images(step, {"student_samples": self.grid(state)[None]})
