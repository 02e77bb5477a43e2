"""`distill.anchor_k = "auto"`: choose the anchor step K from a teacher pass, before training.

Why: "K = 5 of 30" names a point of the teacher's grid, not a point of generation. How much of
the final sample's layout the anchor's target carries at a given K depends on the backbone, the
resolution and the grid's shift (docs/benchmarks/toy-study.md: on the 16x16 toy with SD3's shift 3, the K = 5
target keeps half of the final layout spread, and DP-DMD loses to DMD there). What the diversity
loss needs is a target that already varies from noise to noise the way the teacher's samples do.
So the criterion measures that, in latent space, through the Schedule / Backbone interfaces only:

  noises: `prompts` prompts (the first rows of round 0's batch) x `seeds` noises each;
  the teacher's guided samples x_T from them (one pass along the T-step anchor grid), and their
  deviations d_f = x_T - (the mean of the prompt's seeds);
  a second pass along the same grid: at every K, the diversity target as a clean latent ("line":
  x0_line(K) = eps - v_line(K), the clean end of the straight line through eps and z_tK;
  "denoise": the teacher's guided x0 at z_tK, its next step's own prediction) and its deviations d_K;
  carried(K) = <d_K, d_f> / <d_f, d_f>   (criterion "carried"; 1 at K = T, where the target is x_T)
    = the regression coefficient of the target's sample-to-sample variation on the final samples':
    ~0 for a mean-like target, a for a target that is a shrunken (a x) copy of the final layouts;
    the part of x0_line that is amplified noise (x0_line = eps - (eps - z_tK) / (1 - t_K) with
    1 - t_K small) is not in the final samples and averages out, where a plain ratio of spreads
    would count it as diversity (docs/benchmarks/toy-time-axis.md);
  K = the smallest K with carried(K) >= fraction.

Two passes instead of one keep the memory at one batch of latents (no trajectory is stored); the
cost, 2 T guided teacher steps on prompts x seeds latents once per run, is a few rounds' worth.
The chosen K and the curve are printed, written to `workdir/anchor_auto.json`, and recorded in
the workdir's `config.json` (`distill.auto_anchor.chosen_k`); a resumed run reuses that K without
another teacher pass, so every round of a run uses the same anchor.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from dpdmd_jax import data as data_lib
from dpdmd_jax.core import DataSource, Frozen
from dpdmd_jax.distill import losses
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.parallel.multihost import SyncedJit

CRITERIA = ("carried",)
RECORD = "anchor_auto.json"


def prompt_deviations(x: jax.typing.ArrayLike, seeds: int) -> jax.Array:
    """x [prompts * seeds, ...] (a prompt's seeds adjacent) minus the mean of its prompt's seeds,
    as [prompts, seeds, elements] float32."""
    x = jnp.asarray(x, jnp.float32)
    x = x.reshape(x.shape[0] // seeds, seeds, -1)
    return x - jnp.mean(x, axis=1, keepdims=True)


def carried(target: jax.typing.ArrayLike, final_deviations: jax.Array, seeds: int) -> jax.Array:
    """<d_target, d_final> / <d_final, d_final>: the share of the final samples' within-prompt
    variation that `target` reproduces (1 for the samples themselves, ~0 for a mean-like target)."""
    d = prompt_deviations(target, seeds)
    return jnp.sum(d * final_deviations) / jnp.sum(final_deviations**2)


def target_curve(distiller: Any, frozen: Any, eps: jax.Array, cond: Any, uncond: Any, seeds: int) -> jax.Array:
    """carried(K) for K = 1..T [T]: two guided teacher passes from `eps` (the final samples, then the
    per-step targets, reduced on the fly)."""
    schedule, line = distiller.schedule, distiller.c.distill.target == "line"
    teacher = lambda observe=None: distiller.teacher_sample(frozen.teacher, frozen.buffers, eps, cond, uncond,
                                                            observe=observe)
    final = prompt_deviations(teacher(), seeds)

    def observe(z, p, level, z_next, next_level):
        if line:  # the step that ends at z_next makes K = i + 1
            return carried(eps - losses.line_velocity_target(eps, z_next, next_level), final, seeds)
        return carried(schedule.to_x0(z, p, level), final, seeds)  # the step that starts at z_K

    _, curve = teacher(observe)
    if not line:  # step i observed K = i (i = 0 is the noise itself); at K = T the target is the sample
        curve = jnp.append(curve[1:], 1.0)
    return curve


def choose_k(ratios: np.ndarray, fraction: float) -> int:
    """The smallest K (1-based) with ratios[K - 1] >= fraction; T if none reaches it (ratio(T) is 1
    up to rounding)."""
    hits = np.flatnonzero(np.asarray(ratios) >= fraction)
    return int(hits[0]) + 1 if hits.size else len(ratios)


def problems(c: ml_collections.ConfigDict) -> list[str]:
    """The auto-anchor settings' problems (only when distill.anchor_k is "auto")."""
    a = c.distill.auto_anchor
    p = []
    if a.criterion not in CRITERIA:
        p.append(f"distill.auto_anchor.criterion={a.criterion!r} is unknown; choose one of {CRITERIA} (the smallest "
                 "K whose target carries `fraction` of the final samples' within-prompt variation).")
    if not 0.0 < a.fraction <= 1.0:
        p.append(f"distill.auto_anchor.fraction={a.fraction} must lie in (0, 1].")
    if not isinstance(a.prompts, int) or a.prompts < 1 or a.prompts > c.batch_size:
        p.append(f"distill.auto_anchor.prompts={a.prompts!r} must be an integer in 1..batch_size={c.batch_size} "
                 "(the first rows of round 0's batch).")
    if not isinstance(a.seeds, int) or a.seeds < 2:
        p.append(f"distill.auto_anchor.seeds={a.seeds!r} must be an integer >= 2 (variation across seeds needs "
                 "two of them).")
    return p


def recorded_k(workdir: str) -> int | None:
    """The K an earlier run in `workdir` chose automatically (config.json), if any."""
    path = epath.Path(workdir) / "config.json"  # epath: the workdir may be gs:// (run/workdir.py)
    if not path.exists():
        return None
    k = json.loads(path.read_text()).get("distill", {}).get("auto_anchor", {}).get("chosen_k")
    return None if k is None else int(k)


def _write_json(path: epath.Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def record(workdir: str, k: int, curve: dict) -> None:
    """Records K in the workdir's config.json (`distill.auto_anchor.chosen_k`, which later rewrites of
    config.json keep), and the curve it was chosen from in anchor_auto.json; each file is replaced
    atomically."""
    root = epath.Path(workdir)
    _write_json(root / RECORD, {**curve, "chosen_k": k})
    path = root / "config.json"
    saved = json.loads(path.read_text())
    saved["distill"]["auto_anchor"]["chosen_k"] = k
    _write_json(path, saved)


def curve_table(levels: np.ndarray, ratios: np.ndarray, k: int) -> str:
    lines = ["   K   level   carried (share of the final samples' within-prompt variation in the target)"]
    for i, (level, r) in enumerate(zip(levels, ratios), start=1):
        lines.append(f"{i:4d} {level:7.3f}   {r:.3f}{'   <- chosen' if i == k else ''}")
    return "\n".join(lines)


def resolve_k(c: ml_collections.ConfigDict, workdir: str | None, teacher: Any, frozen: Frozen, mesh: Mesh,
              data: DataSource) -> int | None:
    """The run's anchor step K: the config's; without a `workdir` (a reader) None for "auto"; the one
    an earlier run in `workdir` chose and recorded in its config.json; or, for "auto", the one
    `target_curve` picks from a teacher pass (`teacher`: a Distiller whose K is open) over round 0's
    first prompts (round 0's global batch from `data`), then printed and recorded in the workdir. None for
    plain DMD with "auto": lambda_div = 0 never runs the anchor, so there is nothing to choose."""
    if c.distill.anchor_k != "auto":
        return int(c.distill.anchor_k)
    if c.distill.lambda_div == 0 or workdir is None:
        return None
    recorded = recorded_k(workdir)
    if recorded is not None:  # a resumed run: the same K, no second teacher pass
        print(f"distill.anchor_k=auto: K={recorded}, as chosen and recorded in {workdir}/config.json")
        return recorded
    a, m = c.distill.auto_anchor, c.distill.fake_updates_per_student

    def curve(frozen, cond, uncond):
        pick = lambda x: jnp.repeat(x[: a.prompts], a.seeds, axis=0)  # a prompt's seeds adjacent
        cond, uncond = jax.tree.map(lambda x: pick(x[m]), cond), jax.tree.map(pick, uncond)
        eps = jax.random.normal(jax.random.key(c.seed), (a.prompts * a.seeds, *teacher.latent_shape), jnp.float32)
        return target_curve(teacher, frozen, eps, cond, uncond, a.seeds)

    print(f"distill.anchor_k=auto: two teacher passes ({a.prompts} prompts x {a.seeds} seeds, "
          f"{len(teacher.teacher_grid) - 1} steps) to choose K ...", flush=True)
    batch = data_lib.global_round(data, mesh, c.batch_size, 0)
    fn = SyncedJit(curve, "anchor_curve", out_shardings=mesh_lib.replicated(mesh))
    ratios = np.asarray(jax.device_get(fn(frozen, batch.cond, batch.uncond)))
    k = choose_k(ratios, a.fraction)
    levels = teacher.teacher_grid[1:]
    print(curve_table(levels, ratios, k))
    print(f"distill.anchor_k=auto: K={k}, the first K whose target carries >= {a.fraction:g} of the final samples' "
          f"within-prompt variation (recorded in {workdir}/config.json)", flush=True)
    if jax.process_index() == 0:
        record(workdir, k, dict(criterion=a.criterion, fraction=a.fraction, prompts=a.prompts, seeds=a.seeds,
                               levels=levels.tolist(), carried=ratios.tolist()))
    return k
