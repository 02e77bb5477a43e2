"""Tokenizers of a pipeline's `tokenizer*/` folders (transformers classes, offline), and batch
tokenization that pads and truncates exactly as the diffusers pipelines do."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from dpdmd_jax.weights.safetensors_io import CheckpointError


def load_tokenizer(folder: str, kind: str):
    """`kind` "clip" -> `CLIPTokenizer`, "t5" -> `T5TokenizerFast` (the classes the SD3 / SDXL
    pipelines use), from a local folder."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    cls = {"clip": CLIPTokenizer, "t5": T5TokenizerFast}[kind]
    if not os.path.isdir(folder):
        raise CheckpointError(f"tokenizer folder {folder!r} does not exist")
    try:
        return cls.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{folder}: cannot load a {cls.__name__} ({type(e).__name__}: {e})") from e


def check_vocabulary(tokenizer, vocab_size: int, what: str, eos_token_id: int | None = None) -> list[str]:
    """Problems (one sentence each) when `tokenizer` cannot feed an encoder with `vocab_size`
    embeddings: ids past the table, or an EOS id the encoder does not pool at."""
    problems = []
    if len(tokenizer) > vocab_size:
        problems.append(f"{what}: the tokenizer has {len(tokenizer)} tokens but its text encoder embeds only "
                        f"{vocab_size}; the tokenizer folder belongs to another model")
    if eos_token_id is not None and eos_token_id != 2 and tokenizer.eos_token_id != eos_token_id:
        # (eos_token_id == 2 is CLIP's legacy config: the encoder pools at argmax(ids) instead)
        problems.append(f"{what}: the tokenizer's EOS id is {tokenizer.eos_token_id} but the encoder pools at "
                        f"eos_token_id={eos_token_id}; the tokenizer folder belongs to another model")
    return problems


@dataclasses.dataclass(frozen=True)
class Tokenized:
    ids: np.ndarray  # [B, max_length] int32
    truncated: np.ndarray  # [B] bool: the prompt was longer than max_length tokens


def tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> Tokenized:
    """Pads to `max_length` and truncates, as `StableDiffusion3Pipeline._get_clip_prompt_embeds` /
    `_get_t5_prompt_embeds` (special tokens added; EOS kept when truncating)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True).input_ids
    full = tokenizer(list(prompts), add_special_tokens=True).input_ids
    return Tokenized(np.asarray(ids, np.int32), np.array([len(f) > max_length for f in full]))
