"""The metrics `python -m dpdmd_jax.evaluate` computes beside the paper's diversity and the CLIP score:
FID / FID-T, the Vendi score on every feature set, PickScore and HPSv2, and for the toy FID-T and
Vendi on its own layout features (no tower). `eval.folder` reads the folders and calls these on
arrays; `input_problems` checks every new input before any model loads.

FID (`eval.fid`, clean-fid's conventions) of a folder's Inception pool3 features against one
reference: `--fid_reference` (a sample folder, a plain folder of images, or a `.npz` of `mu` /
`sigma` as clean-fid and pytorch-fid write them), else the first folder of `--samples` that the
teacher sampler made. The metric is `fid_t` (FID-T, SenseFlow's FID against teacher samples) when
the reference is a sample folder whose run.json says `sampler: teacher`, `fid` otherwise. With n
images and n - 1 < 2048 the folder's covariance S1 = A^T A (A the centred features / sqrt(n - 1))
has rank n - 1, and the trace of sqrt(S1 S_ref) is taken exactly as the sum of the square roots of
the eigenvalues of the n x n matrix A S_ref A^T (the same non-zero spectrum): scipy's 2048 x 2048
`sqrtm` of the singular product gives that number up to its rounding (~1e-7 relative) in tens of
seconds; from n - 1 >= 2048 on it is `fid.frechet_distance` itself. FID from few images is biased
upwards: compare folders at equal numbers of images (the notes say so under 2048).

Vendi (`eval.vendi`, the cosine kernel) on each feature set a run has (`clip`: the CLS features
the diversity uses; `dino`; `inception`: pool3; `layout`: the toy's): `vendi_<f>_per_prompt`, the
mean over prompts with >= 2 readable images of the Vendi score of their seeds, and
`vendi_<f>_folder`, the Vendi score of all the folder's readable images.

Preference (`eval.preference`): `pickscore` = the mean over the readable images of exp(logit_scale)
cos(image, its prompt), `hpsv2` = the mean cos (HPSv2's tables show 100 x it).

The toy (16 x 16 images): the analytic detector (`toy.metrics.detect`) reads each image's layout
(cx, cy, size). `fid_t_layout` (`fid_layout` against a reference that is not the teacher's) is the
Frechet distance, in px^2, of the folder's detected layouts and the reference folder's
(`toy.metrics.frechet_distance`, as `frechet_layout` measures against fresh data), and
`vendi_layout_*` the Vendi score of `toy.metrics.layout_features` (the features of
`diversity_layout`). They say whether the student places objects as the teacher does and how many
distinct layouts its seeds give, nothing about image quality; neither do towers with random weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath
from tqdm import tqdm

from dpdmd_jax.diversity import prompt_diversity
from dpdmd_jax.eval import fid, vendi
from dpdmd_jax.eval.preference import HPSV2, PICKSCORE, PreferenceScorer, load_hpsv2, load_pickscore
from dpdmd_jax.eval.preference import transformers_clip_folder as check_pickscore_folder
from dpdmd_jax.models.inception import FEATURE_DIM
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.toy import metrics as toy_metrics
from dpdmd_jax.weights import inception as inception_lib
from dpdmd_jax.weights import open_clip
from dpdmd_jax.weights.safetensors_io import CheckpointError, read_header

FID, FID_T = "fid", "fid_t"
STATS, SAMPLES, IMAGES = "statistics", "samples", "images"  # the kinds of FID reference
PROMPTS_FILE = "eval_prompts.jsonl"  # per prompt rows, beside eval.json

NO_INCEPTION = "no --inception given (pytorch-fid's FID Inception weights converted to .safetensors)"
NO_PICKSCORE = "no --pickscore given (a transformers CLIPModel folder, e.g. PickScore_v1)"
NO_HPSV2 = "no --hpsv2 given (HPSv2 / HPSv2.1 open_clip weights converted to .safetensors, with --hpsv2_tokenizer)"
NO_REFERENCE = "no --fid_reference given and no teacher sample folder among --samples"
IS_REFERENCE = "this folder is the FID reference"
TOO_FEW = "fewer than 2 readable images"
QUALITY_CAVEAT = ("FID, PickScore, HPSv2 and the tower metrics are only as good as the towers' weights: computed with "
                  "random-weight towers (tests, trials) they say nothing about real image quality")
TOY_CAVEAT = ("{keys}: the toy's detected layouts (cx, cy, size), no tower: whether the layouts are distributed as "
              "the reference's and how many distinct layouts a prompt's seeds give; nothing about image quality")


class EvaluateError(ValueError):
    """Bad evaluation input; the message says what to fix."""


# ---------------------------------------------------------------------------- the FID reference


@dataclasses.dataclass
class Reference:
    """What FID (and the toy's layout distance) compares against; `stats` / `layout` are filled
    once, from a statistics file or from the reference's images (`problem`: why they cannot be)."""

    path: str
    kind: str  # STATS, SAMPLES or IMAGES
    teacher: bool = False  # a sample folder made by the teacher sampler: the metric is FID-T
    stats: tuple[np.ndarray, np.ndarray] | None = None  # Inception (mu, sigma)
    layout: np.ndarray | None = None  # the toy's detected (cx, cy, size) [N, 3], px
    problem: str | None = None

    @property
    def metric(self) -> str:
        return FID_T if self.teacher else FID

    def describe(self) -> str:
        samples = "the teacher's sample folder: FID-T" if self.teacher else "a sample folder"
        what = {STATS: "FID statistics", IMAGES: "a folder of images", SAMPLES: samples}[self.kind]
        return f"{self.path} ({what})"


def same_folder(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def find_reference(fid_reference: str | None, folders: Sequence[str], runs: Sequence[dict]) -> Reference | None:
    """The FID reference: `fid_reference` (a .npz of mu / sigma, a sample folder or a folder of
    images; checked here, before any model loads), else the first of `folders` (with their run.json
    `runs`) that the teacher sampler made, else None."""
    if not fid_reference:
        return next((Reference(f, SAMPLES, teacher=True) for f, run in zip(folders, runs)
                     if run.get("sampler") == "teacher"), None)
    try:
        if fid_reference.endswith(".npz"):
            return Reference(fid_reference, STATS, stats=fid.load_stats(fid_reference))
        root = epath.Path(fid_reference)
        if not root.is_dir():
            raise EvaluateError(f"--fid_reference={fid_reference} is neither a folder (of samples or images) nor a "
                                ".npz of FID statistics (mu, sigma)")
        if (root / "run.json").is_file():
            run = json.loads((root / "run.json").read_text())
            return Reference(fid_reference, SAMPLES, teacher=run.get("sampler") == "teacher")
        fid.image_files(fid_reference)  # has images
        return Reference(fid_reference, IMAGES)
    except fid.FIDError as e:
        raise EvaluateError(f"--fid_reference: {e}") from e


def reference_wants(reference: Reference, scorers: Scorers | None, toy: bool) -> tuple[bool, bool]:
    """(Inception statistics, toy layouts): what a folder needs of `reference` that it lacks."""
    if reference.kind == STATS or reference.problem:
        return False, False
    return (scorers is not None and scorers.inception is not None and reference.stats is None,
            toy and reference.layout is None)


def fill_reference(reference: Reference, scorers: Scorers | None, toy: bool, images: np.ndarray | None) -> None:
    """Fills what `reference_wants` from the reference's images, once: `images` (a sample folder's
    readable images, uint8 [N, H, W, 3]); a folder of images is streamed through the Inception
    (`fid.folder_features`) and read whole only for the toy's layouts."""
    want_stats, want_layout = reference_wants(reference, scorers, toy)
    if not (want_stats or want_layout):
        return
    if reference.kind == IMAGES:
        try:
            if want_stats:
                reference.stats = fid.stats(fid.folder_features(reference.path, scorers.inception))
            if want_layout:
                files = fid.image_files(reference.path)
                reference.layout = toy_layouts(np.stack([fid.read_image(f) for f in files]))[0]
        except fid.FIDError as e:
            raise EvaluateError(f"--fid_reference: {e}") from e
    elif len(images) < 2:
        reference.problem = f"the FID reference {reference.path} has {TOO_FEW}"
    else:
        if want_stats:
            reference.stats = fid.stats(scorers.inception(images, desc=f"FID features of {reference.path}"))
        if want_layout:
            reference.layout = toy_layouts(images)[0]


# ---------------------------------------------------------------------------- input checks


def _inception_problem(path: str) -> None:
    """What `load_inception` refuses, from the file's header alone."""
    how = f"pytorch-fid's {inception_lib.PTH_NAME} converted with `{inception_lib.CONVERT_COMMAND}`"
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist (or is not a file); the FID Inception weights are {how}")
    if path.endswith(inception_lib.TORCH_SUFFIXES):
        raise CheckpointError(f"{path} is a torch file, which the runtime does not read; use {how}")
    inception_lib.check_keys({k: v.shape for k, v in read_header(path).items()}, path)


def _hpsv2_problem(path: str) -> None:
    """What `load_open_clip` refuses before reading a weight: no file, a pickle, a transformers checkpoint."""
    weights, _ = open_clip.resolve_weights(path)
    open_clip.check_layout(read_header(weights), weights)


def input_problems(*, inception: str | None, reference: Reference | None, save_fid_stats: str | None,
                   pickscore: str | None, pickscore_processor: str | None, hpsv2: str | None,
                   hpsv2_tokenizer: str | None) -> list[str]:
    """One line per bad input among the new metrics' flags (weights, folders, flag combinations);
    reads headers and configs only."""
    problems = []

    def check(flag: str, fn, *args) -> None:
        try:
            fn(*args)
        except (CheckpointError, OSError, ValueError) as e:
            problems.append(f"{flag}: {e}")

    if inception:
        check("--inception", _inception_problem, inception)
    if save_fid_stats:
        if not inception:
            problems.append("--save_fid_stats needs --inception (the statistics are of its features)")
        elif reference is None or reference.kind == STATS:
            what = "there is none" if reference is None else f"{reference.path} is a statistics file already"
            problems.append("--save_fid_stats writes the statistics of the FID reference's images (a --fid_reference "
                            f"folder, or the teacher's folder among --samples); {what}")
        elif not save_fid_stats.endswith(".npz"):
            problems.append(f"--save_fid_stats={save_fid_stats}: name a .npz file (clean-fid's / pytorch-fid's format)")
        elif not epath.Path(save_fid_stats).parent.is_dir():
            problems.append(f"--save_fid_stats={save_fid_stats}: its folder does not exist")
    if pickscore:
        check("--pickscore", check_pickscore_folder, pickscore)
        if pickscore_processor and not os.path.isdir(pickscore_processor):
            problems.append(f"--pickscore_processor={pickscore_processor} is not a folder (a CLIP processor: tokenizer "
                            "files and preprocessor_config.json)")
    elif pickscore_processor:
        problems.append("--pickscore_processor is the processor of a --pickscore model; pass --pickscore too")
    if hpsv2:
        check("--hpsv2", _hpsv2_problem, hpsv2)
        if not hpsv2_tokenizer or not os.path.isdir(hpsv2_tokenizer):
            given = f" ({hpsv2_tokenizer} is not a folder)" if hpsv2_tokenizer else ""
            problems.append(f"--hpsv2 needs --hpsv2_tokenizer=FOLDER{given}: a transformers CLIPTokenizer with OpenAI "
                            "CLIP's BPE, e.g. an SD3 pipeline's tokenizer/")
    elif hpsv2_tokenizer:
        problems.append("--hpsv2_tokenizer is the tokenizer of a --hpsv2 model; pass --hpsv2 too")
    return problems


# ---------------------------------------------------------------------------- models


class Scorers:
    """The FID Inception and the preference models, loaded once (after `input_problems`). The
    Inception runs on one device in batches of `per_device_batch` images; the preference towers are
    sharded over `mesh`, their batches data-parallel."""

    def __init__(self, *, inception: str | None = None, pickscore: str | None = None,
                 pickscore_processor: str | None = None, hpsv2: str | None = None, hpsv2_tokenizer: str | None = None,
                 mesh=None, per_device_batch: int = 8, progress: bool = True):
        self.progress, self.lines = progress, []
        self.inception = None
        if inception:
            model = inception_lib.load_inception(inception, progress=False)
            self.inception = fid.InceptionFeatures(model, batch_size=per_device_batch, progress=progress)
            self.lines.append(f"--inception={inception}: clean-fid's resize to 299x299, pool3 features")
        self.preference: dict[str, PreferenceScorer] = {}
        kw = dict(mesh=mesh, per_device_batch=per_device_batch)
        if pickscore:
            self.preference[PICKSCORE] = load_pickscore(pickscore, pickscore_processor or None, **kw)
        if hpsv2:
            self.preference[HPSV2] = load_hpsv2(hpsv2, hpsv2_tokenizer, **kw)
        self.lines += [s.description for s in self.preference.values()]
        self.batch = per_device_batch * (mesh_lib.batch_divisor(mesh) if mesh is not None else 1)

    def scores(self, name: str, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """[N] preference scores of images[i] against prompts[i], in batches of one shape (the last
        padded) under a progress bar."""
        scorer = self.preference[name]
        try:
            scorer.check_input(*images.shape[1:3])
        except ValueError as e:
            raise EvaluateError(str(e)) from e
        out = []
        for start in tqdm(range(0, len(images), self.batch), desc=name, disable=not self.progress, leave=False):
            x, t = images[start:start + self.batch], list(prompts[start:start + self.batch])
            n = len(x)
            x = np.concatenate([x, np.repeat(x[:1], self.batch - n, 0)])
            out.append(scorer.score(x, t + t[:1] * (self.batch - n))[:n])
        return np.concatenate(out)


def scorer_gaps(scorers: Scorers | None, reference: Reference | None) -> dict[str, str]:
    """{metric: why it cannot be computed} for the models `scorers` lacks."""
    inception = scorers is not None and scorers.inception is not None
    have = scorers.preference if scorers is not None else {}
    gaps = {} if inception else {"vendi_inception": NO_INCEPTION, reference.metric if reference else FID: NO_INCEPTION}
    gaps.update({m: why for m, why in ((PICKSCORE, NO_PICKSCORE), (HPSV2, NO_HPSV2)) if m not in have})
    return gaps


# ---------------------------------------------------------------------------- one folder's results


@dataclasses.dataclass
class Results:
    """One folder's metrics as they are computed: `values` (eval.json), the metrics computed and not
    (with why), and a row per prompt index (eval_prompts.jsonl)."""

    values: dict[str, Any]
    per_prompt: dict[int, dict[str, Any]]
    computed: list[str] = dataclasses.field(default_factory=list)
    not_computed: dict[str, str] = dataclasses.field(default_factory=dict)

    def add(self, metric: str, values: dict[str, Any], per_prompt: dict[str, dict[int, Any]] | None = None) -> None:
        self.values.update(values)
        self.computed.append(metric)
        for key, by_prompt in (per_prompt or {}).items():
            for p, v in by_prompt.items():
                self.per_prompt[p][key] = v

    def skip(self, metric: str, why: str) -> None:
        self.not_computed[metric] = why

    def as_dict(self) -> dict[str, Any]:
        return {**self.values, "computed": self.computed, "not_computed": self.not_computed,
                "per_prompt": PROMPTS_FILE}


def vendi_metrics(name: str, features: np.ndarray, prompt_of: np.ndarray,
                  keep: Sequence[int]) -> tuple[dict[str, float], dict[int, float]]:
    """({vendi_<name>_per_prompt (when a prompt has >= 2 images), vendi_<name>_folder}, the score
    of each prompt in `keep`) of features [N, F] of the images of prompts `prompt_of` [N]."""
    out = {f"vendi_{name}_folder": vendi.vendi_score(features)}
    if not len(keep):
        return out, {}
    mask = np.isin(prompt_of, keep)
    v = vendi.per_group(features[mask], prompt_of[mask])
    return {f"vendi_{name}_per_prompt": v.mean, **out}, dict(zip(v.groups, v.scores))


def frechet_to_stats(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """The Frechet distance of features [n, D] (their mean and covariance) to N(mu, sigma): exactly
    from the n x n matrix when n - 1 < D (module docstring), else `fid.frechet_distance`."""
    f = np.asarray(features, np.float64)
    n, d = f.shape
    if np.shape(mu) != (d,) or np.shape(sigma) != (d, d):
        raise EvaluateError(f"the FID reference's statistics are of {np.shape(mu)[0]} features, the Inception's pool3 "
                            f"of {d}: were they computed with another network or layer?")
    if n - 1 >= d:
        return fid.frechet_distance(*fid.stats(f), mu, sigma)
    mu1 = f.mean(axis=0)
    a = (f - mu1) / np.sqrt(n - 1)  # S1 = a^T a = np.cov(f, rowvar=False)
    m = a @ np.asarray(sigma, np.float64) @ a.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu
    return float(diff @ diff + np.sum(a * a) + np.trace(sigma) - 2 * cross)


def toy_layouts(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(detected (cx, cy, size) [N, 3] px, `layout_features` [N, 4]) of uint8 toy images."""
    det = toy_metrics.detect(np.asarray(images, np.float32) / 127.5 - 1.0)
    return toy_metrics.layout_of(det), toy_metrics.layout_features(det)


def toy_layout_metrics(r: Results, images: np.ndarray, prompt_of: np.ndarray, keep: Sequence[int],
                       reference: Reference | None, is_reference: bool) -> None:
    """vendi_layout_* and fid_t_layout (module docstring) of a toy folder's readable images."""
    key = f"{reference.metric if reference else FID_T}_layout"
    if len(images) < 2:
        r.skip("vendi_layout", TOO_FEW)
        r.skip(key, TOO_FEW)
        return
    layout, feats = toy_layouts(images)
    values, per = vendi_metrics("layout", feats, prompt_of, keep)
    per_div = {p: prompt_diversity(feats[prompt_of == p]) for p in keep}
    r.add("vendi_layout", values, {"vendi_layout": per, "diversity_layout": per_div})
    if is_reference:
        reference.layout = layout
    why = (NO_REFERENCE if reference is None else IS_REFERENCE if is_reference else reference.problem or
           (f"the FID reference {reference.path} is a statistics file; the toy's layout distance needs its images"
            if reference.layout is None else None))
    if why:
        r.skip(key, why)
    else:
        r.add(key, {key: toy_metrics.frechet_distance(layout, reference.layout), "fid_reference": reference.path})


def inception_metrics(r: Results, scorers: Scorers, images: np.ndarray, prompt_of: np.ndarray, keep: Sequence[int],
                      reference: Reference | None, is_reference: bool, name: str) -> None:
    """vendi_inception_* and fid / fid_t of a folder's readable images."""
    key = reference.metric if reference else FID
    if len(images) < 2:
        r.skip("vendi_inception", TOO_FEW)
        r.skip(key, TOO_FEW)
        return
    feats = scorers.inception(images, desc=f"FID features of {name}")
    values, per = vendi_metrics("inception", feats, prompt_of, keep)
    r.add("vendi_inception", values, {"vendi_inception": per})
    if is_reference:
        reference.stats = fid.stats(feats)
    why = NO_REFERENCE if reference is None else IS_REFERENCE if is_reference else reference.problem
    if why:
        r.skip(key, why)
    else:
        r.add(key, {key: frechet_to_stats(feats, *reference.stats), "fid_images": len(images),
                    "fid_reference": reference.path})


def preference_metrics(r: Results, scorers: Scorers, images: np.ndarray, prompts: Sequence[str],
                       prompt_of: np.ndarray) -> None:
    """pickscore / hpsv2: the mean over images, and per prompt the mean and each seed's score."""
    for name in scorers.preference:
        if not len(images):
            r.skip(name, "no readable images")
            continue
        s = scorers.scores(name, images, prompts)
        ps = sorted(set(prompt_of.tolist()))
        r.add(name, {name: float(s.mean())}, {name: {p: float(s[prompt_of == p].mean()) for p in ps},
                                              f"{name}_per_seed": {p: s[prompt_of == p].tolist() for p in ps}})


def notes(results: dict[str, dict], reference: Reference | None) -> list[str]:
    """What the new metrics' numbers are measured against and what they mean (eval.md, comparison.md)."""
    computed = {m for r in results.values() for m in r.get("computed", [])}
    lines = []
    if reference is not None and computed & {FID, FID_T, "fid_layout", "fid_t_layout"}:
        lines.append(f"FID reference: {reference.describe()}")
    few = sorted({r["fid_images"] for r in results.values() if r.get("fid_images", FEATURE_DIM + 1) <= FEATURE_DIM})
    if few:
        lines.append(f"FID from {', '.join(map(str, few))} images, fewer than the {FEATURE_DIM} Inception features: "
                     "biased upwards, comparable only between folders with as many images (clean-fid uses 10k-50k)")
    toy = sorted(computed & {"vendi_layout", "fid_layout", "fid_t_layout"})
    if toy:
        lines.append(TOY_CAVEAT.format(keys=", ".join(toy)))
    if computed & {FID, FID_T, "vendi_inception", PICKSCORE, HPSV2, "diversity_clip", "diversity_dino", "clip_score"}:
        lines.append(QUALITY_CAVEAT)
    return lines


def write_per_prompt(folder: str, per_prompt: dict[int, dict[str, Any]]) -> None:
    """eval_prompts.jsonl: one row per prompt index, in order."""
    rows = "".join(json.dumps(per_prompt[p]) + "\n" for p in sorted(per_prompt))
    (epath.Path(folder) / PROMPTS_FILE).write_text(rows)
