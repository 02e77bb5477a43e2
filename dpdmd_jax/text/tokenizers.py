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
    lengths: np.ndarray  # [B] int: each prompt's tokens before truncation (special tokens included)
    max_length: int


def tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> Tokenized:
    """Pads to `max_length` and truncates, as `StableDiffusion3Pipeline._get_clip_prompt_embeds` /
    `_get_t5_prompt_embeds` (special tokens added; EOS kept when truncating)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True).input_ids
    lengths = np.array([len(f) for f in tokenizer(list(prompts), add_special_tokens=True).input_ids], np.int64)
    return Tokenized(np.asarray(ids, np.int32), lengths > max_length, lengths, max_length)


# ---------------------------------------------------------------------------- truncation warnings

PROMPT_CHARS = 70  # longer prompts are shown by their beginning and their length


def shorten(prompt: str, limit: int = PROMPT_CHARS) -> str:
    """The prompt quoted, or its first characters and its length when it is longer than `limit`."""
    if len(prompt) <= limit:
        return repr(prompt)
    return f"{prompt[:limit]!r}... ({len(prompt)} characters)"


def truncations(prompts: Sequence[str], each: dict[str, Tokenized]) -> dict[str, str]:
    """{prompt: what each tokenizer that truncated it dropped} for the distinct prompts that some
    tokenizer of `each` ({encoder name: its tokenization of `prompts`}) truncated, in order."""
    out: dict[str, str] = {}
    for i, prompt in enumerate(prompts):
        if prompt in out:
            continue
        parts = [f"{name} kept {t.max_length} of {int(t.lengths[i])} tokens ({int(t.lengths[i]) - t.max_length} "
                 "dropped)" for name, t in each.items() if t.truncated[i]]
        if parts:
            out[prompt] = ", ".join(parts)
    return out


def truncation_warning(found: dict[str, str], listed: int) -> str:
    """The warning for `truncations`' output: one line for each of the first `listed` prompts."""
    n = len(found)
    lines = [f"{n} prompt{'s' if n > 1 else ''} longer than the text encoders' token limits "
             f"{'were' if n > 1 else 'was'} truncated (the end is cut, as the diffusers pipelines do):"]
    lines += [f"  {shorten(p)}: {what}" for p, what in list(found.items())[:listed]]
    if n > listed:
        lines.append(f"  ... and {n - listed} more")
    return "\n".join(lines)
