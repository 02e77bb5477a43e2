"""LoRA export the way users load it (`weights.lora`): our adapters (random, B nonzero, scale != 1,
scanned and unscanned) written by `save_lora` load with `StableDiffusion3Pipeline` /
`StableDiffusionXLPipeline.load_lora_weights`, and the diffusers denoiser then computes what ours does
(fp32, rel err <= 1e-5); `load_lora` gives the adapters back, reads a LoRA diffusers itself saved
(lora_alpha != r in its metadata), and names what is wrong with a LoRA that does not fit the config;
`merge_adapters` (export --merged) computes the adapted model; the LoRA folder's recipe runs as written."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from configs import sd35 as sd35_config
from configs import sdxl as sdxl_config
from dpdmd_jax import backbones
from dpdmd_jax.backbones.sd3 import SD3Backbone
from dpdmd_jax.config import override
from dpdmd_jax.diffusion.flow import flow_match_sigmas
from dpdmd_jax.distill import adapters
from dpdmd_jax.weights import lora as lora_io
from dpdmd_jax.weights.safetensors_io import CheckpointError, read_header
from dpdmd_jax.weights.sd3 import load_mmdit
from dpdmd_jax.weights.unet import load_unet
from tests.torch_helpers import rel_err, save_random_sd3, save_random_unet, sd3_torch_kwargs, unet_torch_forward

RANK, ALPHA = 4, 3.0  # scale 0.75: a file that dropped or doubled it would not match
SCALE = ALPHA / RANK

# Denoisers whose scanned stacks hold several layers (the tiny pipelines' hold one): SD3 with a dual-
# attention first layer (groups 0 | 1-2 | 3, the last context-pre-only), SDXL's UNet with two
# transformer blocks per attention. Their text sides are the tiny pipelines' (the LoRA adapts the
# denoiser only).
SD3_ARCH = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=16,
                pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")
UNET_ARCH = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16,),
                 down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                 transformer_layers_per_block=2, attention_head_dim=2, cross_attention_dim=32,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 8, norm_num_groups=4)

_sd3_forward = jax.jit(lambda m, x: m(x["latents"], x["timesteps"], x["context"], x["pooled"]))
_unet_forward = jax.jit(lambda m, x: m(x["sample"], x["timesteps"], x["context"], x["text_embeds"], x["time_ids"]))


def _sd3_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return dict(latents=rng.standard_normal((2, 8, 8, 16), np.float32), timesteps=np.array([999.0, 250.5], np.float32),
                context=rng.standard_normal((2, 7, 32), np.float32), pooled=rng.standard_normal((2, 16), np.float32))


def _unet_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    return dict(sample=rng.standard_normal((2, 8, 8, 4), np.float32), timesteps=np.array([999.0, 250.5], np.float32),
                context=rng.standard_normal((2, 5, 32), np.float32),
                text_embeds=rng.standard_normal((2, 8), np.float32),
                time_ids=np.array([[512, 512, 0, 0, 512, 512]] * 2, np.float32))


def _sd3_torch(transformer, x) -> np.ndarray:
    with torch.no_grad():
        return transformer(**sd3_torch_kwargs(x))[0].numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory, tiny_sd3_pipeline):
    """The SD3 case: the transformer folder, the tiny pipeline's other components, the config and backbone."""
    folder = tmp_path_factory.mktemp("sd3_transformer")
    save_random_sd3(folder, **SD3_ARCH)
    c = override(sd35_config.get_config("tiny"), {"model.source": str(folder), "student.lora.rank": RANK,
                                                  "student.lora.alpha": ALPHA})
    return dict(backbone="mmdit", folder=str(folder), c=c, net=backbones.get(c), x=_sd3_inputs(),
                components=tiny_sd3_pipeline[1].components, load=load_mmdit, forward=_sd3_forward)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from dpdmd_jax.tools.tiny_pipeline import build_sdxl_pipeline

    folder = tmp_path_factory.mktemp("sdxl_unet")
    save_random_unet(folder, UNET_ARCH)
    c = override(sdxl_config.get_config("tiny"), {"model.source": str(folder), "student.lora.rank": RANK,
                                                  "student.lora.alpha": ALPHA})
    components = build_sdxl_pipeline(str(tmp_path_factory.mktemp("sdxl_vocab"))).components
    return dict(backbone="unet", folder=str(folder), c=c, net=backbones.get(c), x=_unet_inputs(),
                components=components, load=load_unet, forward=_unet_forward)


