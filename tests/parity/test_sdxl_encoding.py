"""The SDXL text path on tiny random pipelines (`dpdmd_jax.tools.tiny_pipeline --family=sdxl`): prompt
embeddings equal `StableDiffusionXLPipeline.encode_prompt` (zero and encoded negatives, time ids).
(Training on it: tests/integration/test_sdxl_pipeline.py.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from dpdmd_jax.parallel.mesh import make_mesh
from dpdmd_jax.text.sdxl import load_sdxl_text_encoder
from dpdmd_jax.tools.tiny_pipeline import make_tiny_pipeline
from tests.torch_helpers import rel_err


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
