"""What every family's text encoder shares: frozen encoders split into graph + sharded params,
one jitted program that encodes a batch (or a round's M + 1 batches in turn), host-side
tokenization per process, and the conditioning of "" computed once.

A family (`sd3.py`, `sdxl.py`) defines `tokenize_each(prompts) -> {encoder: Tokenized}`,
`_tokens(that) -> its token pytree` and `_encode_batch(params, tokens) -> Cond` (the pipeline's
assembly); everything else is here. Tokenizing logs, once per prompt, a warning that names each
prompt a tokenizer truncated and how many tokens each encoder dropped (sampling repeats a prompt
per seed and training per epoch: counting rows would count images, not prompts).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.parallel.multihost import SyncedJit
from dpdmd_jax.text import tokenizers as tok_lib
from dpdmd_jax.weights import loader
from dpdmd_jax.weights.pipeline import component_problems
from dpdmd_jax.weights.safetensors_io import CheckpointError
from dpdmd_jax.weights.clip import load_clip_text
from dpdmd_jax.weights.t5 import load_t5_encoder

NAMED_PROMPTS = 20  # truncated prompts named per encoder, then no more warnings


class TextEncoder:
    def __init__(self, tokenizers: dict[str, Any], encoders: dict[str, nnx.Module], mesh: Mesh):
        self.tokenizers = tokenizers
        self.mesh = mesh
        split = {name: nnx.split(m) for name, m in encoders.items()}
        self.graphdefs = {name: g for name, (g, _) in split.items()}
        self.params = {name: s for name, (_, s) in split.items()}
        name = type(self).__name__
        self._encode = SyncedJit(self._encode_impl, f"encode_{name}")
        self._encode_empty = SyncedJit(self._encode_batch, f"encode_empty_{name}",
                                       out_shardings=mesh_lib.replicated(mesh))
        self._empty = None
        self._warned: set[str] = set()  # prompts whose truncation was already reported

    # ------------------------------------------------------------------ per family
    def tokenize_each(self, prompts: Sequence[str]) -> dict[str, tok_lib.Tokenized]:
        """Each encoder's tokenization of `prompts`, by encoder name."""
        raise NotImplementedError

    def _tokens(self, each: dict[str, tok_lib.Tokenized]) -> Any:
        """The family's token-id pytree from `tokenize_each`'s output."""
        raise NotImplementedError

    def _encode_batch(self, params: dict, tokens: Any) -> Any:
        """Token ids [B, L] -> the family's conditioning [B, ...] (pure, under jit)."""
        raise NotImplementedError

    def run(self, params: dict, name: str, ids: jax.Array) -> Any:
        """Encoder `name` on token ids, inside `_encode_batch`."""
        return nnx.merge(self.graphdefs[name], params[name])(ids)

    # ------------------------------------------------------------------ shared
    def tokenize(self, prompts: Sequence[str]) -> tuple[Any, np.ndarray]:
        """(token-id pytree of [B, L] int32 arrays, [B] bool: truncated by any tokenizer); warns
        about the prompts truncated for the first time (`warn_truncated`)."""
        each = self.tokenize_each(prompts)
        self.warn_truncated(prompts, each)
        truncated = np.logical_or.reduce([t.truncated for t in each.values()])
        return self._tokens(each), truncated

    def warn_truncated(self, prompts: Sequence[str], each: dict[str, tok_lib.Tokenized]) -> None:
        """Logs one warning naming the prompts of this batch that were truncated and that no
        earlier batch reported, with the tokens each encoder dropped; after NAMED_PROMPTS prompts,
        no more (training reads a large prompt set many times: the log would fill with them)."""
        left = NAMED_PROMPTS - len(self._warned)
        if left <= 0:
            return
        found = {p: what for p, what in tok_lib.truncations(prompts, each).items() if p not in self._warned}
        if not found:
            return
        self._warned.update(list(found)[:left])
        message = tok_lib.truncation_warning(found, listed=left)
        if len(self._warned) >= NAMED_PROMPTS:
            message += f"\n  ({NAMED_PROMPTS} truncated prompts named; later ones are truncated without a warning)"
        logging.warning("%s", message)

    def _encode_impl(self, params: dict, tokens: Any) -> Any:
        if jax.tree.leaves(tokens)[0].ndim == 2:
            cond, batch_axis = self._encode_batch(params, tokens), 0
        else:  # [R, B, L]: a round's M + 1 batches, one after the other (one batch's activations live)
            cond, batch_axis = jax.lax.map(lambda t: self._encode_batch(params, t), tokens), 1
        lead = [None] * batch_axis
        spec = lambda x: PartitionSpec(*lead, mesh_lib.BATCH_AXES, *([None] * (x.ndim - batch_axis - 1)))
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec(x))), cond)

    def encode_tokens(self, tokens: Any) -> Any:
        """Global token arrays [B, L] or [R, B, L] (batch axis sharded) -> conditioning, same leading shape."""
        return self._encode(self.params, tokens)

    def encode(self, prompts: Sequence[str]) -> Any:
        """Prompts -> conditioning of host arrays, on every process (the whole mesh encodes them): for
        sampling, sample grids and embedding caches. Every process passes the same prompts."""
        tokens, _ = self.tokenize(prompts)  # names the truncated prompts, once each
        b = len(prompts)
        pad = -b % mesh_lib.batch_divisor(self.mesh)  # rows repeated to fill the mesh, then dropped
        padded = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], pad, 0)]), tokens)
        cond = self.encode_tokens(jax.tree.map(lambda x: mesh_lib.global_batch(self.mesh, x), padded))
        return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True)[:b], cond)

    def empty(self) -> Any:
        """The conditioning of "" [1, ...], replicated; computed once (the unconditional branch)."""
        if self._empty is None:
            tokens, _ = self.tokenize([""])
            self._empty = self._encode_empty(self.params, tokens)
        return self._empty


