"""`dpdmd_jax.evaluate` with towers: CLIP / DINO diversity and the CLIP score of a sample folder
against transformers' towers, each tower fed at its own resolution as its image processor would;
FID-T, Vendi and PickScore with random weights equal to the eval modules' direct computation; every
metric not computed named with its reason (API and command line). The toy sample folder
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

from dpdmd_jax.eval import fid, metrics, preprocess, vendi
from dpdmd_jax.eval import folder as eval_folder
from dpdmd_jax.diversity import clip_score, diversity
from dpdmd_jax.weights.inception import load_inception


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
    assert set(bare["not_computed"]) == {"diversity_clip", "diversity_dino", "clip_score", "vendi_clip", "vendi_dino",
                                         "vendi_inception", "fid_t", "pickscore", "hpsv2"}
    proc = subprocess.run([sys.executable, "-m", "dpdmd_jax.evaluate", f"--samples={pipe}"], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pipe: metrics computed: diversity_pixel" in proc.stdout
    assert "diversity_dino, vendi_dino: not computed: no --dino tower given" in proc.stdout

    # A DINO tower only: diversity_dino is computed, the CLIP metrics are named with the flag they need,
    # in the printed output, eval.json and eval.md.
    capsys.readouterr()
    r = eval_folder.evaluate([pipe], dino=towers["dino_dir"], per_device_batch=1)["pipe"]
    printed = capsys.readouterr().out
    assert r["computed"] == ["diversity_pixel", "diversity_dino", "vendi_dino"] and 0.0 < r["diversity_dino"]
    assert "diversity_clip" not in r
    no_clip = eval_folder.NO_CLIP
    assert {k: r["not_computed"][k] for k in ("diversity_clip", "vendi_clip", "clip_score")} == {
        "diversity_clip": no_clip, "vendi_clip": no_clip, "clip_score": eval_folder.NO_CLIP_SCORE}
    assert "pipe: metrics computed: diversity_pixel, diversity_dino, vendi_dino" in printed
    assert "diversity_clip, vendi_clip: not computed: no --clip tower given (a transformers CLIP folder)" in printed
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
    assert r["computed"] == ["diversity_pixel", "diversity_clip", "diversity_dino", "vendi_clip", "vendi_dino"]
    assert "vision tower only" in r["not_computed"]["clip_score"]


def _random_inception(path: str) -> str:
    """The FID Inception's state-dict keys with random numbers, as a .safetensors: conv / fc weights
    N(0, 1 / fan_in), BatchNorm scale, shift and statistics perturbed around identity (pool3 features
    stay O(0.01), most of them positive). Drawn in NumPy: initialising the NNX module takes ~1 min on
    this machine's CPUs, pytorch-fid's ~10 s with the conversion."""
    from flax import nnx
    from safetensors.numpy import save_file

    from dpdmd_jax.weights import inception as inception_lib

    rng = np.random.default_rng(0)
    tensors = {}
    for src in inception_lib.key_map(nnx.state(inception_lib.abstract_inception())).values():
        (key,), shape = src.keys, src.shape
        leaf = key.rsplit(".", 1)[1]
        if leaf == "weight" and len(shape) > 1:  # conv (O, I, kh, kw), fc (out, in)
            x = rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))
        elif leaf in ("weight", "running_var"):
            x = rng.uniform(0.5, 1.5, size=shape)
        else:  # bias, running_mean
            x = rng.normal(0.0, 0.1, size=shape)
        tensors[key] = x.astype(np.float32)
    save_file(tensors, path)
    return path


def test_fid_t_vendi_and_pickscore_equal_the_eval_modules(toy_samples, towers, tmp_path):
    """--inception (random weights) / --fid_reference (a teacher sample folder: FID-T) /
    --save_fid_stats / --pickscore (the tiny CLIPModel): evaluate's numbers, per folder and per
    prompt, are the direct computation's on the same PNGs: FID from the eval modules' features and
    `fid.stats`, the Frechet distance written out as the nuclear norm of A_s A_t^T (n < 2048); Vendi
    through `eval.vendi`; PickScore on transformers' CLIPModel as PickScore's README computes it."""
    inception = _random_inception(str(tmp_path / "inception.safetensors"))
    # The teacher's prompt 0, and another run's prompts 2 and 3 as the student's; 2 seeds each.
    teacher, student = (_as_pipeline_samples(toy_samples, tmp_path / name) for name in ("teacher", "student"))
    with open(os.path.join(student, "run.json")) as f:
        run = json.load(f)
    with open(os.path.join(student, "run.json"), "w") as f:
        json.dump({**run, "sampler": "student"}, f)
    keep = {teacher: [(0, 0), (0, 1)], student: [(2, 0), (2, 1), (3, 0), (3, 1)]}
    for folder, images in keep.items():
        with open(os.path.join(folder, "samples.jsonl")) as f:
            rows = [row for row in f if (json.loads(row)["prompt_index"], json.loads(row)["seed"]) in images]
        with open(os.path.join(folder, "samples.jsonl"), "w") as f:
            f.writelines(rows)
    r = eval_folder.evaluate([student], inception=inception, fid_reference=teacher,
                             save_fid_stats=str(tmp_path / "teacher.npz"), pickscore=towers["clip_dir"],
                             per_device_batch=2)["student"]

    png = lambda f, p, s: np.asarray(Image.open(os.path.join(f, "images", f"p{p:05d}_s{s:03d}.png")))
    images = np.stack([png(f, p, s) for f in (student, teacher) for p, s in keep[f]])
    features = fid.InceptionFeatures(load_inception(inception, progress=False), batch_size=2, progress=False)
    f_s, f_t = np.split(features(images).astype(np.float64), [4])
    (mu_s, _), (mu_t, sigma_t) = fid.stats(f_s), fid.stats(f_t)
    saved = fid.load_stats(tmp_path / "teacher.npz")
    np.testing.assert_allclose(saved[0], mu_t, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(saved[1], sigma_t, rtol=1e-6, atol=1e-12)
    a_s, a_t = ((f - f.mean(0)) / np.sqrt(len(f) - 1) for f in (f_s, f_t))
    want = np.sum((mu_s - mu_t) ** 2) + np.sum(a_s ** 2) + np.sum(a_t ** 2) - 2 * np.linalg.svd(a_s @ a_t.T)[1].sum()
    assert r["fid_t"] == pytest.approx(want, rel=1e-5) and r["fid_reference"] == teacher and "fid" not in r
    assert r["vendi_inception_folder"] == pytest.approx(vendi.vendi_score(f_s), rel=1e-5)
    by_prompt = vendi.per_group(f_s, [2, 2, 3, 3])
    assert r["vendi_inception_per_prompt"] == pytest.approx(by_prompt.mean, rel=1e-5)
    # PickScore as its README computes it, on transformers' CLIPModel (our preprocessing: tested separately).
    from transformers import CLIPTokenizer

    ids = CLIPTokenizer.from_pretrained(towers["clip_dir"])([toy_config_prompt(p) for p in (2, 2, 3, 3)],
                                                           padding="max_length", max_length=77, return_tensors="pt")
    model = towers["clip"]
    with torch.no_grad():
        pixels = torch.from_numpy(np.asarray(preprocess.clip_preprocess(images[:4])).transpose(0, 3, 1, 2).copy())
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(input_ids=ids.input_ids).pooler_output)
        cos = torch.nn.functional.cosine_similarity(image, text, dim=-1)
        scores = (model.logit_scale.exp() * cos).numpy().astype(np.float64)
    assert r["pickscore"] == pytest.approx(scores.mean(), rel=1e-5)
    assert {"fid_t", "vendi_inception", "pickscore"} <= set(r["computed"])
    with open(os.path.join(student, metrics.PROMPTS_FILE)) as f:
        rows = [json.loads(line) for line in f]
    assert [row["prompt_index"] for row in rows] == [2, 3] and rows[1]["seeds"] == [0, 1]
    assert rows[1]["pickscore_per_seed"] == pytest.approx(scores[2:], rel=1e-5)
    assert rows[0]["vendi_inception"] == pytest.approx(by_prompt.scores[0], rel=1e-5)
    with open(os.path.join(student, "eval.md")) as f:
        text = f.read()
    assert "| fid_t " in text and f"FID reference: {teacher} (the teacher's sample folder: FID-T)" in text
    assert "fewer than the 2048 Inception features" in text and "random-weight towers" in text
