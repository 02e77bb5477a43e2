"""`dpdmd_jax.evaluate` without towers: the diversity metric against an independent implementation;
the toy's metrics from a toy sample folder, missing and corrupt PNGs reported, skipped, counted; the
towers' preprocessing follows the folder or the image size. (CLIP / DINO towers against
transformers': tests/parity/test_evaluate_towers.py; the trainer's toy metrics are evaluate's
numbers: tests/integration/test_evaluate_run.py.)"""

from __future__ import annotations

import itertools
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from configs import toy as toy_config
from dpdmd_jax.eval import folder as eval_folder
from dpdmd_jax.run import sample as run_sample
from dpdmd_jax.config import override
from dpdmd_jax.eval import preprocess
from dpdmd_jax.diversity import clip_score, diversity, prompt_diversity


def _loop_diversity(features) -> float:
    """1 - mean cosine over pairs i < j, per prompt, averaged: written independently, with loops."""
    per_prompt = []
    for f in features:
        cos = [float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in itertools.combinations(f, 2)]
        per_prompt.append(1.0 - sum(cos) / len(cos))
    return sum(per_prompt) / len(per_prompt)


def test_diversity_matches_an_independent_implementation():
    rng = np.random.default_rng(0)
    fixed = rng.normal(size=(5, 9, 16)) + 0.5  # a shared component, as image features have
    assert diversity(fixed) == pytest.approx(_loop_diversity(fixed), abs=1e-12)
    ragged = [rng.normal(size=(r, 8)) for r in (2, 3, 7)]
    assert diversity(ragged) == pytest.approx(_loop_diversity(ragged), abs=1e-12)
    assert prompt_diversity(np.tile(rng.normal(size=(1, 8)), (4, 1))) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match=">= 2 images"):
        prompt_diversity(rng.normal(size=(1, 8)))
    img, txt = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    cos = [np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(img, txt)]
    assert clip_score(img, txt) == pytest.approx(np.mean([100 * max(c, 0) for c in cos]))


def _config(**overrides):
    return override(toy_config.get_config("smoke"), {"backbone": "tiny_vp", "distill.target": "denoise",
                                                      "evals": {}, "data.latent_size": (16, 16), **overrides})


def make_toy_samples(tmp_path_factory) -> str:
    """A toy sample folder (the tiny VP teacher: random weights, real toy prompts and folder layout)."""
    out = str(tmp_path_factory.mktemp("samples") / "teacher")
    run_sample.sample(_config(), out, sampler="teacher", seeds=3, per_device_batch=1)
    return out


def test_toy_metrics_come_from_the_pngs_and_bad_pngs_are_counted(toy_samples, tmp_path):
    from dpdmd_jax.toy.metrics import toy_metrics

    result = eval_folder.evaluate([toy_samples])[os.path.basename(toy_samples)]
    names = [f"p{p:05d}_s{s:03d}.png" for p in range(6) for s in range(3)]
    images = np.stack([np.asarray(Image.open(os.path.join(toy_samples, "images", n))) for n in names])
    want = toy_metrics(images.astype(np.float32) / 127.5 - 1, np.repeat(np.arange(6), 3), 3)
    for k in ("diversity_layout", "diversity_pixel", "valid", "frechet_layout", "adherence"):
        assert result[k] == pytest.approx(want[k], abs=1e-12), k
    assert result["images"] == 18 and result["missing"] == result["corrupt"] == 0 and result["toy_prompts"] == 6
    assert result["computed"] == ["toy_metrics"]  # and the tower metrics are named, with the missing flag
    assert result["not_computed"] == {"diversity_clip": eval_folder.NO_CLIP, "diversity_dino": eval_folder.NO_DINO,
                                      "clip_score": eval_folder.NO_CLIP_SCORE}
    with open(os.path.join(toy_samples, "eval.json")) as f:
        assert json.load(f)["diversity_pixel"] == result["diversity_pixel"]

    broken = str(tmp_path / "broken")
    shutil.copytree(toy_samples, broken)
    os.remove(os.path.join(broken, "images", "p00001_s000.png"))
    with open(os.path.join(broken, "images", "p00002_s001.png"), "wb") as f:
        f.write(b"not a png")
    r = eval_folder.evaluate([broken])["broken"]
    assert r["missing"] == 1 and r["corrupt"] == 1 and r["images"] == 16 and r["toy_prompts"] == 4

    with pytest.raises(eval_folder.EvaluateError, match="no run.json"):
        eval_folder.evaluate([str(tmp_path)])
    with pytest.raises(eval_folder.EvaluateError, match="2 --names for 1"):
        eval_folder.evaluate([toy_samples], ["a", "b"])


def test_tower_preprocessing_follows_the_folder_or_the_image_size():
    """Without preprocessor_config.json a tower is fed at its image_size (DINOv2 with the published
    256 : 224 crop ratio, so a 224 px tower keeps the published preprocessing); a config's sizes
    win; options the evaluator does not implement are refused by name."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, 90, 120, 3), dtype=np.uint8)
    tp = preprocess.tower_preprocessing
    assert tp("clip", 336).output_size(1024, 768) == (336, 336)
    assert tp("dinov3", 96).output_size(300, 200) == (96, 96)
    assert tp("dinov2", 518).output_size(300, 200) == (518, 518)
    np.testing.assert_array_equal(tp("dinov2", 224)(image), preprocess.dinov2_preprocess(image))
    np.testing.assert_array_equal(tp("clip", 224)(image), preprocess.clip_preprocess(image))
    np.testing.assert_allclose(tp("dinov3", 224)(image), preprocess.dinov3_preprocess(image), rtol=0, atol=1e-6)
    published_clip = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                      "image_mean": list(preprocess.OPENAI_CLIP_MEAN), "image_std": list(preprocess.OPENAI_CLIP_STD),
                      "resample": 3, "size": 224}  # openai/clip-vit-large-patch14's preprocessor_config.json
    np.testing.assert_array_equal(tp("clip", 224, published_clip)(image), preprocess.clip_preprocess(image))
    assert tp("dinov2", 518, {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}
              ).output_size(90, 120) == (224, 224)
    with pytest.raises(preprocess.PreprocessingError, match="resample=0"):
        tp("clip", 224, {"resample": 0})
    with pytest.raises(preprocess.PreprocessingError, match="do_normalize=false"):
        tp("dinov2", 224, {"do_normalize": False})
