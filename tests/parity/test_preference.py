"""Preference scores (`dpdmd_jax.eval.preference`) against their references on tiny random models:
PickScore against transformers' CLIPModel as PickScore's README computes it, HPSv2 against open_clip
as HPSv2's img_score.py computes it (open_clip state dict -> .pt -> `convert_pt` -> our loader; our
tokenization against open_clip's tokenizer; HPSv2's preprocessing against torch), and one clear
error per loader for the wrong kind of checkpoint."""

from __future__ import annotations

import gzip
import json
import math
import os

import jax
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dpdmd_jax.eval import preference
from dpdmd_jax.eval.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from dpdmd_jax.weights.open_clip import convert_pt, load_open_clip, tower_configs
from dpdmd_jax.weights.safetensors_io import CheckpointError
from tests.torch_helpers import rel_err

# A tiny open_clip CLIP in open_clip's model-config format (the real vocabulary: the ids come from
# open_clip's own BPE). Non-default mlp_ratio / head_width so the config reading is exercised.
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "head_width": 8, "patch_size": 14, "mlp_ratio": 3.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 24, "heads": 4, "layers": 2},
}
PROMPTS = ["A photo of an astronaut riding a horse", "Curly “quotes” &amp; it’s  spaced\tout",
           "ÉCOLE naïve café, emoji 🚀 and ｆｕｌｌwidth", " ".join(f"w{i}" for i in range(90))]  # the last truncated


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter plus noise, so zero / one initialised ones (biases, LayerNorms) matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def write_open_clip_tokenizer(folder: str) -> None:
    """OpenAI CLIP's vocab.json / merges.txt rebuilt from the BPE file open_clip ships (as its
    SimpleTokenizer builds its vocabulary), saved as a transformers CLIPTokenizer folder."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), pad_token="!",
                  model_max_length=77).save_pretrained(folder)


def hpsv2_reference_pixels(images: np.ndarray, size: int, antialias: bool = True) -> torch.Tensor:
    """HPSv2's preprocess_val (its vendored open_clip `image_transform(resize_longest_max=True)`):
    ToTensor, ResizeMaxSize(size) (torchvision's tensor resize = torch interpolate, then F.pad with
    0), Normalize; written with torch's functions, which are what torchvision calls for tensors."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    nh, nw = round(h * scale), round(w * scale)
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=antialias)
    ph, pw = size - nh, size - nw
    x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=0.0)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    return (x - mean) / std


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    """A tiny random open_clip CLIP saved as HPSv2 saves its checkpoints, converted, and loaded."""
    base = tmp_path_factory.mktemp("hps")
    torch.manual_seed(0)
    ref = perturbed(open_clip.model.CLIP(TINY_OPEN_CLIP["embed_dim"], TINY_OPEN_CLIP["vision_cfg"],
                                         TINY_OPEN_CLIP["text_cfg"]), seed=1)
    with torch.no_grad():
        ref.logit_scale.fill_(math.log(57.0))  # not the init value: HPSv2 must not use it
    torch.save({"state_dict": ref.state_dict()}, base / "hps.pt")  # HPSv2's layout
    with open(base / "tiny.json", "w") as f:
        json.dump(TINY_OPEN_CLIP, f)
    convert_pt(base / "hps.pt", base / "hps.safetensors", base / "tiny.json")
    write_open_clip_tokenizer(str(base / "tokenizer"))
    scorer = preference.load_hpsv2(base / "hps.safetensors", base / "tokenizer", config=base / "tiny.json")
    return dict(ref=ref, scorer=scorer, base=base)


def test_hpsv2_matches_open_clip(hps):
    ref, scorer = hps["ref"], hps["scorer"]
    # Our token ids are open_clip's (cleaning, BPE, truncation keeping the EOT, padding with 0).
    ids = scorer.token_ids(PROMPTS)
    ref_ids = open_clip.get_tokenizer("ViT-H-14")(PROMPTS)
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    assert ids[0, -1] == 0 and ids[-1, -1] == 49407  # padded with 0; the long prompt ends with its EOT

    # 30 x 56 images: the longest side goes to 28, the short one to 15, padded 6 + 7 rows.
    images = np.random.default_rng(0).integers(0, 256, (len(PROMPTS), 30, 56, 3), dtype=np.uint8)
    pixels = hpsv2_reference_pixels(images, 28)
    ours = preference.hpsv2_preprocess(images, 28)
    assert rel_err(ours, nhwc(pixels)) < 1e-6
    plain = preference.hpsv2_preprocess(images, 28, antialias=False)  # torchvision < 0.17's resize
    assert rel_err(plain, nhwc(hpsv2_reference_pixels(images, 28, antialias=False))) < 1e-6
    assert rel_err(plain, ours) > 1e-2  # the two resizes do differ

    with torch.no_grad():  # img_score.py: diagonal(image_features @ text_features.T), normalised, no scale
        img_ref = ref.encode_image(pixels, normalize=True).numpy()
        txt_ref = ref.encode_text(ref_ids, normalize=True).numpy()
    img, txt = jax.jit(lambda m, x, t: (m.image_embeds(x), m.text_embeds(t)))(scorer.model, nhwc(pixels), ids)
    errors = dict(image=rel_err(img, img_ref), text=rel_err(txt, txt_ref))
    score = scorer.score(images, PROMPTS)
    errors["score"] = rel_err(score, np.sum(img_ref * txt_ref, -1))
    print("HPSv2 rel errors:", errors)
    assert max(errors.values()) < 1e-5, errors


