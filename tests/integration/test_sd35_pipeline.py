"""The real SD3.5 path on a tiny random pipeline (`dpdmd_jax.tools.tiny_pipeline`): the pipeline
loader shards every component; `configs/sd35.py` trains from a prompt file (CLI), the DiffusionDB
builder and an embedding cache, checkpoints and writes VAE-decoded grids; its export loads
in diffusers and its 4-step call is our sampler; a .pt student imports; bad inputs stop with one
clear message before anything is compiled. (Prompt embeddings against `encode_prompt`:
tests/parity/test_sd35_encoding.py.)"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from configs import sd35 as sd35_config
from dpdmd_jax.config import ConfigError, override
from dpdmd_jax.run import train as run_train
from dpdmd_jax.run import setup as setup_lib
from dpdmd_jax.parallel.mesh import make_mesh
from tests.helpers import REPO, read_metrics
from tests.parity.test_sd35_encoding import LONG, PROMPTS
from tests.torch_helpers import rel_err


@pytest.fixture(scope="module")
def tiny(tiny_sd3_pipeline):
    return tiny_sd3_pipeline  # (root, diffusers pipeline): a session fixture of tests/conftest.py


def _prompt_file(folder, lines: list[bytes]) -> str:
    path = os.path.join(folder, "prompts.txt")
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return path


def tiny_config(root: str, **overrides):
    c = sd35_config.get_config("tiny")
    return override(c, {"model.source": root, **overrides})


def _image_tags(workdir) -> set[str]:
    from tensorboard.backend.event_processing import event_accumulator

    tags = set()
    for f in glob.glob(os.path.join(workdir, "tb", "events.*")):
        acc = event_accumulator.EventAccumulator(f, size_guidance={"tensors": 0})
        acc.Reload()
        tags |= {t for t in acc.Tags()["tensors"] if acc.Tensors(t)[0].tensor_proto.dtype == 7}  # DT_STRING: images
    return tags




def test_pipeline_loader_places_every_component_on_the_mesh(tiny):
    from dpdmd_jax.pipelines import load_sd3_pipeline
    from flax import nnx

    root, _ = tiny
    pipe = load_sd3_pipeline(root, make_mesh(fsdp=8), progress=False)
    parts = {"transformer": nnx.state(pipe.transformer), "vae": nnx.state(pipe.vae), **pipe.text.params}
    dtypes = {"transformer": "bfloat16", "vae": "float32", "clip_l": "bfloat16", "clip_g": "bfloat16",
              "t5": "bfloat16"}
    for name, state in parts.items():
        leaves = [x for x in jax.tree.leaves(state) if x.ndim == 2 and x.size >= 256]
        assert leaves and any(not x.sharding.is_fully_replicated for x in leaves), name  # sharded, not replicated
        assert {str(x.dtype) for x in leaves} == {dtypes[name]}, name


# ---------------------------------------------------------------------------- training end to end


def _prompt_run(tiny, base):
    """`configs/sd35.py:tiny` trained through the CLI for 2 rounds from a prompt file (resuming the
    shipped setting: tests/integration/test_real_configs.py)."""
    root, _ = tiny
    os.makedirs(base)
    prompts = _prompt_file(base, [p.encode() for p in PROMPTS[:4]] + [b"caf\xe9 on the sea", LONG.encode()])
    workdir = base / "run"
    cmd = [sys.executable, "-m", "dpdmd_jax.main", "--config=configs/sd35.py:tiny", f"--workdir={workdir}",
           f"--config.model.source={root}", f"--config.data.prompt_file={prompts}", "--config.num_rounds=2"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics_after_cli = read_metrics(workdir)
    checkpoints_after_cli = sorted(os.listdir(workdir / "checkpoints"))
    tags_after_cli = _image_tags(workdir)
    c = tiny_config(root, **{"data.prompt_file": prompts, "num_rounds": 2})
    return dict(root=root, workdir=workdir, prompts=prompts, config=c, cli=out, metrics_after_cli=metrics_after_cli,
                checkpoints_after_cli=checkpoints_after_cli, tags_after_cli=tags_after_cli)


def test_sd35_config_trains_from_a_prompt_file_and_exports(tiny, tmp_path):
    """One test, not one per step: the trained run is what the export checks read (a fixture shared by
    two tests is built once per pytest-xdist worker, and the workers may both ask for it)."""
    prompt_run = _prompt_run(tiny, tmp_path / "prompt_run")
    out = prompt_run["cli"]
    assert "skipped 1 lines that are not valid UTF-8; 5 prompts remain" in out.stdout
    assert "were truncated" in out.stderr  # the over-long prompt, counted in the log
    assert [m["step"] for m in prompt_run["metrics_after_cli"]] == [1, 2]
    assert prompt_run["checkpoints_after_cli"] == ["2"]
    assert "student_samples" in prompt_run["tags_after_cli"]  # the VAE-decoded grid of round 2
    assert all(np.isfinite(m["loss"]) for m in prompt_run["metrics_after_cli"])
    _check_export(prompt_run, tmp_path)


def _check_export(prompt_run, tmp_path):
    """The export loads in diffusers and its 4-step call is our sampler; the sampler writes the same
    student's images from the workdir."""
    from diffusers import StableDiffusion3Pipeline

    from dpdmd_jax.run import export as run_export
    from dpdmd_jax.run import sample as run_sample
    from dpdmd_jax.sampling import sampler as sampling_sampler
    from dpdmd_jax.weights import export as weights_export

    c, workdir = prompt_run["config"], str(prompt_run["workdir"])
    setup = setup_lib.build(c)  # one build serves the export, our sampler and the sample folder
    out = run_export.export_student(c, workdir, str(tmp_path / "export"), run=setup)
    with open(os.path.join(out, "dpdmd_student.json")) as f:
        meta = json.load(f)
    assert meta["call"] == {"num_inference_steps": 4, "guidance_scale": 1.0} and meta["source"].endswith("/2")
    with pytest.raises(weights_export.ExportError, match="never overwrite"):
        run_export.export_student(c, workdir, out, run=setup)
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    pipe.scheduler.set_timesteps(4)
    np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), setup.distiller.student_grid, atol=1e-6)

    # Our student sampler and the exported pipeline's own 4-step call, same latents and embeddings.
    params, _ = run_sample.load_student(setup, workdir, None)
    d = setup.distiller
    cond = jax.device_get(setup.data.eval_cond(2))
    eps = np.asarray(jax.random.normal(jax.random.key(5), (2, *d.latent_shape)))
    ours = np.asarray(jax.jit(lambda p, e, cd: d.sample(p, setup.frozen.buffers, e, cd, jax.random.key(0)))(
        params, eps, cond))  # the flow student is deterministic: the key is unused
    with torch.no_grad():
        theirs = pipe(prompt_embeds=torch.from_numpy(np.array(cond.context)),
                      pooled_prompt_embeds=torch.from_numpy(np.array(cond.pooled)),
                      latents=torch.from_numpy(eps.transpose(0, 3, 1, 2).copy()), num_inference_steps=4,
                      guidance_scale=1.0, output_type="latent").images
    assert rel_err(ours, theirs.numpy().transpose(0, 2, 3, 1)) <= 1e-4

    # The sampler writes the same student's images from the workdir, prompts from the file.
    s = sampling_sampler.sample_with(setup, params, "round 3", str(tmp_path / "samples"), PROMPTS[:2], seeds=2,
                           per_device_batch=1, progress=False)
    assert s["rows"] == 4 and len(os.listdir(os.path.join(s["out"], "images"))) == 4


