"""Prompts through the text encoders' (transformers) tokenizers: truncated prompts are named, once
each, with what each encoder dropped. `embedding_cache --help` shows its command lines as written."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """An SD3 text encoder (CLIP-L, bigG, T5 at 32 tokens) of random tiny Flax encoders with the tiny
    pipeline's tokenizers (every word of `tiny_pipeline.WORDS` is one token)."""
    import jax
    from flax import nnx

    from dpdmd_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from dpdmd_jax.models.t5 import T5Config, T5Encoder
    from dpdmd_jax.parallel.mesh import make_mesh
    from dpdmd_jax.text.sd3 import SD3TextEncoder
    from dpdmd_jax.tools.tiny_pipeline import clip_tokenizer, t5_tokenizer

    vocab = tmp_path_factory.mktemp("vocab")
    tokenizers = {"clip_l": clip_tokenizer(str(vocab / "l"), pad_token="<|endoftext|>"),
                  "clip_g": clip_tokenizer(str(vocab / "g"), pad_token="!"), "t5": t5_tokenizer()}

    def clip(tok, seed):
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, projection_dim=8,
                             num_hidden_layers=1, num_attention_heads=2, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, with_projection=True)
        return CLIPTextModel(cfg, rngs=nnx.Rngs(seed))

    t5 = T5Encoder(T5Config(vocab_size=len(tokenizers["t5"]), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                            relative_attention_num_buckets=8, relative_attention_max_distance=20), rngs=nnx.Rngs(2))
    encoders = {"clip_l": clip(tokenizers["clip_l"], 0), "clip_g": clip(tokenizers["clip_g"], 1), "t5": t5}
    return SD3TextEncoder(tokenizers, encoders, make_mesh(fsdp=1, devices=jax.devices()[:1]), max_sequence_length=32)


def test_truncated_prompts_are_named_once_with_what_each_encoder_dropped(tiny_text, caplog):
    short = "the cat on the sea"
    medium = " ".join(["red house"] * 20)  # 40 words: fits CLIP's 77 tokens, not T5's 32
    long = "a blue house at night " * 40  # 200 words: every encoder truncates it
    rows = [short, medium, medium, long, long, long]  # a sampler's rows: each prompt once per seed
    count = {name: {p: len(tok(p).input_ids) for p in (medium, long)} for name, tok in tiny_text.tokenizers.items()}
    assert count["clip_l"][medium] <= 77 < count["clip_l"][long] and count["t5"][medium] > 32

    with caplog.at_level(logging.WARNING):
        cond = tiny_text.encode(rows)
    assert cond.context.shape[0] == 6
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "2 prompts longer than the text encoders' token limits were truncated" in text, text
    lines = text.splitlines()
    medium_line = next(x for x in lines if x.strip().startswith(repr(medium[:70])))
    long_line = next(x for x in lines if x.strip().startswith(repr(long[:70])))
    assert f"({len(long)} characters)" in long_line  # long prompts are shortened
    assert medium_line.endswith(f"t5 kept 32 of {count['t5'][medium]} tokens ({count['t5'][medium] - 32} dropped)")
    assert "clip" not in medium_line.split(": ", 1)[1]  # the CLIP encoders saw all of it
    for name, limit in (("clip_l", 77), ("clip_g", 77), ("t5", 32)):
        assert f"{name} kept {limit} of {count[name][long]} tokens ({count[name][long] - limit} dropped)" in long_line
    assert repr(short) not in text and "of 6" not in text  # prompts, not rows, are counted

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tiny_text.encode([long, short])  # already reported: not again
        _, truncated = tiny_text.tokenize([long, short])
    assert truncated.tolist() == [True, False]
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]

    # A large prompt set (training) is not listed forever: NAMED_PROMPTS prompts, then silence.
    from dpdmd_jax.text.encoder import NAMED_PROMPTS

    many = [f"{w} {long}" for w in ("cat", "dog", "sea", "red", "blue", "night", "house", "photo")]
    many = [f"{a} {b} {long}" for a in many for b in ("the", "a", "of")]  # 24 new long prompts
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tiny_text.tokenize(many)
        tiny_text.tokenize([f"sea sea {long}"])
    (record,) = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    left = NAMED_PROMPTS - 2
    assert record.startswith("24 prompts longer") and f"... and {24 - left} more" in record
    assert len([x for x in record.splitlines() if "clip_l kept 77" in x]) == left
    assert f"({NAMED_PROMPTS} truncated prompts named; later ones are truncated without a warning)" in record


def test_embedding_cache_help_keeps_its_command_lines():
    out = subprocess.run([sys.executable, "-m", "dpdmd_jax.data.embedding_cache", "--help"], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert ("python -m dpdmd_jax.data.embedding_cache --config=configs/sd35.py --out=/data/sd35_cache \\\n"
            "        --config.model.source=/ckpts/sd3.5-medium --config.data.prompt_file=prompts.txt\n") in out.stdout
    assert "--workdir=runs/x \\\n        --config.data.kind=embeddings" in out.stdout
    assert "--out: Cache folder to create" in out.stdout
