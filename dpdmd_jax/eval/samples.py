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

from dpdmd_jax.eval import image_grid
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.parallel.multihost import SyncedJit


class SampleGrid:
    def __init__(self, setup: Any, workdir: str, num_prompts: int = 4, seeds: int = 4, vae_dtype: str = "float32",
                 scale: int = 1):
        from dpdmd_jax.parallel.mesh import mesh_rules

        d, mesh = setup.distiller, setup.mesh
        if not hasattr(setup.data, "eval_cond"):
            raise ValueError(f"the samples evaluator needs prompts; data.kind={setup.config.data.kind!r} has none")
        if not hasattr(setup.backbone, "load_vae"):
            raise ValueError(f"the samples evaluator decodes with a VAE; backbone {setup.config.backbone!r} has none")
        cond = jax.device_get(setup.data.eval_cond(num_prompts))
        prompts = jax.tree.leaves(cond)[0].shape[0]
        n = prompts * seeds
        pad = -n % mesh_lib.batch_divisor(mesh)  # extra samples to fill the mesh, dropped after decoding
        rows = np.concatenate([np.repeat(np.arange(prompts), seeds), np.zeros(pad, int)])
        self.cond = jax.tree.map(lambda x: mesh_lib.global_batch(mesh, np.asarray(x)[rows]), cond)
        noise = np.asarray(jax.random.normal(jax.random.key(4321), (seeds, *d.latent_shape)))
        self.eps = mesh_lib.global_batch(mesh, np.concatenate([np.tile(noise, (prompts, 1, 1, 1)),
                                                               np.zeros((pad, *d.latent_shape), noise.dtype)]))
        self.n, self.cols, self.scale = n, seeds, scale
        self.buffers = setup.frozen.buffers
        vae = setup.backbone.load_vae(mesh, mesh_rules(setup.config), vae_dtype)
        vae_graph, self.vae_state = nnx.split(vae)
        key = jax.random.key(4322)  # stochastic (VP) student steps

        def sample_and_decode(params, buffers, vae_state, eps, cond):
            z = d.sample(params, buffers, eps, cond, key)
            images = setup.backbone.decode(nnx.merge(vae_graph, vae_state), z.astype(jnp.float32))
            return jnp.clip(images, -1.0, 1.0)

        self._run = SyncedJit(sample_and_decode, "sample_grid", out_shardings=mesh_lib.replicated(mesh))

    def grid(self, state: Any) -> np.ndarray:
        """[prompts * H * scale, seeds * W * scale, 3] in [0, 1]."""
        images = self._run(state.student, self.buffers, self.vae_state, self.eps, self.cond)
        return image_grid(np.asarray(images.addressable_data(0))[: self.n], cols=self.cols, scale=self.scale)

    def run(self, step: int, state: Any, writer: Any) -> None:
        writer.write_images(step, {"student_samples": self.grid(state)[None]})
