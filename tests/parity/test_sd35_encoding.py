"""The SD3.5 text path on a tiny random pipeline (`dpdmd_jax.tools.tiny_pipeline`): prompt embeddings
equal `StableDiffusion3Pipeline.encode_prompt` (fp32, sharded over 8 devices, bf16). (Training on it:
tests/integration/test_sd35_pipeline.py.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from dpdmd_jax.parallel.mesh import make_mesh
from dpdmd_jax.text.sd3 import load_sd3_text_encoder
from tests.torch_helpers import rel_err

LONG = "a red house at night on the sea " * 40  # > 77 CLIP and > 256 T5 tokens
PROMPTS = ["the cat on the sea", "photo of a blue house", LONG, "dog", "the red dog in the house",
           "a cat and a dog", "blue sea at night", "photo of the sea"]


@pytest.fixture(scope="module")
def tiny(tiny_sd3_pipeline):
    return tiny_sd3_pipeline  # (root, diffusers pipeline): a session fixture of tests/conftest.py


def test_prompt_embeddings_match_encode_prompt(tiny):
    root, pipe = tiny
    with torch.no_grad():
        ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                                              max_sequence_length=256)
    single = load_sd3_text_encoder(root, make_mesh(fsdp=1, devices=jax.devices()[:1]), dtype="float32",
                                   progress=False)
    ours = single.encode(PROMPTS)
    empty = jax.device_get(single.empty())
    for name, a, b in [("context", ours.context, ctx), ("pooled", ours.pooled, pooled),
                       ("negative context", np.broadcast_to(empty.context, neg_ctx.shape), neg_ctx),
                       ("negative pooled", np.broadcast_to(empty.pooled, neg_pooled.shape), neg_pooled)]:
        err = rel_err(a, b.numpy())
        print(f"{name}: rel {err:.2e}, max abs {np.abs(np.asarray(a) - b.numpy()).max():.2e}")
        assert np.shape(a) == tuple(b.shape) and err <= 1e-5, name
    # the long prompt was truncated by every tokenizer, as the pipeline does; the others were not
    _, truncated = single.tokenize(PROMPTS)
    assert truncated.tolist() == [p == LONG for p in PROMPTS]

    # Sharded over 8 devices (every encoder weight split on fsdp) gives the same embeddings.
    sharded = load_sd3_text_encoder(root, make_mesh(fsdp=8), dtype="float32", progress=False)
    specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(sharded.params) if leaf.ndim == 2}
    assert any("fsdp" in s for s in specs)
    got = sharded.encode(PROMPTS)
    np.testing.assert_allclose(got.context, ours.context, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.pooled, ours.pooled, rtol=1e-6, atol=1e-6)

    bf16 = load_sd3_text_encoder(root, make_mesh(fsdp=1, devices=jax.devices()[:1]), dtype="bfloat16",
                                 progress=False).encode(PROMPTS)
    assert np.isfinite(bf16.context).all() and rel_err(bf16.context, ctx.numpy()) <= 3e-2
