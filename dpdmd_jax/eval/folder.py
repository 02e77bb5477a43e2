"""The metrics of sample folders (made by `python -m dpdmd_jax.sample`, `sampling.folder`): the
paper's diversity on CLIP and DINO features, the CLIP score, pixel diversity, and the toy's analytic
metrics. `evaluate` is what `python -m dpdmd_jax.evaluate` runs (its docstring lists the metrics).
Missing or unreadable PNGs are reported, skipped and counted; every metric that could not be
computed is named with the reason.

A folder may be a URI (gs://bucket/...): its files are read and written through `etils.epath`.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from dpdmd_jax.eval import preprocess
from dpdmd_jax.diversity import clip_score, diversity
from dpdmd_jax.models.dino import DINOv3ViTModel
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.run_config import absolute
from dpdmd_jax.sampling.folder import read_png, read_rows
from dpdmd_jax.tables import markdown_table
from dpdmd_jax.text.tokenizers import load_tokenizer, tokenize
from dpdmd_jax.toy import data as toy_data
from dpdmd_jax.toy.metrics import toy_metrics as metrics
from dpdmd_jax.weights.clip import load_clip_text, load_clip_vision, read_raw_config
from dpdmd_jax.weights.dino import load_dino


class EvaluateError(ValueError):
    """Bad evaluation input; the message says what to fix."""


# ---------------------------------------------------------------------------- reading a folder


def read_run(folder: str) -> dict[str, Any]:
    """A sample folder's run.json (what made the samples)."""
    path = epath.Path(folder) / "run.json"
    if not path.is_file():
        raise EvaluateError(f"{folder} has no run.json: is it a folder written by `python -m dpdmd_jax.sample`?")
    return json.loads(path.read_text())


def read_folder(folder: str) -> dict[str, Any]:
    """run.json, the rows of samples.jsonl, and per prompt its readable images (uint8 [H, W, 3]);
    missing and corrupt PNGs are listed, not fatal."""
    run = read_run(folder)
    rows = sorted(read_rows(str(epath.Path(folder) / "samples.jsonl")).values(),
                  key=lambda r: (r["prompt_index"], r["seed"]))
    if not rows:
        raise EvaluateError(f"{folder}/samples.jsonl lists no images")
    images: dict[int, list[np.ndarray]] = defaultdict(list)
    prompts: dict[int, str] = {}
    missing, corrupt, shape = [], [], None
    for r in rows:
        path = epath.Path(folder) / "images" / r["file"]
        prompts[r["prompt_index"]] = r["prompt"]
        if not path.exists():  # one request per image on an object store (a folder here: unreadable below)
            missing.append(r["file"])
            continue
        try:
            x = read_png(str(path))
        except Exception:  # truncated, not a PNG, ...: PIL raises several types
            corrupt.append(r["file"])
            continue
        if shape is None:
            shape = x.shape
        if x.shape != shape:
            corrupt.append(r["file"])
            continue
        images[r["prompt_index"]].append(x)
    for kind, names in (("missing", missing), ("unreadable", corrupt)):
        if names:
            print(f"{folder}: {len(names)} {kind} images skipped (e.g. {names[:3]})")
    return dict(folder=folder, run=run, prompts=prompts, images=dict(images), missing=len(missing),
                corrupt=len(corrupt), rows=len(rows))


# ---------------------------------------------------------------------------- towers


NO_CLIP = "no --clip tower given (a transformers CLIP folder)"
NO_DINO = "no --dino tower given (a transformers Dinov2Model / DINOv3ViTModel folder)"
NO_CLIP_SCORE = "no --clip tower given (a full transformers CLIPModel folder with its tokenizer)"


