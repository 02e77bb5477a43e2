"""The metrics of sample folders (made by `python -m dpdmd_jax.sample`, `sampling.folder`): the
paper's diversity on CLIP and DINO features, the CLIP score, pixel diversity, the toy's analytic
metrics, and (`eval.metrics`) FID / FID-T, Vendi, PickScore and HPSv2. `evaluate` is what
`python -m dpdmd_jax.evaluate` runs (its docstring lists the metrics and the files written).
Missing PNGs are reported before any model loads, unreadable ones when read; both are skipped and
counted; every metric that could not be computed is named with the reason.

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
from tqdm import tqdm

from dpdmd_jax.eval import fid, metrics, preprocess
from dpdmd_jax.eval.metrics import EvaluateError, Reference
from dpdmd_jax.diversity import clip_score, diversity, prompt_diversity
from dpdmd_jax.models.dino import DINOv3ViTModel
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.run_config import absolute
from dpdmd_jax.sampling.folder import read_png, read_rows
from dpdmd_jax.tables import markdown_table
from dpdmd_jax.text.tokenizers import load_tokenizer, tokenize
from dpdmd_jax.toy import data as toy_data
from dpdmd_jax.toy.metrics import toy_metrics as metrics_of_toy
from dpdmd_jax.weights.clip import load_clip_text, load_clip_vision, read_raw_config
from dpdmd_jax.weights.dino import load_dino


# ---------------------------------------------------------------------------- reading a folder


def read_run(folder: str) -> dict[str, Any]:
    """A sample folder's run.json (what made the samples)."""
    path = epath.Path(folder) / "run.json"
    if not path.is_file():
        raise EvaluateError(f"{folder} has no run.json: is it a folder written by `python -m dpdmd_jax.sample`?")
    return json.loads(path.read_text())


def scan_folder(folder: str) -> dict[str, Any]:
    """run.json, the rows of samples.jsonl (by prompt, then seed) and the listed PNGs that do not
    exist (reported on one line): what a folder holds, before any image is read."""
    run = read_run(folder)
    rows = sorted(read_rows(str(epath.Path(folder) / "samples.jsonl")).values(),
                  key=lambda r: (r["prompt_index"], r["seed"]))
    if not rows:
        raise EvaluateError(f"{folder}/samples.jsonl lists no images")
    # One request per image on an object store; a folder in the image's place is unreadable below.
    missing = [r["file"] for r in rows if not (epath.Path(folder) / "images" / r["file"]).exists()]
    if missing:
        print(f"{folder}: {len(missing)} of {len(rows)} listed images missing, skipped (e.g. {missing[:3]})")
    return dict(run=run, rows=rows, missing=missing)


