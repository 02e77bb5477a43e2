"""`dpdmd_jax.evaluate` without towers: the diversity metric against an independent implementation;
the toy's metrics from a toy sample folder, missing and corrupt PNGs reported, skipped, counted; the
toy's FID-T and Vendi on its detected layouts against the teacher folder of the call, a
--fid_reference folder or none; FID's exact low-rank form against `eval.fid`; every bad input of the
new metrics one line, before any model loads; the towers' preprocessing follows the folder or the
image size. (CLIP / DINO / Inception / PickScore towers against their references:
tests/parity/test_evaluate_towers.py; the trainer's toy metrics are evaluate's numbers:
tests/integration/test_evaluate_run.py.)"""

from __future__ import annotations

import itertools
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from configs import toy as toy_config
from dpdmd_jax.eval import fid, metrics, vendi
from dpdmd_jax.eval import folder as eval_folder
from dpdmd_jax.run import sample as run_sample
from dpdmd_jax.config import override
from dpdmd_jax.eval import preprocess
from dpdmd_jax.diversity import clip_score, diversity, prompt_diversity
from dpdmd_jax.toy import data as toy_data
from dpdmd_jax.toy import metrics as toy_metrics


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
    # Alone, the teacher's folder is its own FID reference: Vendi, but no FID-T; every tower metric is
    # named with the flag it needs.
    assert result["computed"] == ["toy_metrics", "vendi_layout"]
    assert result["not_computed"] == {
        "diversity_clip": eval_folder.NO_CLIP, "vendi_clip": eval_folder.NO_CLIP, "diversity_dino": eval_folder.NO_DINO,
        "vendi_dino": eval_folder.NO_DINO, "clip_score": eval_folder.NO_CLIP_SCORE,
        "vendi_inception": metrics.NO_INCEPTION, "fid_t": metrics.NO_INCEPTION, "pickscore": metrics.NO_PICKSCORE,
        "hpsv2": metrics.NO_HPSV2, "fid_t_layout": metrics.IS_REFERENCE}
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


def _as_student(teacher: str, dst, seed: int = 0) -> str:
    """A copy of the toy sample folder `teacher` as a student's (run.json's sampler), its PNGs replaced
    by clean toy renders of each prompt's class (real layouts for the detector)."""
    shutil.copytree(teacher, dst)
    for name in ("eval.json", "eval.md", metrics.PROMPTS_FILE):
        if os.path.exists(os.path.join(dst, name)):
            os.remove(os.path.join(dst, name))
    with open(os.path.join(dst, "run.json")) as f:
        run = json.load(f)
    with open(os.path.join(dst, "run.json"), "w") as f:
        json.dump({**run, "sampler": "student", "nfe": 4}, f)
    batch = toy_data.sample_batch(seed, 18, np.repeat(np.arange(6), 3))["images"]
    for i, (p, s) in enumerate(itertools.product(range(6), range(3))):
        Image.fromarray(np.round((batch[i] + 1) * 127.5).astype(np.uint8)).save(
            os.path.join(dst, "images", f"p{p:05d}_s{s:03d}.png"))
    return str(dst)


def _pngs(folder: str) -> np.ndarray:
    names = [f"p{p:05d}_s{s:03d}.png" for p in range(6) for s in range(3)]
    return np.stack([np.asarray(Image.open(os.path.join(folder, "images", n))) for n in names])


def test_toy_fid_t_and_vendi_on_layouts(toy_samples, tmp_path):
    """The teacher's folder in the call is the FID-T reference of the others; the numbers are the toy
    detector's layouts through toy.metrics' Frechet distance and eval.vendi; a --fid_reference folder
    of plain images gives the same distance named `fid_layout` (not the teacher's samples: not FID-T),
    a statistics file none, with the reason."""
    student = _as_student(toy_samples, tmp_path / "student")
    r = eval_folder.evaluate([student, toy_samples], ["student", "teacher"], out=str(tmp_path / "cmp"))
    det_s, det_t = (toy_metrics.detect(_pngs(f).astype(np.float32) / 127.5 - 1) for f in (student, toy_samples))
    want = toy_metrics.frechet_distance(toy_metrics.layout_of(det_s), toy_metrics.layout_of(det_t))
    s = r["student"]
    assert s["fid_t_layout"] == pytest.approx(want, rel=1e-9) and s["fid_reference"] == toy_samples
    by_prompt = vendi.per_group(toy_metrics.layout_features(det_s), np.repeat(np.arange(6), 3))
    assert s["vendi_layout_per_prompt"] == pytest.approx(by_prompt.mean, rel=1e-9)
    assert s["vendi_layout_folder"] == pytest.approx(vendi.vendi_score(toy_metrics.layout_features(det_s)), rel=1e-9)
    assert s["computed"] == ["toy_metrics", "vendi_layout", "fid_t_layout"]
    assert r["teacher"]["not_computed"]["fid_t_layout"] == metrics.IS_REFERENCE
    assert "vendi_layout_folder" in r["teacher"]
    with open(os.path.join(student, metrics.PROMPTS_FILE)) as f:
        rows = [json.loads(line) for line in f]
    assert [row["prompt"] for row in rows] == list(toy_data.CLASS_NAMES) and rows[0]["seeds"] == [0, 1, 2]
    assert [row["vendi_layout"] for row in rows] == pytest.approx(by_prompt.scores, rel=1e-9)
    assert rows[1]["diversity_pixel"] == pytest.approx(
        prompt_diversity(_pngs(student)[3:6].reshape(3, -1) / 127.5 - 1), rel=1e-6)
    for path in (os.path.join(student, "eval.md"), tmp_path / "cmp" / "comparison.md"):
        with open(path) as f:
            text = f.read()
        assert "| fid_t_layout " in text and "vendi_layout_per_prompt" in text
        assert "nothing about image quality" in text
        assert f"FID reference: {toy_samples} (the teacher's sample folder: FID-T)" in text

    alone = eval_folder.evaluate([student])["student"]
    assert alone["not_computed"]["fid_t_layout"] == metrics.NO_REFERENCE and "vendi_layout_folder" in alone
    plain = tmp_path / "plain"  # the teacher's PNGs as a plain folder of images
    shutil.copytree(os.path.join(toy_samples, "images"), plain)
    named = eval_folder.evaluate([student], fid_reference=str(plain))["student"]
    assert named["fid_layout"] == pytest.approx(want, rel=1e-9) and "fid_t_layout" not in named
    fid.save_stats(tmp_path / "ref.npz", np.zeros(4), np.eye(4))
    stats = eval_folder.evaluate([student], fid_reference=str(tmp_path / "ref.npz"))["student"]
    assert "is a statistics file; the toy's layout distance needs its images" in stats["not_computed"]["fid_layout"]