class Towers:
    """The feature extractors, loaded once, sharded over `mesh`; each call is one jitted program.

    `inputs` holds, per tower, (flag, folder, its preprocessing, its image_size); `no_text` why
    the CLIP score cannot be computed with this --clip folder (None when it can)."""

    def __init__(self, clip: str | None, dino: str | None, mesh, per_device_batch: int = 8):
        self.mesh, self.batch = mesh, per_device_batch * mesh_lib.batch_divisor(mesh)
        self.fns: dict[str, Any] = {}
        self.inputs: dict[str, tuple[str, str, Any, int]] = {}
        self.text = None
        self.no_text: str | None = NO_CLIP_SCORE
        if clip:
            self._add_clip(clip)
        if dino:
            self._add_dino(dino)
        self._rep = mesh_lib.replicated(mesh)

    @staticmethod
    def _preprocessing(flag: str, folder: str, family: str, image_size: int):
        try:
            return preprocess.tower_preprocessing(family, image_size, preprocess.read_processor_config(folder),
                                                  where=os.path.join(folder, preprocess.PROCESSOR_CONFIG))
        except preprocess.PreprocessingError as e:
            raise EvaluateError(f"{flag}={folder}: {e}") from e

    def _add_clip(self, folder: str) -> None:
        vision = load_clip_vision(folder, mesh=self.mesh, progress=False)
        prep = self._preprocessing("--clip", folder, "clip", vision.cfg.image_size)

        def clip_features(model, images):
            out = model(prep(images))
            feats = {"clip": out.last_hidden_state[:, 0]}  # CLS before post_layernorm (the method's feature)
            if out.image_embeds is not None:
                feats["clip_image_embeds"] = out.image_embeds
            return feats

        self.fns["clip"] = (vision, clip_features)
        self.inputs["clip"] = ("--clip", folder, prep, vision.cfg.image_size)
        self.no_text = self._add_clip_text(folder, vision)

    def _add_clip_text(self, folder: str, vision) -> str | None:
        """Loads the text tower and tokenizer of a full CLIPModel folder for the CLIP score; returns
        why it cannot be computed (None when it can)."""
        try:
            read_raw_config(folder)  # a folder with a text tower too: the CLIP score is possible
        except Exception:  # a vision-only folder: read_raw_config refuses its class
            return (f"--clip={folder} is a CLIP vision tower only; the CLIP score needs a full CLIPModel folder "
                    "(both towers, both projections, its tokenizer)")
        if not vision.cfg.with_projection:
            return f"--clip={folder} has no visual projection, which the CLIP score needs"
        try:
            tokenizer = load_tokenizer(folder, "clip")
        except Exception as e:  # CheckpointError, or tokenizer files transformers cannot parse
            return f"--clip={folder} has no usable CLIP tokenizer ({e})"
        self.text = (load_clip_text(folder, mesh=self.mesh, progress=False), tokenizer)
        return None

    def _add_dino(self, folder: str) -> None:
        model = load_dino(folder, mesh=self.mesh, progress=False)
        family = "dinov3" if isinstance(model, DINOv3ViTModel) else "dinov2"
        prep = self._preprocessing("--dino", folder, family, model.cfg.image_size)
        self.fns["dino"] = (model, lambda m, images: {"dino": m(prep(images)).pooler_output})
        self.inputs["dino"] = ("--dino", folder, prep, model.cfg.image_size)

    def describe(self) -> list[str]:
        """One line per tower: what it is fed."""
        return [f"{flag}={folder}: images preprocessed to {prep.describe()}"
                for flag, folder, prep, _ in self.inputs.values()]

    def check_input(self, height: int, width: int) -> None:
        """CLIP's position table is for image_size only (no interpolation, as in transformers)."""
        if "clip" not in self.inputs:
            return
        flag, folder, prep, size = self.inputs["clip"]
        got = prep.output_size(height, width)
        if tuple(got) != (size, size):
            raise EvaluateError(f"{flag}={folder}: {prep.source} turns {height}x{width} images into "
                                f"{got[0]}x{got[1]} pixel values, but the tower takes {size}x{size} (its image_size)")

    def image_features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [N, H, W, 3] -> {feature name: [N, F]} (float64)."""
        self.check_input(*images.shape[1:3])
        out: dict[str, list[np.ndarray]] = defaultdict(list)
        for model, fn in self.fns.values():
            graph, state = nnx.split(model)
            run = jax.jit(lambda st, x, fn=fn, graph=graph: fn(nnx.merge(graph, st), x), out_shardings=self._rep)
            for start in range(0, len(images), self.batch):
                chunk = images[start:start + self.batch]
                padded = np.concatenate([chunk, np.repeat(chunk[:1], self.batch - len(chunk), 0)])
                feats = run(state, mesh_lib.global_batch(self.mesh, padded))
                for k, v in feats.items():
                    out[k].append(np.asarray(v.addressable_data(0), np.float64)[: len(chunk)])
        return {k: np.concatenate(v) for k, v in out.items()}

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        model, tokenizer = self.text
        ids = tokenize(tokenizer, prompts, model.cfg.max_position_embeddings).ids
        return np.asarray(jax.jit(lambda m, i: m(i).text_embeds)(model, ids), np.float64)


# ---------------------------------------------------------------------------- metrics


TOWER_METRICS = ("diversity_clip", "diversity_dino", "clip_score")
TOY_METRICS = "toy_metrics"  # the toy's analytic metrics, as a group (`toy_metrics` below)


def tower_gaps(towers: Towers | None) -> dict[str, str]:
    """{tower metric: why it cannot be computed} for `towers` (None: none given)."""
    fns = towers.fns if towers is not None else {}
    gaps = {}
    if "clip" not in fns:
        gaps["diversity_clip"] = NO_CLIP
    if "dino" not in fns:
        gaps["diversity_dino"] = NO_DINO
    if towers is None or towers.text is None:
        gaps["clip_score"] = NO_CLIP_SCORE if towers is None else towers.no_text
    return {m: gaps[m] for m in TOWER_METRICS if m in gaps}


def evaluate_folder(folder: str, towers: Towers | None = None) -> dict[str, Any]:
    """The metrics of one sample folder (also written to its eval.json / eval.md), with
    `computed` (the metrics it has) and `not_computed` ({metric: why not})."""
    d = read_folder(folder)
    run, images = d["run"], d["images"]
    keep = sorted(p for p, ims in images.items() if len(ims) >= 2)
    result: dict[str, Any] = dict(
        folder=folder, source=run.get("source"), sampler=run.get("sampler"), nfe=run.get("nfe"),
        prompts=len(d["prompts"]), images=sum(len(v) for v in images.values()), missing=d["missing"],
        corrupt=d["corrupt"], prompts_with_2plus=len(keep),
    )
    not_computed = tower_gaps(towers)
    computed = []
    if run.get("data_kind") == "toy":
        toy = toy_metrics(d)
        result.update(toy)
        if toy:
            computed.append(TOY_METRICS)
        else:
            not_computed[TOY_METRICS] = "no prompt has all its seeds' images readable (2 or more seeds needed)"
    if run.get("data_kind") != "toy":  # the toy's metrics include it
        if keep:
            result["diversity_pixel"] = pixel_diversity(d, keep)
            computed.append("diversity_pixel")
        else:
            not_computed["diversity_pixel"] = "no prompt has 2 or more readable images"
    wanted = [m for m in TOWER_METRICS if m not in not_computed]
    if wanted and not keep:
        not_computed.update({m: "no prompt has 2 or more readable images" for m in wanted})
    elif wanted:
        result.update(tower_metrics(d, keep, towers))
        computed += wanted
    result["computed"] = computed
    result["not_computed"] = not_computed
    name = epath.Path(folder).name
    notes = "\n".join(metric_notes({name: result}))
    (epath.Path(folder) / "eval.json").write_text(json.dumps(result, indent=2))
    (epath.Path(folder) / "eval.md").write_text(f"{table({name: result})}\n\n{notes}\n")
    return result


def pixel_diversity(d: dict[str, Any], keep: Sequence[int]) -> float:
    """The paper's diversity on raw pixel vectors in [-1, 1] (the toy's `diversity_pixel`): no tower
    needed, so every folder gets a diversity number; it sees colour and layout, not semantics."""
    return diversity([np.stack(d["images"][p]).reshape(len(d["images"][p]), -1).astype(np.float32) / 127.5 - 1.0
                      for p in keep])


def tower_metrics(d: dict[str, Any], keep: Sequence[int], towers: Towers) -> dict[str, float]:
    """diversity_clip / diversity_dino / clip_score (those `towers` can give) on the prompts `keep`."""
    images = d["images"]
    flat = np.concatenate([np.stack(images[p]) for p in keep])
    feats = towers.image_features(flat)
    bounds = np.cumsum([0] + [len(images[p]) for p in keep])
    out = {}
    for name in ("clip", "dino"):
        if name in feats:
            out[f"diversity_{name}"] = diversity([feats[name][a:b] for a, b in zip(bounds[:-1], bounds[1:])])
    if towers.text is not None and "clip_image_embeds" in feats:
        text = towers.text_embeds([d["prompts"][p] for p in keep])
        per_image = np.repeat(text, np.diff(bounds), axis=0)
        out["clip_score"] = clip_score(feats["clip_image_embeds"], per_image)
    return out


def metric_notes(results: dict[str, dict]) -> list[str]:
    """Per run: which metrics were computed, and each one that was not, with the reason."""
    lines = []
    for name, r in results.items():
        done = ", ".join(r.get("computed", [])) or "none"
        lines.append(f"{name}: metrics computed: {done}")
        lines += [f"  {metric}: not computed: {why}" for metric, why in r.get("not_computed", {}).items()]
    return lines


def toy_metrics(d: dict[str, Any]) -> dict[str, float]:
    """The toy's metrics from the PNGs, on the prompts that have all R seeds."""
    r = max(len(v) for v in d["images"].values())
    full = sorted(p for p, ims in d["images"].items() if len(ims) == r)
    if r < 2 or not full:
        return {}
    images = np.concatenate([np.stack(d["images"][p]) for p in full]).astype(np.float32) / 127.5 - 1.0
    ids = np.repeat([toy_data.class_id(d["prompts"][p]) for p in full], r)
    return {"toy_prompts": len(full), **metrics(images, ids, r)}