# ---------------------------------------------------------------------------- pipeline components


@dataclasses.dataclass(frozen=True)
class Component:
    """One encoder of a pipeline: our name, its folder and its tokenizer's, the classes its
    config.json may name, and the tokenizer kind ("clip" | "t5")."""

    name: str
    encoder: str
    tokenizer: str
    classes: tuple[str, ...]
    kind: str = "clip"


def check_components(root: str, components: Sequence[Component]) -> list[str]:
    """Cheap checks (config files and tokenizers only, no weights) of a pipeline's text side:
    every folder present, every config of the right class, every tokenizer fits its encoder."""
    problems = component_problems(root, [f for c in components for f in (c.encoder, c.tokenizer)])
    if problems:
        return problems
    for c in components:
        try:
            raw = loader.read_folder_config(os.path.join(root, c.encoder), c.classes, c.encoder)
            tokenizer = tok_lib.load_tokenizer(os.path.join(root, c.tokenizer), c.kind)
        except Exception as e:  # CheckpointError, or a tokenizer file the library cannot parse
            problems.append(str(e))
            continue
        eos = raw.get("eos_token_id") if c.kind == "clip" else None
        problems += tok_lib.check_vocabulary(tokenizer, raw["vocab_size"], f"{c.tokenizer}/ vs {c.encoder}/", eos)
    return problems


def load_components(root: str, components: Sequence[Component], mesh: Mesh, rules, *, dtype: str,
                    progress: bool) -> tuple[dict[str, Any], dict[str, nnx.Module]]:
    """(tokenizers, encoders) of `components`, each encoder sharded on `mesh`; checked first."""
    problems = check_components(root, components)
    if problems:
        raise CheckpointError("\n  - ".join([f"{root}: the text encoders cannot be loaded:", *problems]))
    tokenizers, encoders = {}, {}
    for c in components:
        tokenizers[c.name] = tok_lib.load_tokenizer(os.path.join(root, c.tokenizer), c.kind)
        load = load_t5_encoder if c.kind == "t5" else load_clip_text
        encoders[c.name] = load(os.path.join(root, c.encoder), dtype=dtype, mesh=mesh, rules=rules,
                                progress=progress)
    return tokenizers, encoders
