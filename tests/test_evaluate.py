"""`dpdmd_jax.evaluate`: the diversity metric against an independent implementation; CLIP / DINO
diversity and the CLIP score of a sample folder against transformers' towers; the toy's metrics
from a toy sample folder; missing and corrupt PNGs reported, skipped, counted."""

from __future__ import annotations

import itertools
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from configs import toy as toy_config
from dpdmd_jax import evaluate as evaluate_lib
from dpdmd_jax import sample as sample_lib
from dpdmd_jax.config import override
from dpdmd_jax.eval import preprocess
from dpdmd_jax.eval.diversity import clip_score, diversity, prompt_diversity


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


@pytest.fixture(scope="module")
def toy_samples(tmp_path_factory):
    """A toy sample folder (the tiny VP teacher: random weights, real toy prompts and folder layout)."""
    out = str(tmp_path_factory.mktemp("samples") / "teacher")
    sample_lib.sample(_config(), out, sampler="teacher", seeds=3, per_device_batch=1)
    return out


def test_toy_metrics_come_from_the_pngs_and_bad_pngs_are_counted(toy_samples, tmp_path):
    from dpdmd_jax.toy.metrics import toy_metrics

    result = evaluate_lib.evaluate([toy_samples])[os.path.basename(toy_samples)]
    names = [f"p{p:05d}_s{s:03d}.png" for p in range(6) for s in range(3)]
    images = np.stack([np.asarray(Image.open(os.path.join(toy_samples, "images", n))) for n in names])
    want = toy_metrics(images.astype(np.float32) / 127.5 - 1, np.repeat(np.arange(6), 3), 3)
    for k in ("diversity_layout", "diversity_pixel", "valid", "frechet_layout", "adherence"):
        assert result[k] == pytest.approx(want[k], abs=1e-12), k
    assert result["images"] == 18 and result["missing"] == result["corrupt"] == 0 and result["toy_prompts"] == 6
    with open(os.path.join(toy_samples, "eval.json")) as f:
        assert json.load(f)["diversity_pixel"] == result["diversity_pixel"]

    broken = str(tmp_path / "broken")
    shutil.copytree(toy_samples, broken)
    os.remove(os.path.join(broken, "images", "p00001_s000.png"))
    with open(os.path.join(broken, "images", "p00002_s001.png"), "wb") as f:
        f.write(b"not a png")
    r = evaluate_lib.evaluate([broken])["broken"]
    assert r["missing"] == 1 and r["corrupt"] == 1 and r["images"] == 16 and r["toy_prompts"] == 4

    with pytest.raises(evaluate_lib.EvaluateError, match="no run.json"):
        evaluate_lib.evaluate([str(tmp_path)])
    with pytest.raises(evaluate_lib.EvaluateError, match="2 --names for 1"):
        evaluate_lib.evaluate([toy_samples], ["a", "b"])


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

    r = evaluate_lib.evaluate([toy_samples], clip=towers["clip_dir"], dino=towers["dino_dir"],
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
    z = evaluate_lib.evaluate([same], clip=towers["clip_dir"], dino=towers["dino_dir"], per_device_batch=1)["same"]
    assert z["diversity_clip"] == pytest.approx(0.0, abs=1e-6) and z["diversity_dino"] == pytest.approx(0.0, abs=1e-6)

    both = evaluate_lib.evaluate([toy_samples, same], ["random teacher", "copies"], out=str(tmp_path / "cmp"))
    with open(tmp_path / "cmp" / "comparison.md") as f:
        text = f.read()
    assert "random teacher" in text and "copies" in text and "diversity_pixel" in text
    assert both["copies"]["diversity_pixel"] == pytest.approx(0.0, abs=1e-12)


def toy_config_prompt(p: int) -> str:
    from dpdmd_jax.toy import data as toy_data

    return toy_data.CLASS_NAMES[p]


def test_the_trainers_toy_metrics_are_evaluates_numbers(tmp_path):
    """The toy_metrics evaluator samples through `dpdmd_jax.sample` and reads its numbers back with
    `dpdmd_jax.evaluate`: evaluating its folders again gives the summary exactly. The main job's
    DMD baseline (`compare_with_dmd`) is a plain-DMD run in workdir/dmd_baseline whose student row
    sits beside the DP-DMD student's in comparison.md, against the teacher row measured once."""
    from dpdmd_jax.distill import trainer

    toy = dict(type="toy_metrics", every=0, seeds_per_prompt=3, repeats=1)
    c = _config(num_rounds=1, evals={"toy": toy}, compare_with_dmd=True)
    summary = trainer.train_with_baseline(c, str(tmp_path))
    with open(tmp_path / "summary.json") as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    base_dir = tmp_path / trainer.BASELINE_DIR
    with open(base_dir / "summary.json") as f:
        baseline = json.load(f)
    with open(base_dir / "config.json") as f:
        assert json.load(f)["distill"]["lambda_div"] == 0.0
    assert summary["dmd_baseline"] == baseline["student"] != summary["student"]
    assert baseline["teacher"] == summary["teacher"] and not (base_dir / "eval" / "teacher").exists()
    table = (tmp_path / "comparison.md").read_text().splitlines()
    for name, row in (("| teacher", summary["teacher"]), ("| DMD", baseline["student"]),
                      ("| DP-DMD (K = 2)", summary["student"])):
        line = next(x for x in table if x.startswith(name))
        assert f"{row['diversity_layout']:.3f}" in line and f"{row['frechet_layout']:.3f}" in line
    folders = [str(tmp_path / "eval" / "teacher"), str(tmp_path / "eval" / "student_1")]
    again = evaluate_lib.evaluate(folders, ["teacher", "student"])
    for who in ("teacher", "student"):
        for k in ("diversity_layout", "diversity_pixel", "spread_size", "adherence", "valid", "frechet_layout"):
            assert summary[who][k] == again[who][k], (who, k)
    assert summary["student"]["nfe"] == 4 and summary["teacher"]["nfe"] == 8 and summary["student"]["images"] == 18