def _diffusiondb_run(tiny, base):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, _ = tiny
    manual = base / "manual"
    manual.mkdir()
    rows = PROMPTS[:5] + PROMPTS[:3] + [None, "  "]  # repeats, a null and a blank, as in metadata.parquet
    pq.write_table(pa.table({"prompt": rows, "seed": list(range(len(rows)))}), manual / "metadata.parquet")
    c = tiny_config(root, **{"data.kind": "diffusiondb", "data.tfds_dir": str(base / "tfds"),
                             "data.manual_dir": str(manual), "num_rounds": 2})
    workdir = base / "run"
    run_train.train(c, str(workdir))
    return c, read_metrics(workdir), workdir


def _check_run(workdir):
    """Two rounds trained: a checkpoint and a VAE-decoded grid (resuming is the prompt-file run's
    test: it is the same code for every prompt source)."""
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    assert "student_samples" in _image_tags(workdir)


def test_diffusiondb_builder_and_an_embedding_cache_train_alike(tiny, tmp_path, monkeypatch):
    """The DiffusionDB builder keeps the distinct prompts and trains; an embedding cache of the same
    prompts trains to the same numbers without loading the text encoders. (One test: the second run
    is checked against the first.)"""
    from dpdmd_jax.backbones.sd3 import SD3Backbone
    from dpdmd_jax.data import diffusiondb, embedding_cache

    (tmp_path / "ddb").mkdir()
    c, logged, workdir = _diffusiondb_run(tiny, tmp_path / "ddb")
    assert sorted(diffusiondb.Prompts(c.data.tfds_dir)) == sorted(p.strip() for p in PROMPTS[:5])
    assert [m["step"] for m in logged] == [1, 2] and all(np.isfinite(m["loss"]) for m in logged)
    _check_run(workdir)

    cache = str(tmp_path / "cache")
    embedding_cache.build_cache(c, cache, batch=8)  # the config's prompts, through its text encoders
    assert embedding_cache.read_meta(cache)["num_prompts"] == 5
    with pytest.raises(FileExistsError, match="never overwritten"):
        embedding_cache.build_cache(c, cache, batch=8)

    def no_text(*a, **k):
        raise AssertionError("the embedding source must not load the text encoders")

    monkeypatch.setattr(SD3Backbone, "load_text_encoder", no_text)
    cached = override(c.copy_and_resolve_references(), {"data.kind": "embeddings", "data.cache_dir": cache})
    workdir = tmp_path / "run"
    run_train.train(cached, str(workdir))
    for a, b in zip(read_metrics(workdir), logged, strict=True):  # same prompts, same order, same numbers
        for k in ("loss", "loss_dmd", "loss_div", "loss_fake"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, err_msg=k)
    _check_run(workdir)


