"""The SDXL path on a tiny random pipeline (`dpdmd_jax.tools.tiny_pipeline --family=sdxl`):
`configs/sdxl.py` trains through the same `main`, checkpoints and writes grids, and its
export is a StableDiffusionXLPipeline whose 4-step LCM call is our student sampler. (Prompt
embeddings against `encode_prompt`: tests/parity/test_sdxl_encoding.py.)"""

from __future__ import annotations

import os

import jax
import numpy as np
import torch

from tests.torch_helpers import rel_err


def test_sdxl_config_trains_checkpoints_writes_grids_and_exports(sdxl_tiny_run, tmp_path):
    """configs/sdxl.py:tiny through the same CLI as SD3.5 (`sdxl_tiny_run`, tests/conftest.py: one
    device, XLA:CPU's fusion emitters): the VP teacher, CLIP prompts, VAE grids. Nothing below
    compares numbers with that process: the checks read its files."""
    from configs import sdxl as sdxl_config
    from dpdmd_jax.config import override
    from dpdmd_jax.run import setup as setup_lib
    from tests.helpers import read_metrics
    from tests.integration.test_sd35_pipeline import _image_tags

    root, prompts, workdir = str(sdxl_tiny_run / "pipe"), sdxl_tiny_run / "prompts.txt", sdxl_tiny_run / "run"
    assert [m["step"] for m in read_metrics(workdir)] == [1, 2]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    assert "student_samples" in _image_tags(workdir)

    logged = read_metrics(workdir)
    assert all(np.isfinite(m[k]) for m in logged for k in ("loss", "loss_dmd", "loss_div", "loss_fake"))
    # (Resuming the shipped setting: tests/integration/test_real_configs.py, on SD3: resuming knows no family.)
    c = override(sdxl_config.get_config("tiny"), {"model.source": root, "data.prompt_file": str(prompts),
                                                   "num_rounds": 2})

    # Export: StableDiffusionXLPipeline loads it, with the student's weights in unet/; its LCM
    # scheduler's 4 steps are our student steps (x0, then re-noise): our schedule's maths on the
    # exported UNet's eps (the UNet port itself is proven in test_unet), with the same initial
    # latents and re-noising noise, gives the pipeline's own output.
    from diffusers import StableDiffusionXLPipeline

    from dpdmd_jax.run import export as run_export
    from dpdmd_jax.run import sample as run_sample
    from dpdmd_jax.diffusion import vp
    from dpdmd_jax.weights import loader
    from dpdmd_jax.weights.unet import key_map

    setup = setup_lib.build(c)
    out = run_export.export_student(c, str(workdir), str(tmp_path / "export"), link="symlink", run=setup)
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and os.path.islink(os.path.join(out, "vae"))
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    d = setup.distiller
    params, _ = run_sample.load_student(setup, str(workdir), None)
    exported = dict(pipe.unet.state_dict())
    for name, w in loader.export_tensors(params, key_map(setup.teacher_model.cfg, params)):
        np.testing.assert_array_equal(exported[name].numpy(), w, err_msg=name)
    cond = jax.device_get(setup.data.eval_cond(2))
    eps = np.asarray(jax.random.normal(jax.random.key(5), (2, *d.latent_shape)))
    gen = torch.Generator().manual_seed(0)
    noises = [torch.randn((2, d.latent_shape[2], *d.latent_shape[:2]), generator=gen) for _ in range(3)]
    added = dict(text_embeds=torch.from_numpy(np.array(cond.text_embeds)),
                 time_ids=torch.from_numpy(np.array(cond.time_ids)))
    z = eps
    for i, (t, t_next) in enumerate(zip(d.student_grid[:-1], d.student_grid[1:])):
        with torch.no_grad():
            e = pipe.unet(torch.from_numpy(z.transpose(0, 3, 1, 2).copy()), torch.tensor(int(t)),
                          torch.from_numpy(np.array(cond.context)), added_cond_kwargs=added).sample
        x0 = np.asarray(d.schedule.to_x0(z, e.numpy().transpose(0, 2, 3, 1), t))
        z = x0 if t_next < 0 else np.asarray(vp.add_noise(x0, noises[i].numpy().transpose(0, 2, 3, 1),
                                                          d.schedule.abar(t_next)))
    h, w = (8 * s for s in c.data.latent_size)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=torch.from_numpy(np.array(cond.context)),
                      pooled_prompt_embeds=torch.from_numpy(np.array(cond.text_embeds)), height=h, width=w,
                      latents=torch.from_numpy(eps.transpose(0, 3, 1, 2).copy()), num_inference_steps=4,
                      guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert rel_err(z, theirs.numpy().transpose(0, 2, 3, 1)) <= 1e-4