def test_open_clip_loader_refuses_the_wrong_checkpoint(hps, pickscore, tmp_path):
    base = hps["base"]
    with pytest.raises(CheckpointError, match=r"PyTorch pickle.*python -m dpdmd_jax.weights.open_clip --pt="):
        load_open_clip(base / "hps.pt", base / "tiny.json")
    with pytest.raises(CheckpointError, match="transformers model folder.*load_pickscore"):
        load_open_clip(pickscore["folder"])
    with pytest.raises(CheckpointError, match="transformers CLIP checkpoint.*load_pickscore"):
        load_open_clip(os.path.join(pickscore["folder"], "model.safetensors"))
    # The right layout with the wrong config: every mismatch named, with the file and the config.
    wrong = {**TINY_OPEN_CLIP, "text_cfg": {**TINY_OPEN_CLIP["text_cfg"], "width": 32, "layers": 3}}
    with pytest.raises(CheckpointError, match=r"hps.safetensors does not match the open_clip config \(dict\): "
                                              r"missing keys: transformer.resblocks.2.*shape mismatches: ln_final"):
        load_open_clip(base / "hps.safetensors", wrong)
    with pytest.raises(CheckpointError, match=r"hps.pt does not match"):  # convert_pt checks before writing
        convert_pt(base / "hps.pt", tmp_path / "out.safetensors", wrong)
    assert not os.path.exists(tmp_path / "out.safetensors")
    with pytest.raises(CheckpointError, match=r"vision_cfg.ls_init_value=0.1"):
        tower_configs({**TINY_OPEN_CLIP, "vision_cfg": {**TINY_OPEN_CLIP["vision_cfg"], "ls_init_value": 0.1}})


# ---------------------------------------------------------------------------- PickScore


@pytest.fixture(scope="module")
def pickscore(tmp_path_factory):
    """A tiny random transformers CLIPModel with its tokenizer and a CLIP image processor config
    (shortest side 32, centre crop 32), as one folder: PickScore_v1's layout plus its processor."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from dpdmd_jax.tools.tiny_pipeline import clip_tokenizer

    folder = str(tmp_path_factory.mktemp("pickscore"))
    tok = clip_tokenizer(folder, pad_token="!")  # laion's ViT-H-14 tokenizer pads with "!" (id 0)
    tok.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    torch.manual_seed(0)
    model = perturbed(CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=len(tok), max_position_embeddings=77, hidden_act="gelu",
                         bos_token_id=0, eos_token_id=2, pad_token_id=1),  # the legacy ids of laion's config
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act="gelu"),
        projection_dim=16)), seed=2)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # PickScore's trained value
    model.save_pretrained(folder)
    return dict(model=model, folder=folder)


def test_pickscore_matches_transformers(pickscore):
    from transformers import CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder, model = pickscore["folder"], pickscore["model"]
    prompts = ["a photo of a red cat", "the dog on the sea at night", "blue house", "a cat and a dog in a house"]
    images = np.random.default_rng(1).integers(0, 256, (len(prompts), 40, 52, 3), dtype=np.uint8)
    processor, tokenizer = CLIPImageProcessorPil.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder)
    with torch.no_grad():  # PickScore's README (padding to the longest prompt, with the attention mask)
        pixels = processor(images=[Image.fromarray(x) for x in images], return_tensors="pt")["pixel_values"]
        text = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(**text).pooler_output
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        ref = (model.logit_scale.exp() * (txt @ img.T)).diagonal().numpy()
    scores = preference.load_pickscore(folder).score(images, prompts)
    print("PickScore rel error:", rel_err(scores, ref))
    assert rel_err(scores, ref) < 1e-5


def test_pickscore_loader_refuses_the_wrong_checkpoint(hps, pickscore, tmp_path):
    with pytest.raises(CheckpointError, match="hps.safetensors is an open_clip checkpoint.*load_hpsv2"):
        preference.load_pickscore(hps["base"] / "hps.safetensors")
    with pytest.raises(CheckpointError, match="hps.pt is a file; PickScore loads a transformers CLIPModel folder"):
        preference.load_pickscore(hps["base"] / "hps.pt")
    text_only = tmp_path / "text"  # a single tower: PickScore needs the whole CLIPModel
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModel"]}))
    with pytest.raises(CheckpointError, match="describes a CLIPTextModel, not a transformers CLIPModel"):
        preference.load_pickscore(text_only)
