"""The SDXL path on tiny random pipelines (`dpdmd_jax.tools.tiny_pipeline --family=sdxl`): prompt
embeddings equal `StableDiffusionXLPipeline.encode_prompt` (zero and encoded negatives, time ids),
and `configs/sdxl.py` trains through the same `main`, checkpoints, resumes and writes grids."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from dpdmd_jax.parallel.mesh import make_mesh
from dpdmd_jax.text.sdxl import load_sdxl_text_encoder
from dpdmd_jax.tools.tiny_pipeline import make_tiny_pipeline
from tests.helpers import rel_err

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = "a red house at night on the sea " * 20  # > 77 CLIP tokens
PROMPTS = ["the cat on the sea", LONG, "dog", "photo of a blue house"]
IMAGE = (64, 48)  # (H, W) pixels: latent 8 x 6


@pytest.fixture(scope="module", params=[True, False], ids=["zero_negative", "encoded_negative"])
def tiny_sdxl(request, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny_sdxl") / "pipe")
    return root, make_tiny_pipeline(root, family="sdxl", force_zeros_for_empty_prompt=request.param)


def test_prompt_embeddings_match_encode_prompt(tiny_sdxl):
    root, pipe = tiny_sdxl
    with torch.no_grad():
        ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    ids = pipe._get_add_time_ids(IMAGE, (0, 0), IMAGE, dtype=torch.float32, text_encoder_projection_dim=8)
    text = load_sdxl_text_encoder(root, make_mesh(fsdp=8), image_size=IMAGE, dtype="float32", progress=False)
    ours, empty = text.encode(PROMPTS), jax.device_get(text.empty())
    assert text.force_zeros is pipe.config.force_zeros_for_empty_prompt
    for name, a, b in [("context", ours.context, ctx), ("text_embeds", ours.text_embeds, pooled),
                       ("negative context", np.broadcast_to(empty.context, neg_ctx.shape), neg_ctx),
                       ("negative text_embeds", np.broadcast_to(empty.text_embeds, neg_pooled.shape), neg_pooled)]:
        b = b.numpy()
        err = rel_err(a, b) if np.abs(b).max() > 0 else float(np.abs(a).max())
        print(f"{name}: rel {err:.2e}, max abs {np.abs(np.asarray(a) - b).max():.2e}")
        assert np.shape(a) == b.shape and err <= 1e-5, name
    np.testing.assert_array_equal(ours.time_ids, np.broadcast_to(ids.numpy(), (len(PROMPTS), 6)))
    np.testing.assert_array_equal(empty.time_ids, ids.numpy())
    assert text.tokenize(PROMPTS)[1].tolist() == [p == LONG for p in PROMPTS]


def test_sdxl_config_trains_checkpoints_resumes_and_writes_grids(tmp_path):
    """configs/sdxl.py:tiny through the same CLI as SD3.5: the VP teacher, CLIP prompts, VAE grids."""
    from configs import sdxl as sdxl_config
    from dpdmd_jax.config import override
    from dpdmd_jax.run import train as run_train
    from dpdmd_jax.run import setup as setup_lib
    from tests.test_sd35_pipeline import _image_tags, _metrics

    root = str(tmp_path / "pipe")
    make_tiny_pipeline(root, family="sdxl")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "dpdmd_jax.main", "--config=configs/sdxl.py:tiny", f"--workdir={workdir}",
           f"--config.model.source={root}", f"--config.data.prompt_file={prompts}", "--config.num_rounds=2"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [m["step"] for m in _metrics(workdir)] == [1, 2]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    assert "student_samples" in _image_tags(workdir)

    c = override(sdxl_config.get_config("tiny"), {"model.source": root, "data.prompt_file": str(prompts),
                                                   "num_rounds": 3})
    run_train.train(c, str(workdir))
    logged = _metrics(workdir)
    assert [m["step"] for m in logged] == [1, 2, 3]
    assert all(np.isfinite(m[k]) for m in logged for k in ("loss", "loss_dmd", "loss_div", "loss_fake"))

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