def _random_adapters(abstract: nnx.State, seed: int) -> nnx.State:
    """A in +-1/sqrt(in) (peft's range), B nonzero: each layer's update (scale A B) is of the kernel's
    own size. Drawn with numpy (a jax draw per leaf shape would compile one program each)."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        if path[-1] == "a":
            return rng.uniform(-1, 1, shape).astype(np.float32) / np.sqrt(shape[-2])
        return 0.5 * rng.standard_normal(shape).astype(np.float32)

    return nnx.from_flat_state([(p, v.replace(draw(p, v.get_value().shape))) for p, v in nnx.to_flat_state(abstract)])


def _ours(case, scan: bool, c=None, seed: int = 0):
    """(our fp32 model's graphdef, params, buffers; adapted graphdef; random adapters) for `case`."""
    model = case["load"](case["folder"], scan_layers=scan, progress=False)
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    g, abstract = adapters.adapted(c or case["c"], "student", case["net"], graphdef, params, buffers)
    return model, graphdef, params, buffers, g, abstract, _random_adapters(abstract, seed)


def _pipeline(case):
    """The pipeline users load a LoRA with, its denoiser the case's (fresh: a LoRA stays in it)."""
    import diffusers

    if case["backbone"] == "mmdit":
        denoiser = dict(transformer=diffusers.SD3Transformer2DModel.from_pretrained(case["folder"]))
        return diffusers.StableDiffusion3Pipeline(**{**case["components"], **denoiser})
    denoiser = dict(unet=diffusers.UNet2DConditionModel.from_pretrained(case["folder"]))
    return diffusers.StableDiffusionXLPipeline(**{**case["components"], **denoiser})


def _theirs(case, pipe) -> np.ndarray:
    if case["backbone"] == "mmdit":
        return _sd3_torch(pipe.transformer.eval(), case["x"])
    return unet_torch_forward(pipe.unet.eval(), case["x"])


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("name", ["sd3", "sdxl"])
def test_saved_lora_loads_in_the_diffusers_pipeline_and_round_trips(request, name, scan, tmp_path):
    case = request.getfixturevalue(name)
    model, graphdef, params, buffers, g, abstract, ours_ad = _ours(case, scan)
    assert any(np.ndim(v.get_value()) == 3 for _, v in nnx.to_flat_state(ours_ad)) == scan  # stacked adapters
    x, forward = case["x"], case["forward"]
    base = np.asarray(forward(model, x))
    ours = np.asarray(forward(nnx.merge(g, ours_ad, params, buffers), x))

    file = lora_io.save_lora(case["backbone"], model.cfg, ours_ad, tmp_path / "lora", SCALE)
    keys = list(read_header(file))
    prefix = lora_io.COMPONENTS[case["backbone"]]
    assert keys and all(k.startswith(prefix + ".") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    pipe = _pipeline(case)
    assert rel_err(_theirs(case, pipe), base) <= 1e-5  # the same base before the LoRA
    pipe.load_lora_weights(str(tmp_path / "lora"))
    theirs = _theirs(case, pipe)
    print(f"{name} scan={scan}: rel err {rel_err(ours, theirs):.2e} (the LoRA moved it {rel_err(ours, base):.2f})")
    assert rel_err(ours, base) > 0.05  # the adapters matter
    assert rel_err(ours, theirs) <= 1e-5

    # Round trip: the same adapters back (B unfolded by the run's scale) and the same prediction.
    loaded = lora_io.load_lora(tmp_path / "lora", case["backbone"], model.cfg, abstract, SCALE)
    flat, back = dict(nnx.to_flat_state(ours_ad)), dict(nnx.to_flat_state(loaded))
    assert set(flat) == set(back)
    for path, var in flat.items():
        np.testing.assert_allclose(np.asarray(back[path].get_value()), np.asarray(var.get_value()), rtol=1e-6,
                                   atol=1e-7, err_msg=str(path))
    assert rel_err(np.asarray(forward(nnx.merge(g, loaded, params, buffers), x)), ours) <= 1e-6

    # export --merged: W + scale A B in the kernels computes the adapted model.
    merged = lora_io.merge_adapters(params, ours_ad, SCALE)
    assert rel_err(np.asarray(forward(nnx.merge(graphdef, merged, buffers), x)), ours) <= 1e-5


def test_a_lora_diffusers_saved_with_its_alpha_loads_for_any_config_alpha(sd3, tmp_path):
    """A LoRA made by peft / diffusers (lora_alpha = 2 r, recorded in the file's adapter metadata, as
    diffusers' training scripts save it): `load_lora` under configs of another alpha gives adapters
    that compute the diffusers model's output."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = SD3Transformer2DModel.from_pretrained(sd3["folder"]).eval()
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(SD3Backbone.lora_targets))
    transformer.add_adapter(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    StableDiffusion3Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                               transformer_lora_adapter_metadata=config.to_dict())
    theirs = _sd3_torch(transformer, sd3["x"])
    for alpha in (ALPHA, 1.0):
        c = override(sd35_config.get_config("tiny"), {"model.source": sd3["folder"], "student.lora.rank": RANK,
                                                      "student.lora.alpha": alpha})
        model, _, params, buffers, g, abstract, _ = _ours(sd3, scan=True, c=c)
        loaded = lora_io.load_lora(tmp_path, "mmdit", model.cfg, abstract, alpha / RANK)
        ours = np.asarray(_sd3_forward(nnx.merge(g, loaded, params, buffers), sd3["x"]))
        assert rel_err(ours, theirs) <= 1e-5, alpha


def test_a_lora_that_does_not_fit_the_config_is_named_with_its_fix(sd3, tmp_path):
    model, *_, abstract, ours_ad = _ours(sd3, scan=True)
    folder = tmp_path / "lora"
    lora_io.save_lora("mmdit", model.cfg, ours_ad, folder, SCALE)
    with pytest.raises(FileExistsError):
        lora_io.save_lora("mmdit", model.cfg, ours_ad, folder, SCALE)

    def template(**lora_settings):
        c = override(sd35_config.get_config("tiny"), {"model.source": sd3["folder"], "student.lora.rank": RANK,
                                                      **{f"student.lora.{k}": v for k, v in lora_settings.items()}})
        return _ours(sd3, scan=True, c=c)[5]

    load = lambda path, t: lora_io.load_lora(path, "mmdit", model.cfg, t, SCALE)
    with pytest.raises(CheckpointError, match=r"rank 4, the config's student.lora.rank is 2: set "
                                              r"--config.student.lora.rank=4"):
        load(folder, template(rank=2))
    with pytest.raises(CheckpointError, match=r"adapts layers the targets do not select \(.*attn.to_k.*"
                                              r"Set --config.student.lora.targets to the layers it adapts"):
        load(folder, template(targets=("to_q",)))
    narrow = template(targets=("to_q", "to_v"))
    lora_io.save_lora("mmdit", model.cfg, _random_adapters(narrow, 1), tmp_path / "narrow", SCALE)
    with pytest.raises(CheckpointError, match=r"no adapters for layers the config's student.lora.targets select "
                                              r"\(.*ff.net.2.*transformer_blocks.N.attn.to_q"):
        load(tmp_path / "narrow", abstract)
    with pytest.raises(CheckpointError, match="no pytorch_lora_weights.safetensors"):
        load(tmp_path, abstract)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(f"{folder}/{lora_io.WEIGHTS_NAME}")
    save_file({**tensors, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
               np.zeros((RANK, 16), np.float32)}, str(tmp_path / "te.safetensors"))
    with pytest.raises(CheckpointError, match="also adapts text_encoder .* adapts the transformer only"):
        load(tmp_path / "te.safetensors", abstract)


def test_the_lora_folder_recipe_runs_as_written(tiny_sd3_pipeline, tmp_path):
    """`write_lora_folder` over a pipeline (the tiny SD3's own transformer): the `load` lines of its
    dpdmd_student.json, executed as they stand, give a pipeline whose transformer is our adapted one
    and whose scheduler steps the student's grid, and its sampling line makes an image."""
    root = tiny_sd3_pipeline[0]
    c = override(sd35_config.get_config("tiny"), {"model.source": root, "student.lora.rank": RANK,
                                                  "student.lora.alpha": ALPHA})
    case = dict(c=c, net=backbones.get(c), folder=root, load=load_mmdit)
    model, _, params, buffers, g, _, ours_ad = _ours(case, scan=True)
    grid = flow_match_sigmas(4, 3.0)
    save = lambda folder: lora_io.save_lora("mmdit", model.cfg, ours_ad, folder, SCALE)
    out = lora_io.write_lora_folder("mmdit", str(tmp_path / "export"), save, grid, dict(source="test"), root)
    with open(f"{out}/dpdmd_student.json") as f:
        meta = json.load(f)
    assert meta["call"] == dict(num_inference_steps=4, guidance_scale=1.0) and meta["teacher"] == root
    recipe = {"prompt": "a red cat"}
    exec("\n".join(meta["load"][:-1]), recipe)  # imports, pipeline, LoRA, scheduler
    pipe = recipe["pipe"]
    x = _sd3_inputs()  # the tiny pipeline's transformer takes SD3_ARCH's inputs
    ours = np.asarray(_sd3_forward(nnx.merge(g, ours_ad, params, buffers), x))
    assert rel_err(_sd3_torch(pipe.transformer, x), ours) <= 1e-5
    pipe.scheduler.set_timesteps(4)
    np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), grid, atol=1e-6)
    exec(meta["load"][-1], recipe)
    assert recipe["image"].size == (16, 16)
    with pytest.raises(lora_io.ExportError, match="exists; exports never overwrite"):
        lora_io.write_lora_folder("mmdit", out, save, grid, {}, root)
