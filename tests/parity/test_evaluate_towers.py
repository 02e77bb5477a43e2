"""`dpdmd_jax.evaluate` with towers: CLIP / DINO diversity and the CLIP score of a sample folder
against transformers' towers, each tower fed at its own resolution as its image processor would;
every metric not computed named with its reason (API and command line). The toy sample folder
(`toy_samples`) is a session fixture of tests/conftest.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dpdmd_jax.eval import folder as eval_folder
from dpdmd_jax.eval import preprocess
from dpdmd_jax.diversity import clip_score, diversity


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """A tiny random CLIPModel (with its tokenizer) and Dinov2Model saved as transformers folders."""
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    from dpdmd_jax.tools.tiny_pipeline import clip_tokenizer

    base = tmp_path_factory.mktemp("towers")
    tok = clip_tokenizer(str(base / "clip"), pad_token="<|endoftext|>")
    tok.save_pretrained(base / "clip")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=len(tok), max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=16)).eval()
    clip.save_pretrained(base / "clip")
    dino = Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=224, patch_size=32)).eval()
    dino.save_pretrained(base / "dino")
    return dict(clip=clip, dino=dino, clip_dir=str(base / "clip"), dino_dir=str(base / "dino"))


def test_tower_diversity_and_clip_score_match_transformers(toy_samples, towers, tmp_path):
    from transformers import CLIPTokenizer

    r = eval_folder.evaluate([toy_samples], clip=towers["clip_dir"], dino=towers["dino_dir"],
                              per_device_batch=1)[os.path.basename(toy_samples)]
    names = [f"p{p:05d}_s{s:03d}.png" for p in range(6) for s in range(3)]
    images = np.stack([np.asarray(Image.open(os.path.join(toy_samples, "images", n))) for n in names])
    to_torch = lambda x: torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():  # the reference towers on our (separately tested) preprocessing
        clip_in, dino_in = to_torch(preprocess.clip_preprocess(images)), to_torch(preprocess.dinov2_preprocess(images))
        vision = towers["clip"].vision_model(pixel_values=clip_in)
        cls = vision.last_hidden_state[:, 0].numpy()
        image_embeds = towers["clip"].visual_projection(vision.pooler_output).numpy()
        dino = towers["dino"](pixel_values=dino_in).pooler_output.numpy()
        tok = CLIPTokenizer.from_pretrained(towers["clip_dir"])
        ids = tok([toy_config_prompt(p) for p in range(6)], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        text = towers["clip"].text_projection(towers["clip"].text_model(input_ids=ids).pooler_output).numpy()
    assert r["diversity_clip"] == pytest.approx(diversity(cls.reshape(6, 3, -1)), rel=1e-5)
    assert r["diversity_dino"] == pytest.approx(diversity(dino.reshape(6, 3, -1)), rel=1e-5)
    assert r["clip_score"] == pytest.approx(clip_score(image_embeds, np.repeat(text, 3, 0)), rel=1e-5)

    # Identical images: diversity 0 in both feature spaces.
    same = str(tmp_path / "same")
    shutil.copytree(toy_samples, same)
    for n in names:
        shutil.copyfile(os.path.join(toy_samples, "images", "p00000_s000.png"), os.path.join(same, "images", n))
    z = eval_folder.evaluate([same], clip=towers["clip_dir"], dino=towers["dino_dir"], per_device_batch=1)["same"]
    assert z["diversity_clip"] == pytest.approx(0.0, abs=1e-6) and z["diversity_dino"] == pytest.approx(0.0, abs=1e-6)

    both = eval_folder.evaluate([toy_samples, same], ["random teacher", "copies"], out=str(tmp_path / "cmp"))
    with open(tmp_path / "cmp" / "comparison.md") as f:
        text = f.read()
    assert "random teacher" in text and "copies" in text and "diversity_pixel" in text
    assert both["copies"]["diversity_pixel"] == pytest.approx(0.0, abs=1e-12)


def toy_config_prompt(p: int) -> str:
    from dpdmd_jax.toy import data as toy_data

    return toy_data.CLASS_NAMES[p]


def _as_pipeline_samples(toy_samples: str, dst) -> str:
    """The toy folder relabelled as text-to-image samples (run.json's data_kind "prompts", as a
    pipeline's are): the evaluator decides what it can compute from data_kind and the towers."""
    shutil.copytree(toy_samples, dst)
    for name in ("eval.json", "eval.md"):
        if os.path.exists(os.path.join(dst, name)):
            os.remove(os.path.join(dst, name))
    with open(os.path.join(dst, "run.json")) as f:
        run = json.load(f)
    with open(os.path.join(dst, "run.json"), "w") as f:
        json.dump({**run, "data_kind": "prompts", "backbone": "mmdit"}, f)
    return str(dst)


def test_pipeline_samples_name_each_metric_not_computed_and_why(toy_samples, towers, tmp_path, capsys):
    pipe = _as_pipeline_samples(toy_samples, tmp_path / "pipe")
    # No tower for text-to-image samples: the tower-free pixel diversity only, and each tower metric
    # named with the flag it needs, from the API and the command line (exit 0: something was computed).
    from dpdmd_jax.diversity import diversity

    bare = eval_folder.evaluate([pipe])["pipe"]
    assert bare["computed"] == ["diversity_pixel"]
    d = eval_folder.read_folder(pipe)
    by_hand = diversity([np.stack(ims).reshape(len(ims), -1) / 127.5 - 1.0 for ims in d["images"].values()])
    assert bare["diversity_pixel"] == pytest.approx(by_hand, rel=1e-6) and 0.0 < by_hand
    assert set(bare["not_computed"]) == {"diversity_clip", "diversity_dino", "clip_score"}
    proc = subprocess.run([sys.executable, "-m", "dpdmd_jax.evaluate", f"--samples={pipe}"], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pipe: metrics computed: diversity_pixel" in proc.stdout
    assert "diversity_dino: not computed: no --dino tower given" in proc.stdout

    # A DINO tower only: diversity_dino is computed, the CLIP metrics are named with the flag they need,
    # in the printed output, eval.json and eval.md.
    capsys.readouterr()
    r = eval_folder.evaluate([pipe], dino=towers["dino_dir"], per_device_batch=1)["pipe"]
    printed = capsys.readouterr().out
    assert r["computed"] == ["diversity_pixel", "diversity_dino"] and 0.0 < r["diversity_dino"]
    assert "diversity_clip" not in r
    assert r["not_computed"] == {"diversity_clip": eval_folder.NO_CLIP, "clip_score": eval_folder.NO_CLIP_SCORE}
    assert "pipe: metrics computed: diversity_pixel, diversity_dino" in printed
    assert "diversity_clip: not computed: no --clip tower given (a transformers CLIP folder)" in printed
    with open(os.path.join(pipe, "eval.json")) as f:
        assert json.load(f)["not_computed"] == r["not_computed"]
    with open(os.path.join(pipe, "eval.md")) as f:
        assert "clip_score: not computed: no --clip tower given" in f.read()

    # A tower, but no prompt with two readable images: nothing computed, said per metric, then an error.
    single = _as_pipeline_samples(toy_samples, tmp_path / "single")
    for p in range(6):
        for s in (1, 2):
            os.remove(os.path.join(single, "images", f"p{p:05d}_s{s:03d}.png"))
    with pytest.raises(eval_folder.EvaluateError, match="no metric was computed for any folder"):
        eval_folder.evaluate([single], dino=towers["dino_dir"], per_device_batch=1)
    with open(os.path.join(single, "eval.json")) as f:
        written = json.load(f)
    assert written["computed"] == [] and written["missing"] == 12
    assert written["not_computed"]["diversity_dino"] == "no prompt has 2 or more readable images"


def test_towers_see_images_at_their_own_resolution(toy_samples, tmp_path):
    """A CLIP vision tower made for 48 px (no preprocessor_config.json: its image_size decides) and a
    DINOv2 tower whose preprocessor_config.json says shortest side 64, crop 56: the features equal
    the transformers towers' on what the transformers image processors make of the same PNGs."""
    from transformers import (BitImageProcessorPil, CLIPImageProcessorPil, CLIPVisionConfig,
                              CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model)
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    torch.manual_seed(1)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=48,
        patch_size=16, projection_dim=16)).eval()
    clip.save_pretrained(tmp_path / "clip")
    dino = Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=56, patch_size=14)).eval()
    dino.save_pretrained(tmp_path / "dino")
    dino_processor = BitImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                          image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)
    dino_processor.save_pretrained(tmp_path / "dino")

    folder = _as_pipeline_samples(toy_samples, tmp_path / "pipe")
    r = eval_folder.evaluate([folder], clip=str(tmp_path / "clip"), dino=str(tmp_path / "dino"),
                              per_device_batch=1)["pipe"]
    names = [f"p{p:05d}_s{s:03d}.png" for p in range(6) for s in range(3)]
    images = [np.asarray(Image.open(os.path.join(folder, "images", n)).convert("RGB")) for n in names]
    clip_processor = CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    with torch.no_grad():
        clip_in = clip_processor(images=images, return_tensors="pt").pixel_values
        dino_processor = BitImageProcessorPil.from_pretrained(tmp_path / "dino")  # as saved in the folder
        dino_in = dino_processor(images=images, return_tensors="pt").pixel_values
        cls = clip.vision_model(pixel_values=clip_in).last_hidden_state[:, 0].numpy()
        pooled = dino(pixel_values=dino_in).pooler_output.numpy()
    assert tuple(clip_in.shape[-2:]) == (48, 48) and tuple(dino_in.shape[-2:]) == (56, 56)
    assert r["diversity_clip"] == pytest.approx(diversity(cls.reshape(6, 3, -1)), rel=1e-5)
    assert r["diversity_dino"] == pytest.approx(diversity(pooled.reshape(6, 3, -1)), rel=1e-5)
    assert r["computed"] == ["diversity_pixel", "diversity_clip", "diversity_dino"]
    assert "vision tower only" in r["not_computed"]["clip_score"]