def read_folder(folder: str, scan: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """run.json, the rows of samples.jsonl, and per prompt its readable images (uint8 [H, W, 3]) and
    their seeds; missing and corrupt PNGs are listed, not fatal. `scan`: `scan_folder`'s, if done."""
    scan = scan or scan_folder(folder)
    skip = set(scan["missing"])
    images: dict[int, list[np.ndarray]] = defaultdict(list)
    seeds: dict[int, list[int]] = defaultdict(list)
    prompts: dict[int, str] = {}
    corrupt, shape = [], None
    for r in tqdm(scan["rows"], desc=f"reading {epath.Path(folder).name}", disable=not progress, leave=False):
        prompts[r["prompt_index"]] = r["prompt"]
        if r["file"] in skip:
            continue
        try:
            x = read_png(str(epath.Path(folder) / "images" / r["file"]))
        except Exception:  # truncated, not a PNG, ...: PIL raises several types
            corrupt.append(r["file"])
            continue
        if shape is None:
            shape = x.shape
        if x.shape != shape:
            corrupt.append(r["file"])
            continue
        images[r["prompt_index"]].append(x)
        seeds[r["prompt_index"]].append(r["seed"])
    if corrupt:
        print(f"{folder}: {len(corrupt)} unreadable images skipped (e.g. {corrupt[:3]})")
    return dict(folder=folder, run=scan["run"], prompts=prompts, images=dict(images), seeds=dict(seeds),
                missing=len(skip), corrupt=len(corrupt), rows=len(scan["rows"]))


def flat_images(d: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(every readable image [N, H, W, 3] uint8, by prompt then seed; its prompt index [N])."""
    ps = sorted(d["images"])
    if not ps:
        return np.zeros((0, 1, 1, 3), np.uint8), np.zeros((0,), np.int64)
    return (np.concatenate([np.stack(d["images"][p]) for p in ps]),
            np.repeat(ps, [len(d["images"][p]) for p in ps]).astype(np.int64))


# ---------------------------------------------------------------------------- towers


NO_CLIP = "no --clip tower given (a transformers CLIP folder)"
NO_DINO = "no --dino tower given (a transformers Dinov2Model / DINOv3ViTModel folder)"
NO_CLIP_SCORE = "no --clip tower given (a full transformers CLIPModel folder with its tokenizer)"


class Towers:
    """The feature extractors, loaded once, sharded over `mesh`; each call is one jitted program.

    `inputs` holds, per tower, (flag, folder, its preprocessing, its image_size); `no_text` why
    the CLIP score cannot be computed with this --clip folder (None when it can)."""

    def __init__(self, clip: str | None, dino: str | None, mesh, per_device_batch: int = 8, progress: bool = False):
        self.mesh, self.batch = mesh, per_device_batch * mesh_lib.batch_divisor(mesh)
        self.progress = progress
        self.fns: dict[str, Any] = {}
        self.inputs: dict[str, tuple[str, str, Any, int]] = {}
        self.text = None
        self.no_text: str | None = NO_CLIP_SCORE
        if clip:
            self._add_clip(clip)
        if dino:
            self._add_dino(dino)
        self._rep = mesh_lib.replicated(mesh)
        self._runs: dict[str, Any] = {}  # tower -> (its jitted program, its state): compiled once for all folders

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
        for tower, (model, fn) in self.fns.items():
            if tower not in self._runs:
                graph, state = nnx.split(model)
                self._runs[tower] = (jax.jit(lambda st, x, fn=fn, graph=graph: fn(nnx.merge(graph, st), x),
                                             out_shardings=self._rep), state)
            run, state = self._runs[tower]
            for start in tqdm(range(0, len(images), self.batch), desc=f"{tower} features", disable=not self.progress,
                              leave=False):
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


TOWER_METRICS = ("diversity_clip", "diversity_dino", "clip_score", "vendi_clip", "vendi_dino")
TOY_METRICS = "toy_metrics"  # the toy's analytic metrics, as a group (`toy_metrics` below)
NO_PAIRS = "no prompt has 2 or more readable images"


def tower_gaps(towers: Towers | None) -> dict[str, str]:
    """{tower metric: why it cannot be computed} for `towers` (None: none given)."""
    fns = towers.fns if towers is not None else {}
    gaps = {}
    if "clip" not in fns:
        gaps["diversity_clip"] = gaps["vendi_clip"] = NO_CLIP
    if "dino" not in fns:
        gaps["diversity_dino"] = gaps["vendi_dino"] = NO_DINO
    if towers is None or towers.text is None:
        gaps["clip_score"] = NO_CLIP_SCORE if towers is None else towers.no_text
    return {m: gaps[m] for m in TOWER_METRICS if m in gaps}


def evaluate_folder(folder: str, towers: Towers | None = None, scorers: metrics.Scorers | None = None,
                    reference: Reference | None = None, *, scan: dict[str, Any] | None = None,
                    progress: bool = False) -> dict[str, Any]:
    """The metrics of one sample folder (also written to its eval.json / eval.md, and per prompt to
    eval_prompts.jsonl), with `computed` (the metrics it has) and `not_computed` ({metric: why
    not}). `reference`: what FID and the toy's layout distance compare against; when it is this
    folder, its statistics are taken from here."""
    d = read_folder(folder, scan, progress)
    run, images = d["run"], d["images"]
    keep = sorted(p for p, ims in images.items() if len(ims) >= 2)
    r = metrics.Results(
        dict(folder=folder, source=run.get("source"), sampler=run.get("sampler"), nfe=run.get("nfe"),
             prompts=len(d["prompts"]), images=sum(len(v) for v in images.values()), missing=d["missing"],
             corrupt=d["corrupt"], prompts_with_2plus=len(keep)),
        {p: dict(prompt_index=p, prompt=d["prompts"][p], seeds=d["seeds"].get(p, []), images=len(images.get(p, [])))
         for p in sorted(d["prompts"])})
    r.not_computed.update(tower_gaps(towers) | metrics.scorer_gaps(scorers, reference))
    toy = run.get("data_kind") == "toy"
    pixel = {p: pixel_prompt_diversity(images[p]) for p in keep}
    if toy:  # its analytic metrics include diversity_pixel (on the prompts with all their seeds)
        toy_values = toy_metrics(d)
        if toy_values:
            r.add(TOY_METRICS, toy_values, {"diversity_pixel": pixel})
        else:
            r.skip(TOY_METRICS, "no prompt has all its seeds' images readable (2 or more seeds needed)")
    elif keep:
        r.add("diversity_pixel", {"diversity_pixel": float(np.mean(list(pixel.values())))}, {"diversity_pixel": pixel})
    else:
        r.skip("diversity_pixel", NO_PAIRS)
    flat, prompt_of = flat_images(d)
    is_reference = reference is not None and metrics.same_folder(reference.path, folder)
    if reference is not None and not is_reference:
        prepare_reference(reference, scorers, toy, progress)
    if toy:
        metrics.toy_layout_metrics(r, flat, prompt_of, keep, reference, is_reference)
    tower_metrics(r, d, flat, prompt_of, keep, towers)
    if scorers is not None and scorers.inception is not None:
        metrics.inception_metrics(r, scorers, flat, prompt_of, keep, reference, is_reference, epath.Path(folder).name)
    if scorers is not None:
        metrics.preference_metrics(r, scorers, flat, [d["prompts"][p] for p in prompt_of], prompt_of)
    result = r.as_dict()
    name = epath.Path(folder).name
    notes = "\n".join(metric_notes({name: result}) + metrics.notes({name: result}, reference))
    (epath.Path(folder) / "eval.json").write_text(json.dumps(result, indent=2))
    (epath.Path(folder) / "eval.md").write_text(f"{table({name: result})}\n\n{notes}\n\nPer prompt: "
                                                f"{metrics.PROMPTS_FILE}\n")
    metrics.write_per_prompt(folder, r.per_prompt)
    return result


def prepare_reference(reference: Reference, scorers: metrics.Scorers | None, toy: bool, progress: bool,
                      scan: dict[str, Any] | None = None) -> None:
    """`metrics.fill_reference`, with a sample folder's readable listed PNGs (read as the evaluated
    folders are; `scan`: its `scan_folder`, if done)."""
    flat = None
    if reference.kind == metrics.SAMPLES and any(metrics.reference_wants(reference, scorers, toy)):
        flat = flat_images(read_folder(reference.path, scan, progress))[0]
    metrics.fill_reference(reference, scorers, toy, flat)


def pixel_prompt_diversity(images: Sequence[np.ndarray]) -> float:
    """The paper's diversity of one prompt's images on raw pixel vectors in [-1, 1] (the toy's
    `diversity_pixel`): no tower needed, so every folder gets a diversity number; it sees colour and
    layout, not semantics."""
    return prompt_diversity(np.stack(images).reshape(len(images), -1).astype(np.float32) / 127.5 - 1.0)


def tower_metrics(r: metrics.Results, d: dict[str, Any], flat: np.ndarray, prompt_of: np.ndarray,
                  keep: Sequence[int], towers: Towers | None) -> None:
    """diversity_clip / diversity_dino / clip_score on the prompts `keep`, and vendi_clip /
    vendi_dino (those `towers` can give)."""
    wanted = [m for m in TOWER_METRICS if m not in r.not_computed]
    if not wanted:
        return
    if not keep:
        for m in wanted:
            r.skip(m, NO_PAIRS)
        return
    feats = towers.image_features(flat)
    mask = np.isin(prompt_of, keep)
    for name in ("clip", "dino"):
        if name in feats:
            per = {p: prompt_diversity(feats[name][prompt_of == p]) for p in keep}
            r.add(f"diversity_{name}", {f"diversity_{name}": diversity([feats[name][prompt_of == p] for p in keep])},
                  {f"diversity_{name}": per})
    if towers.text is not None and "clip_image_embeds" in feats:
        text = towers.text_embeds([d["prompts"][p] for p in keep])
        embeds, by = feats["clip_image_embeds"][mask], prompt_of[mask]
        texts = text[np.searchsorted(keep, by)]  # each image's prompt
        per = {p: clip_score(embeds[by == p], texts[by == p]) for p in keep}
        r.add("clip_score", {"clip_score": clip_score(embeds, texts)}, {"clip_score": per})
    for name in ("clip", "dino"):
        if name in feats:
            values, per = metrics.vendi_metrics(name, feats[name], prompt_of, keep)
            r.add(f"vendi_{name}", values, {f"vendi_{name}": per})


def metric_notes(results: dict[str, dict]) -> list[str]:
    """Per run: which metrics were computed, and those that were not, with the reason."""
    lines = []
    for name, r in results.items():
        done = ", ".join(r.get("computed", [])) or "none"
        lines.append(f"{name}: metrics computed: {done}")
        by_reason = defaultdict(list)  # one line per reason: the metrics one missing flag stops
        for metric, why in r.get("not_computed", {}).items():
            by_reason[why].append(metric)
        lines += [f"  {', '.join(ms)}: not computed: {why}" for why, ms in by_reason.items()]
    return lines


def toy_metrics(d: dict[str, Any]) -> dict[str, float]:
    """The toy's metrics from the PNGs, on the prompts that have all R seeds."""
    r = max(len(v) for v in d["images"].values()) if d["images"] else 0
    full = sorted(p for p, ims in d["images"].items() if len(ims) == r)
    if r < 2 or not full:
        return {}
    images = np.concatenate([np.stack(d["images"][p]) for p in full]).astype(np.float32) / 127.5 - 1.0
    ids = np.repeat([toy_data.class_id(d["prompts"][p]) for p in full], r)
    return {"toy_prompts": len(full), **metrics_of_toy(images, ids, r)}


COLUMNS = ("nfe", "images", "prompts_with_2plus", "diversity_clip", "diversity_dino", "clip_score", "pickscore",
           "hpsv2", "fid", "fid_t", "vendi_clip_per_prompt", "vendi_clip_folder", "vendi_dino_per_prompt",
           "vendi_dino_folder", "vendi_inception_per_prompt", "vendi_inception_folder", "diversity_layout",
           "diversity_pixel", "spread_cx", "spread_cy", "spread_size", "adherence", "valid", "frechet_layout",
           "fid_t_layout", "fid_layout", "vendi_layout_per_prompt", "vendi_layout_folder", "missing", "corrupt")


def table(results: dict[str, dict]) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in results.values())]
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    return markdown_table(["run", *cols], [[name, *(fmt(r.get(c)) for c in cols)] for name, r in results.items()])