def test_fid_low_rank_form_equals_eval_fid():
    """Fewer images than features: the exact n x n form equals eval.fid's sqrtm (to its rounding);
    more: eval.fid itself."""
    rng = np.random.default_rng(0)
    for n, d in ((10, 64), (5, 32), (80, 16)):
        f = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.1 + 0.3
        mu, sigma = fid.stats(rng.normal(size=(n + 7, d)) + 0.1)
        assert metrics.frechet_to_stats(f, mu, sigma) == pytest.approx(fid.frechet_distance(*fid.stats(f), mu, sigma),
                                                                       rel=1e-6)
    with pytest.raises(metrics.EvaluateError, match="statistics are of 3 features, the Inception's pool3 of 16"):
        metrics.frechet_to_stats(f, np.zeros(3), np.eye(3))


def test_bad_inputs_of_the_new_metrics_one_line_each_before_any_model_loads(toy_samples, tmp_path, monkeypatch,
                                                                             capsys):
    from safetensors.numpy import save_file

    save_file({"conv.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "other.safetensors"))
    np.savez(tmp_path / "nomu.npz", mean=np.zeros(3), sigma=np.eye(3))
    (tmp_path / "dino").mkdir()
    (tmp_path / "dino" / "config.json").write_text(json.dumps({"architectures": ["Dinov2Model"],
                                                               "model_type": "dinov2"}))
    loads = []
    monkeypatch.setattr(metrics, "Scorers", lambda **kw: loads.append(kw))
    with pytest.raises(eval_folder.EvaluateError) as e:
        eval_folder.evaluate([toy_samples], inception=str(tmp_path / "other.safetensors"),
                             fid_reference=str(tmp_path / "nomu.npz"), save_fid_stats=str(tmp_path / "s.npz"),
                             pickscore=str(tmp_path / "dino"), hpsv2=str(tmp_path / "missing.safetensors"))
    lines = str(e.value).splitlines()
    assert len(lines) == 6 and not loads, lines
    assert "nomu.npz has no mu (keys: ['mean', 'sigma'])" in lines[0]
    assert lines[1].startswith("--inception: ") and "is not pytorch-fid's FID Inception" in lines[1]
    assert "--save_fid_stats writes the statistics of the FID reference's images" in lines[2]
    assert lines[3].startswith("--pickscore: ") and "Dinov2Model" in lines[3]
    assert lines[4] == f"--hpsv2: open_clip checkpoint '{tmp_path / 'missing.safetensors'}' does not exist"
    assert lines[5].startswith("--hpsv2 needs --hpsv2_tokenizer=FOLDER")
    with pytest.raises(eval_folder.EvaluateError, match="--inception: .*missing.safetensors does not exist"):
        eval_folder.evaluate([toy_samples], inception=str(tmp_path / "missing.safetensors"))
    with pytest.raises(eval_folder.EvaluateError, match="--pickscore_processor is the processor of a --pickscore"):
        eval_folder.evaluate([toy_samples], pickscore_processor=str(tmp_path))

    # Missing PNGs are reported before the models load (here: a stand-in that records the call).
    broken = str(tmp_path / "broken")
    shutil.copytree(toy_samples, broken)
    os.remove(os.path.join(broken, "images", "p00001_s000.png"))
    monkeypatch.setattr(metrics, "input_problems", lambda **kw: [])

    def loading(**kw):
        print("loading models")
        raise RuntimeError("stop before computing")

    monkeypatch.setattr(metrics, "Scorers", loading)
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="stop before computing"):
        eval_folder.evaluate([broken], inception="weights.safetensors")
    assert capsys.readouterr().out.splitlines() == [
        f"{broken}: 1 of 18 listed images missing, skipped (e.g. ['p00001_s000.png'])", "loading models"]