def test_an_image_folder_cache_holds_vae_latents_and_trains_the_gan_on_them(tiny, tmp_path):
    """DMD2's real side on a real model: an image folder with captions encoded into an embedding cache
    (captions through the text encoders; images, resized and centre-cropped, through the pipeline's VAE:
    the posterior mean as diffusers computes it, scaled as the pipeline scales latents), and a GAN run
    whose real images are read from it."""
    from PIL import Image

    from dpdmd_jax.data import embedding_cache
    from dpdmd_jax.data.image_folder import load_image, read_image_folder

    root, pipe = tiny
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, prompt in enumerate(PROMPTS[:5]):
        Image.fromarray(rng.integers(0, 256, (24 + 8 * i, 20, 3), np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(prompt)
    c = tiny_config(root, **{"evals": {}, "num_rounds": 2})
    cache = str(tmp_path / "cache")
    embedding_cache.build_cache(c, cache, batch=4, images=str(folder))
    meta = embedding_cache.read_meta(cache)
    assert (meta["num_prompts"], meta["prompt_source"], meta["real_latents"]) == (5, "images", [5, 8, 8, 16])

    side = c.data.latent_size[0] * pipe.vae_scale_factor
    x = np.stack([load_image(path, side) for path, _ in read_image_folder(str(folder))])
    with torch.no_grad():
        mean = pipe.vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist.mean
    ref = ((mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor).permute(0, 2, 3, 1).numpy()
    assert rel_err(np.load(os.path.join(cache, "real_latents.npy")), ref) <= 1e-5

    gan = override(c.copy_and_resolve_references(), {"data.kind": "embeddings", "data.cache_dir": cache,
                                                      "gan.weight": 0.5, "gan.real": "data", "mesh.fsdp": 1})
    workdir = tmp_path / "run"
    run_train.train(gan, str(workdir), devices=jax.devices()[:1])  # one device: this run's sharding is not the point
    logged = read_metrics(workdir)
    assert [m["step"] for m in logged] == [1, 2]
    assert all(np.isfinite(m[k]) for m in logged for k in ("loss_gan_gen", "loss_gan_cls"))
    assert all(m["grad_norm_disc"] > 0 for m in logged)


# ---------------------------------------------------------------------------- bad input


def _copy_without(root, tmp_path, component):
    dst = str(tmp_path / "broken")
    shutil.copytree(root, dst)
    shutil.rmtree(os.path.join(dst, component))
    return dst


def test_bad_pipeline_and_prompt_inputs_are_reported_before_loading(tiny, tmp_path, monkeypatch):
    root, _ = tiny
    prompts = _prompt_file(tmp_path, [b"a cat"])
    loaded = []
    monkeypatch.setattr("dpdmd_jax.weights.loader.load_state", lambda *a, **k: loaded.append(a) or 1 / 0)

    broken = _copy_without(root, tmp_path, "text_encoder_2")
    with pytest.raises(ConfigError, match="has no text_encoder_2/ folder"):
        setup_lib.build(tiny_config(broken, **{"data.prompt_file": prompts}))

    # A T5 tokenizer with more tokens than the encoder embeds.
    from dpdmd_jax.tools.tiny_pipeline import t5_tokenizer

    shutil.rmtree(broken)
    shutil.copytree(root, broken)
    big = t5_tokenizer()
    big.add_tokens([f"extra{i}" for i in range(100)])
    shutil.rmtree(os.path.join(broken, "tokenizer_3"))
    big.save_pretrained(os.path.join(broken, "tokenizer_3"))
    with pytest.raises(ConfigError, match=r"tokenizer_3/ vs text_encoder_3/: the tokenizer has \d+ tokens"):
        setup_lib.build(tiny_config(broken, **{"data.prompt_file": prompts}))

    empty = _prompt_file(tmp_path, [b"", b"   "])
    with pytest.raises(ConfigError, match="holds no prompts"):
        setup_lib.build(tiny_config(root, **{"data.prompt_file": empty}))
    with pytest.raises(ConfigError, match="needs --config.data.prompt_file"):
        setup_lib.build(tiny_config(root))
    assert not loaded  # every error came before any tensor was read


class _NotATensor:  # a pickled object in a .pt: torch.load(weights_only=True) must refuse it
    pass


def test_import_of_a_pt_student_state_dict_and_its_bad_inputs(tiny, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from dpdmd_jax.weights.safetensors_io import CheckpointError
    from dpdmd_jax.weights.sd3 import load_mmdit
    from dpdmd_jax.weights.torch_import import import_pt

    root, pipe = tiny
    torch.manual_seed(3)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in pipe.transformer.state_dict().items()}
    pt = tmp_path / "student.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, pt)  # as saved from a DDP-wrapped model
    out = import_pt(str(pt), root, str(tmp_path / "student"))
    loaded = StableDiffusion3Pipeline.from_pretrained(out)
    got = loaded.transformer.state_dict()
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    loaded.scheduler.set_timesteps(4)
    np.testing.assert_allclose(loaded.scheduler.sigmas.numpy(), [1.0, 0.8577, 0.6022, 0.0089, 0.0], atol=1e-4)
    model = load_mmdit(out, progress=False)  # our loader reads the imported student
    np.testing.assert_array_equal(np.asarray(model.context_embedder.kernel[...]),
                                  state["context_embedder.weight"].numpy().T)

    bad = dict(state, extra_head=torch.zeros(3))
    bad.pop("proj_out.bias")
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: proj_out\.bias.*unexpected keys: extra_head"):
        import_pt(str(tmp_path / "bad.pt"), root, str(tmp_path / "x"))
    torch.save({"proj_out.bias": torch.zeros(1), "config": _NotATensor()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        import_pt(str(tmp_path / "pickled.pt"), root, str(tmp_path / "x"))
    with pytest.raises(CheckpointError, match="does not exist"):
        import_pt(str(tmp_path / "nothing.pt"), root, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")