def evaluate(folders: Sequence[str], names: Sequence[str] | None = None, *, clip: str | None = None,
             dino: str | None = None, out: str | None = None, per_device_batch: int = 8, inception: str | None = None,
             fid_reference: str | None = None, save_fid_stats: str | None = None, pickscore: str | None = None,
             pickscore_processor: str | None = None, hpsv2: str | None = None, hpsv2_tokenizer: str | None = None,
             progress: bool = True) -> dict[str, dict]:
    """Evaluates every folder; with several, writes comparison.md / .json to `out`.

    Every input is checked first (flags, model files and folders by their headers and configs, the
    FID reference, every folder's run.json and which of its PNGs exist), one line per problem,
    before any model loads. Without a tower, text-to-image folders still get `diversity_pixel` (the
    paper's diversity on raw pixel vectors, as the toy's), and the tower metrics are listed as not
    computed, naming the flag each needs. The FID reference's folder, when it is one of `folders`,
    is evaluated first and gives its statistics. Raises EvaluateError when no metric can be computed
    for any folder (no prompt with 2 readable images), once every folder was read (their eval.json /
    eval.md, with the reasons, are written first): an error rather than a notice (exit code 2 from
    the command line), so scripts that chain `evaluate` do not carry on with no numbers."""
    folders = [absolute(f) for f in folders]  # a gs:// URI as it is
    names = list(names) if names else [epath.Path(f).name for f in folders]
    if len(names) != len(folders):
        raise EvaluateError(f"{len(names)} --names for {len(folders)} --samples folders")
    for f in folders:
        if not epath.Path(f).is_dir():
            raise EvaluateError(f"--samples: {f} is not a folder")
    problems = [f"{what}={path} is not a transformers model folder (no config.json)"
                for what, path in (("--clip", clip), ("--dino", dino))  # model folders: local, read by the loaders
                if path and not os.path.isfile(os.path.join(path, "config.json"))]
    runs = [read_run(f) for f in folders]  # every folder is a sample folder, before any image is read
    try:
        reference = metrics.find_reference(fid_reference and absolute(fid_reference), folders, runs)
    except EvaluateError as e:
        reference, problems = None, [*problems, str(e)]
    problems += metrics.input_problems(inception=inception, reference=reference, save_fid_stats=save_fid_stats,
                                       pickscore=pickscore, pickscore_processor=pickscore_processor, hpsv2=hpsv2,
                                       hpsv2_tokenizer=hpsv2_tokenizer)
    if problems:
        raise EvaluateError("\n".join(problems))
    scans = {f: scan_folder(f) for f in folders}
    is_reference = [reference is not None and metrics.same_folder(reference.path, f) for f in folders]
    outside = reference is not None and not any(is_reference)
    ref_scan = scan_folder(reference.path) if outside and reference.kind == metrics.SAMPLES else None
    mesh = mesh_lib.make_mesh(fsdp=-1) if clip or dino or pickscore or hpsv2 else None
    towers = Towers(clip, dino, mesh, per_device_batch, progress) if clip or dino else None
    scorers = None
    if inception or pickscore or hpsv2:
        scorers = metrics.Scorers(inception=inception, pickscore=pickscore, pickscore_processor=pickscore_processor,
                                  hpsv2=hpsv2, hpsv2_tokenizer=hpsv2_tokenizer, mesh=mesh,
                                  per_device_batch=per_device_batch, progress=progress)
    described = (towers.describe() if towers else []) + (scorers.lines if scorers else [])
    if described:
        print("\n".join(described))
    if outside:
        prepare_reference(reference, scorers, any(run.get("data_kind") == "toy" for run in runs), progress, ref_scan)
    # The reference's folder first: its statistics are the others' reference.
    order = sorted(range(len(folders)), key=lambda i: not is_reference[i])
    done = {names[i]: evaluate_folder(folders[i], towers, scorers, reference, scan=scans[folders[i]], progress=progress)
            for i in order}
    results = {n: done[n] for n in names}
    if save_fid_stats:
        prepare_reference(reference, scorers, False, progress)
        if reference.stats is None:
            raise EvaluateError(f"--save_fid_stats: no statistics of {reference.path}: {reference.problem}")
        fid.save_stats(save_fid_stats, *reference.stats)
        print(f"FID statistics of {reference.path} written to {save_fid_stats}")
    text = table(results) + "\n\n" + "\n".join(metric_notes(results) + metrics.notes(results, reference))
    print(text)
    if len(folders) > 1:
        out_dir = epath.Path(absolute(out or folders[0]))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "comparison.md").write_text(text + "\n")
        (out_dir / "comparison.json").write_text(json.dumps(results, indent=2))
    if not any(r["computed"] for r in results.values()):
        reasons = sorted({f"{m} ({why})" for r in results.values() for m, why in r["not_computed"].items()})
        raise EvaluateError(f"no metric was computed for any folder: {'; '.join(reasons)}")
    return results