COLUMNS = ("nfe", "images", "prompts_with_2plus", "diversity_clip", "diversity_dino", "clip_score",
           "diversity_layout", "diversity_pixel", "spread_cx", "spread_cy", "spread_size", "adherence", "valid",
           "frechet_layout", "missing", "corrupt")


def table(results: dict[str, dict]) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in results.values())]
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    return markdown_table(["run", *cols], [[name, *(fmt(r.get(c)) for c in cols)] for name, r in results.items()])


def evaluate(folders: Sequence[str], names: Sequence[str] | None = None, *, clip: str | None = None,
             dino: str | None = None, out: str | None = None, per_device_batch: int = 8) -> dict[str, dict]:
    """Evaluates every folder; with several, writes comparison.md / .json to `out`.

    Without a tower, text-to-image folders still get `diversity_pixel` (the paper's diversity on raw
    pixel vectors, as the toy's), and the tower metrics are listed as not computed, naming the flag
    each needs. Raises EvaluateError when no metric can be computed for any folder (no prompt with 2
    readable images), once every folder was read (their eval.json / eval.md, with the reasons, are
    written first): an error rather than a notice (exit code 2 from the command line), so scripts
    that chain `evaluate` do not carry on with no numbers."""
    folders = [absolute(f) for f in folders]  # a gs:// URI as it is
    names = list(names) if names else [epath.Path(f).name for f in folders]
    if len(names) != len(folders):
        raise EvaluateError(f"{len(names)} --names for {len(folders)} --samples folders")
    for f in folders:
        if not epath.Path(f).is_dir():
            raise EvaluateError(f"--samples: {f} is not a folder")
    for what, path in (("--clip", clip), ("--dino", dino)):  # model folders: local inputs, read by the loaders
        if path and not os.path.isfile(os.path.join(path, "config.json")):
            raise EvaluateError(f"{what}={path} is not a transformers model folder (no config.json)")
    for f in folders:
        read_run(f)  # every folder is a sample folder, before any image is read
    towers = None
    if clip or dino:
        towers = Towers(clip, dino, mesh_lib.make_mesh(fsdp=-1), per_device_batch)
        print("\n".join(towers.describe()))
    results = {n: evaluate_folder(f, towers) for n, f in zip(names, folders)}
    text = table(results)
    notes = metric_notes(results)
    print(text + "\n\n" + "\n".join(notes))
    if len(folders) > 1:
        out_dir = epath.Path(absolute(out or folders[0]))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "comparison.md").write_text(text + "\n\n" + "\n".join(notes) + "\n")
        (out_dir / "comparison.json").write_text(json.dumps(results, indent=2))
    if not any(r["computed"] for r in results.values()):
        reasons = sorted({f"{m} ({why})" for r in results.values() for m, why in r["not_computed"].items()})
        raise EvaluateError(f"no metric was computed for any folder: {'; '.join(reasons)}")
    return results
