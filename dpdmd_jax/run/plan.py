"""Planning a run before renting its hardware (MaxText's `train_compile`, for distillation).

The run's state and round are built shape-only (`jax.ShapeDtypeStruct`s carrying the run's
shardings; no weight is read) on the target's devices: a TPU topology described by libtpu on
this host (`tpu:v5p:2x2x1`), N virtual CPU devices (`cpu:8`) or this host's own (`local`, e.g. a
GPU node). The round is compiled ahead of time exactly as training compiles it
(`setup.compile_round`: donation, rows split over the batch, scan, remat), and XLA's
`memory_analysis()` gives each device's arguments, outputs, temporaries and code; a
compile-time out-of-memory is the verdict the hardware would give.

FLOPs: XLA's `cost_analysis()` counts a loop's body once, whatever its trip count (the critic
scan, the teacher's anchor loop, the student's steps), so the round's count is ours: the method's
model calls per round (`model_calls`, docs/DESIGN.md section 2) times XLA's count of one call,
lowered unscanned (`call_flops`). tests/integration/test_plan_compile.py checks the product against the
compiled count of a small round with every loop unrolled.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dpdmd_jax import backbones
from dpdmd_jax.backbones.pipeline import PRESET, TEXT_KINDS
from dpdmd_jax.config import ConfigError, lpips_regression, override, regression_pairs
from dpdmd_jax.core import Frozen, RoundBatch
from dpdmd_jax.diffusion.sampler import is_unguided
from dpdmd_jax.distill import adapters
from dpdmd_jax.distill.step import Distiller
from dpdmd_jax.models.layers import split_rows
from dpdmd_jax.parallel import chips as chips_lib
from dpdmd_jax.parallel import mesh as mesh_lib
from dpdmd_jax.run import preflight, setup

ASSUMED_AUTO_K = 5  # distill.anchor_k="auto" is chosen by a teacher pass; the plan assumes the paper's K
REMAT_LADDER = ("none", "dots", "dots_no_batch", "full")  # least recompute (fastest) first
TARGET_FORMS = "tpu:<topology> (e.g. tpu:v5p:2x2x1, tpu:v5e:4x4), cpu:<N> or local"


class PlanError(ValueError):
    """A target or an output the planner cannot use; the message says what to pass instead."""


# ---------------------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class Target:
    kind: str  # "tpu" | "cpu" | "local"
    spec: str = ""  # the topology, or the CPU device count

    def __str__(self) -> str:
        return f"{self.kind}:{self.spec}" if self.spec else self.kind


def parse_target(text: str) -> Target:
    """`tpu:v5p:2x2x1` | `cpu:8` | `local`; a ValueError names the accepted forms."""
    kind, _, spec = text.partition(":")
    if kind == "local" and not spec:
        return Target("local")
    if kind == "cpu" and spec.isdigit() and int(spec) > 0:
        return Target("cpu", spec)
    if kind == "tpu" and spec.count(":") == 1 and all(spec.split(":")):
        return Target("tpu", spec)
    raise PlanError(f"--target={text!r}: use {TARGET_FORMS}")


def target_problems(target: Target) -> list[str]:
    """What stops the target before anything is built (libtpu for TPU topologies)."""
    if target.kind == "tpu" and importlib.util.find_spec("libtpu") is None:
        return [f"--target={target}: compiling for a TPU topology needs libtpu on this host: "
                "pip install -r requirements-plan.txt (or pip install 'dpdmd_jax[plan-tpu]')"]
    return []


def prepare_jax(target: Target) -> None:
    """Sets JAX up for the target before its backend starts: N CPU devices for `cpu:N`; for a TPU
    topology the CPU platform (libtpu then only describes and compiles for the topology, it does
    not look for TPU chips on this host)."""
    if target.kind == "cpu" and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", int(target.spec))
    if target.kind in ("cpu", "tpu"):
        jax.config.update("jax_platforms", "cpu")
    if target.kind == "tpu":  # no chip is opened: plans may run side by side (libtpu's lock file would refuse)
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        _drop_cpu_only_xla_flags()


def _drop_cpu_only_xla_flags() -> None:
    """libtpu parses XLA_FLAGS itself and aborts the process on a flag it does not know, which
    the XLA:CPU-only `--xla_cpu_*` flags are: they say nothing about a TPU program, so they go."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    dropped = [f for f in flags if f.startswith("--xla_cpu_")]
    if dropped:
        os.environ["XLA_FLAGS"] = " ".join(f for f in flags if f not in dropped)
        print(f"XLA_FLAGS: leaving out {' '.join(dropped)} (XLA:CPU only; libtpu refuses flags it does not know)")


def target_devices(target: Target) -> list[jax.Device]:
    if target.kind == "tpu":
        from jax.experimental import topologies

        try:
            return list(topologies.get_topology_desc(platform="tpu", topology_name=target.spec).devices)
        except Exception as e:  # libtpu's error for a name it does not know
            raise PlanError(f"--target={target}: libtpu cannot describe topology {target.spec!r} ({e}); "
                             "names look like v5p:2x2x1, v5e:4x4, v6e:2x4, v4:2x2x1") from e
    devices = jax.devices()
    if target.kind == "cpu":
        n = int(target.spec)
        if len(devices) < n:
            raise PlanError(f"--target={target}: this process has {len(devices)} CPU devices (JAX started "
                             "before the planner could set the count); run the planner in a fresh process")
        return devices[:n]
    return devices


def chip_of(devices: list[jax.Device], chip: str | None) -> chips_lib.Chip | None:
    """`--chip` when given, else the chip the devices are (None for CPUs)."""
    return chips_lib.chip_named(chip) if chip else chips_lib.chip_for(devices[0].device_kind)


# ---------------------------------------------------------------------------- the run, shape-only


def plannable(c: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(config, assumptions): what the plan builds in place of what it cannot read. An empty
    model.source becomes the backbone's default preset; anchor_k="auto" the paper's K."""
    c, notes = copy.deepcopy(c), []
    with c.unlocked():
        if not c.model.source:
            preset = getattr(backbones.backbone_class(c.backbone), "default_preset", "")
            if preset:
                c.model.source = PRESET + preset
                notes.append(f"model.source is empty: planned with the {preset} architecture")
        if c.distill.anchor_k == "auto":
            c.distill.anchor_k = ASSUMED_AUTO_K
            notes.append(f"distill.anchor_k='auto': planned with K={ASSUMED_AUTO_K} (the run picks K itself)")
    return c, notes


def with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_run(c: ml_collections.ConfigDict, devices: list[jax.Device]) -> setup.Run:
    """The run `setup.build` would assemble, shape-only on `devices` (no data source, no teacher
    weights: the frozen teacher is ShapeDtypeStructs on its shardings)."""
    problems = preflight.config_problems(c) + preflight.mesh_problems(c, devices)
    if lpips_regression(c):
        problems.append("regression.distance='lpips' cannot be planned yet (its VAE and LPIPS are not built "
                        "shape-only): plan regression.distance='l2', which leaves out the round's two VAE decodes "
                        "and its VGG16 pass.")
    if problems:
        raise ConfigError("the run cannot be planned:\n  - " + "\n  - ".join(problems))
    mesh = mesh_lib.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
    rules = mesh_lib.mesh_rules(c)
    backbone = backbones.get(c)
    graphdef, params, buffers = nnx.split(backbone.abstract_teacher(), nnx.Param, ...)
    lora = adapters.adapted_roles(c, backbone, graphdef, params, buffers)
    stored = jnp.dtype(c.model.teacher_dtype) if c.model.teacher_dtype else None  # as setup stores it
    teacher = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, stored or x.dtype), params)
    frozen = Frozen(teacher=with_shardings(teacher, mesh_lib.state_shardings(params, mesh, rules)),
                    buffers=with_shardings(buffers, mesh_lib.state_shardings(buffers, mesh, rules)))
    return setup.Run(c, mesh, rules, backbone, Distiller(c, backbone, graphdef, adapters=lora), frozen, None, None)


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def resident_models(run: setup.Run) -> dict[str, int]:
    """Per-device bytes of what stays on device beside the round: the text encoders of a prompt
    source (sharded like the teacher; an embedding cache needs none)."""
    if run.config.data.kind not in TEXT_KINDS:
        return {}
    out = {}
    for name, model in run.backbone.abstract_text_encoders().items():
        state = nnx.state(model)
        out[f"text encoder {name} ({run.config.text.dtype})"] = device_bytes(
            with_shardings(state, mesh_lib.state_shardings(state, run.mesh, run.rules)))
    return out


# ---------------------------------------------------------------------------- FLOPs


def model_calls(c: ml_collections.ConfigDict, anchor_k: int, n: int) -> dict[str, float]:
    """The denoiser calls of one round at the round's batch B, from the method (docs/DESIGN.md
    section 2): a guided call is two (cond and uncond batched); a call inside the loss's gradient
    is a forward+backward; `n` is the student's step count. "backward" simulation's gradient-free
    steps are counted at their mean."""
    m = c.distill.fake_updates_per_student
    guided = lambda scale: 1 if is_unguided(scale) else 2
    forward = m * n  # critic updates: a fresh N-step student sample each (no gradient)
    forward_backward = m  # ... and the fake score's denoising loss
    if c.distill.lambda_div > 0:
        forward += anchor_k * guided(c.teacher.cfg_scale)  # the teacher's K anchor steps
        forward += guided(c.teacher.cfg_scale) if c.distill.target == "denoise" else 0
    # The generator's student sample x: its first step with gradient, then "rollout": steps 2..N with
    # gradient; "backward": gradient-free steps up to a uniform j in start..N-1, and step j with gradient.
    if c.dmd.simulation == "rollout":
        sample_forward, sample_forward_backward = 0, n
    else:
        start = 1 if c.distill.lambda_div > 0 else 0
        sample_forward, sample_forward_backward = (n - 1 - start) / 2, 2
    samples = 2 if regression_pairs(c) else 1  # DMD v1's cached pairs: the student's sample from their noises too
    forward += samples * sample_forward
    forward_backward += samples * sample_forward_backward
    forward += guided(c.dmd.real_cfg_scale) + 1  # DMD: teacher (real score) and fake score
    teacher_sample = c.teacher.steps * guided(c.teacher.cfg_scale)  # a T-step guided teacher sample
    if c.regression.weight > 0 and not regression_pairs(c):
        forward += teacher_sample  # DMD v1's target, from the generator's noise
    if c.gan.weight > 0:
        # The fake score's features (counted as whole calls: an upper bound, they stop at gan.block / the
        # UNet's mid block) on real and generated samples in each critic update, and on x in the
        # generator's (its gradient reaches x); the head's own FLOPs are not counted.
        forward_backward += 2 * m + 1
        if c.gan.real == "teacher":
            forward += m * teacher_sample  # the real side, sampled in each critic update
    return {"forward": forward, "forward_backward": forward_backward}


def call_flops(run: setup.Run, remat_policy: str = "none") -> dict[str, float]:
    """XLA's FLOPs of one denoiser call at the round's global batch, forward and forward+backward
    (gradient w.r.t. the parameters), lowered unscanned on one device (`lower().cost_analysis()`,
    nothing compiled). `remat_policy` other than "none" adds its recomputation to the backward."""
    c = override(copy.deepcopy(run.config), {"model.scan_layers": False, "model.remat_policy": remat_policy})
    backbone = backbones.get(c)
    graphdef, params, buffers = nnx.split(backbone.abstract_teacher(), nnx.Param, ...)
    b = c.batch_size
    z = jax.ShapeDtypeStruct((b, *backbone.latent_shape()), jnp.float32)
    level = jax.ShapeDtypeStruct((b,), jnp.float32)
    cond = backbone.cond_spec(b)

    def forward(params, buffers, z, level, cond):
        return backbone.apply(nnx.merge(graphdef, params, buffers, copy=True), z, level, cond)

    def forward_backward(params, buffers, z, level, cond):  # the value is used, as in the round: with remat
        # the forward runs twice (once for the value, once more inside the backward)
        return jax.value_and_grad(lambda p: forward(p, buffers, z, level, cond).astype(jnp.float32).sum())(params)

    def flops(fn):
        # Traced for the target's platform (its attention path), on one device of no mesh axis.
        with split_rows(run.mesh, ()):
            return float(jax.jit(fn).lower(params, buffers, z, level, cond).cost_analysis()["flops"])

    return {"forward": flops(forward), "forward_backward": flops(forward_backward)}


@contextlib.contextmanager
def unrolled_loops():
    """While tracing inside, `jax.lax.scan` and static-bound `jax.lax.fori_loop` fully unroll, so XLA's
    cost analysis sees every iteration (it counts a loop body once): the check of `model_calls` x
    `call_flops` against a whole round (tests/integration/test_plan_compile.py, benchmarks/step_cost.py)."""
    scan0, fori0 = jax.lax.scan, jax.lax.fori_loop

    def scan(f, init, xs=None, length=None, reverse=False, unroll=1, **kw):
        return scan0(f, init, xs, length, reverse=reverse, unroll=True, **kw)

    def fori_loop(lower, upper, body, init, unroll=None):
        static = all(isinstance(v, (int, np.integer)) for v in (lower, upper))
        return fori0(lower, upper, body, init, unroll=True if static else unroll)

    jax.lax.scan, jax.lax.fori_loop = scan, fori_loop
    try:
        yield
    finally:
        jax.lax.scan, jax.lax.fori_loop = scan0, fori0


# ---------------------------------------------------------------------------- the plan


def lower_round(run: setup.Run):
    """(lowered round, abstract state, abstract batch): the round as training compiles it."""
    state = setup.abstract_train_state(run)
    spec = setup.batch_spec(run)
    batch = with_shardings(spec, mesh_lib.round_shardings(run.mesh, spec))
    fn = setup.compile_round(run, jax.tree.map(lambda x: x.sharding, state))
    return fn.lower(state, run.frozen, batch), state, batch


def out_of_memory(e: Exception) -> str | None:
    """XLA's compile-time out-of-memory verdict (the error the hardware would give), as one line."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower():
        return next((line.strip() for line in text.splitlines() if "memory" in line.lower()), text.splitlines()[0])
    return None


def arguments(run: setup.Run, state, batch: RoundBatch) -> dict[str, int]:
    """The round's arguments per device, by what they are."""
    gan = {} if state.disc is None else {"GAN head, with its optimizer state": device_bytes((state.disc,
                                                                                             state.opt_disc))}
    return {
        "trained parameters (student, fake score)": device_bytes((state.student, state.fake)),
        "optimizer state (student, fake score)": device_bytes((state.opt_student, state.opt_fake)),
        **gan,
        "frozen teacher (with buffers)": device_bytes(run.frozen),
        "round batch (M + 1 conditionings, uncond)": device_bytes(batch),
        "step, rng": device_bytes((state.step, state.rng)),
    }


def plan(c: ml_collections.ConfigDict, target: Target, *, chip: str | None = None,
         memory_bytes: int | None = None, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Compiles `c`'s round for `target` and returns the plan (JSON-ready; `format_plan` prints it).
    `chip` names the chip of a target whose devices do not say (`cpu:N`); `memory_bytes` replaces
    the chip's memory (a what-if, or a fake budget in tests); `log` hears of each long step."""
    c, notes = plannable(c)
    devices = target_devices(target)
    the_chip = chip_of(devices, chip)
    run = abstract_run(c, devices)
    start = time.time()
    log(f"compiling the round for {target} ({len(devices)} x {devices[0].device_kind}, batch {c.batch_size}); "
        "a full-size round takes minutes on a CPU host ...")
    lowered, state, batch = lower_round(run)
    args, resident = arguments(run, state, batch), resident_models(run)
    capacity = memory_bytes or (the_chip.memory_bytes if the_chip else None)
    try:
        compiled, oom = lowered.compile(), None
    except Exception as e:  # noqa: BLE001  (re-raised unless it is XLA's out-of-memory verdict)
        compiled, oom = None, out_of_memory(e)
        if oom is None:
            raise
    log(f"compiled in {time.time() - start:.0f} s{' (out of memory)' if oom else ''}; counting FLOPs (one "
        "denoiser call, lowered unscanned) ...")
    program, peak = None, None
    if compiled is not None:
        mem = compiled.memory_analysis()
        program = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
                   "aliased (donated state)": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
                   "generated code": mem.generated_code_size_in_bytes}
        # The run holds every argument, also those the round never reads (XLA drops them from the program).
        held = max(mem.argument_size_in_bytes, sum(args.values()))
        peak = (held + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
                + mem.generated_code_size_in_bytes + sum(resident.values()))
    p = {
        "target": str(target), "devices": len(devices), "device_kind": devices[0].device_kind,
        "chip": the_chip.name if the_chip else None, "mesh": dict(run.mesh.shape),
        "batch_size": c.batch_size, "per_device_batch": c.batch_size // mesh_lib.batch_divisor(run.mesh),
        "setting": setting(c), "assumptions": notes,
        "memory_per_device": {"round arguments": args, "round program": program, "resident beside the round": resident,
                              "peak": peak, "capacity": capacity},
        "fits": False if oom else None if capacity is None else peak <= capacity,
        "margin_bytes": None if capacity is None or peak is None else capacity - peak,
    }
    if oom:
        p["error"] = oom
    p["flops"] = flops_plan(run, (compiled.cost_analysis() or {}) if compiled is not None else {}, the_chip)
    return p


def setting(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """The knobs `search` turns, as the config has them."""
    return {"mesh": dict(data=c.mesh.data, fsdp=c.mesh.fsdp, tensor=c.mesh.tensor), "batch_size": c.batch_size,
            "model.remat_policy": c.model.remat_policy, "model.scan_layers": c.model.scan_layers,
            "data.kind": c.data.kind, "model.dtype": c.model.dtype, "model.param_dtype": c.model.param_dtype}


def flops_plan(run: setup.Run, cost: dict[str, float], chip: chips_lib.Chip | None) -> dict[str, Any]:
    """Model FLOPs per round (calls x per-call count), what XLA compiled (`cost`: the compiled round's
    `cost_analysis()`, empty when it did not compile), and the roofline."""
    c, n = run.config, len(run.mesh.devices.flat)
    calls = model_calls(c, run.distiller.anchor_k, len(run.distiller.student_grid) - 1)
    per_call = call_flops(run)
    model = sum(calls[k] * per_call[k] for k in calls)
    remat = c.model.remat_policy
    with_remat = per_call if remat == "none" else call_flops(run, remat)
    hardware = sum(calls[k] * with_remat[k] for k in calls)
    xla_flops, xla_bytes = cost.get("flops"), cost.get("bytes accessed")
    out = {"model_calls": calls, "per_call": per_call, "model_per_round": model,
           "with_recompute_per_round": hardware, "per_device": hardware / n,
           "xla_compiled_per_device (loop bodies once)": None if xla_flops is None else float(xla_flops),
           "xla_bytes_accessed_per_device (loop bodies once)": None if xla_bytes is None else float(xla_bytes)}
    if chip is not None:
        compute_s = hardware / n / chip.bf16_flops
        memory_s = None if xla_bytes is None else float(xla_bytes) / chip.hbm_bytes_per_s
        roofline = max(compute_s, memory_s or 0.0)
        out["roofline"] = {"chip": chip.name, "compute_s": compute_s, "memory_s (a lower bound)": memory_s,
                           "round_s": roofline, "mfu": model / n / chip.bf16_flops / roofline}
    return out


# ---------------------------------------------------------------------------- search


def ladder(c: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """Settings from the config's towards the most frugal, each adding one memory saving, in the
    order they cost speed: prompts from an embedding cache (free: no text encoders on device),
    more rematerialisation, then a smaller per-device batch (changes the recipe: the last resort)."""
    steps, cur = [{}], {}
    if c.data.kind in TEXT_KINDS:
        cur = {**cur, "data.kind": "embeddings"}
        steps.append(cur)
    for policy in REMAT_LADDER[REMAT_LADDER.index(c.model.remat_policy) + 1:]:
        cur = {**cur, "model.remat_policy": policy}
        steps.append(cur)
    batch = c.batch_size
    while batch % 2 == 0 and batch // 2 >= 1:
        batch //= 2
        cur = {**cur, "batch_size": batch}
        steps.append(cur)
    return steps


def search(c: ml_collections.ConfigDict, target: Target, *, chip: str | None = None,
           memory_bytes: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Plans each setting of `ladder` until one fits; returns {"tried": [...], "best": plan or None}."""
    tried, devices = [], target_devices(target)
    for changes in ladder(c):
        candidate = override(copy.deepcopy(c), changes)
        if preflight.mesh_problems(candidate, devices):
            continue  # a batch that no longer splits over the devices
        step = f"search: {changes or 'the config as given'}"
        log(step)
        p = plan(candidate, target, chip=chip, memory_bytes=memory_bytes, log=log)
        p["changes"] = changes
        log(f"{step}: {fit_line(p)}")  # a long search reports each verdict as it comes
        tried.append(p)
        if p["fits"]:
            break
    return {"devices": len(devices), "tried": tried, "best": tried[-1] if tried and tried[-1]["fits"] else None}


# ---------------------------------------------------------------------------- printing


def gib(b: int | float | None, unit: int = 2**30) -> str:
    return "-" if b is None else f"{b / unit:.2f}"


def unit_for(peak: int | None) -> tuple[int, str]:
    """GiB for full-size plans, MiB for tiny ones (and GiB when the compiler gave no peak)."""
    return (2**30, "GiB") if (peak or 2**30) >= 2**30 else (2**20, "MiB")


def fit_line(p: dict[str, Any]) -> str:
    """The plan's verdict in one line: fits or not, with the margin or the compiler's message."""
    unit, name = unit_for(p["memory_per_device"]["peak"])
    if "error" in p:
        return f"fits: NO: the compiler ran out of memory: {p['error']}"
    if p["fits"] is None:
        return "fits: unknown (no chip memory for this target: pass --chip or --memory_gib)"
    return f"fits: {'YES' if p['fits'] else 'NO'} (margin {gib(p['margin_bytes'], unit)} {name})"


def format_plan(p: dict[str, Any]) -> str:
    m = p["memory_per_device"]
    lines = [f"target {p['target']}: {p['devices']} x {p['device_kind']}"
             + (f" ({p['chip']})" if p["chip"] else "") + f", mesh {p['mesh']}, batch {p['batch_size']} "
             f"({p['per_device_batch']} per device)"]
    lines += [f"  note: {n}" for n in p["assumptions"]]
    unit, name = unit_for(m["peak"])
    lines.append(f"\nper device                                      {name}")
    rows = [(f"  {k}", v) for k, v in m["round arguments"].items()]
    program = m["round program"] or {}
    rows += [(f"round program: {label}", program.get(key)) for label, key in (
        ("arguments", "arguments"), ("outputs", "outputs"), ("aliased with arguments (-)", "aliased (donated state)"),
        ("temporaries", "temporaries"), ("generated code", "generated code"))]
    rows += list(m["resident beside the round"].items())
    rows += [("peak", m["peak"]), ("capacity", m["capacity"])]
    lines += [f"{label:<46} {gib(v, unit):>8}" for label, v in rows]
    lines.append(fit_line(p))
    f = p["flops"]
    lines.append(f"\nmodel calls per round: {f['model_calls']['forward']:g} forward + "
                 f"{f['model_calls']['forward_backward']:g} forward+backward at batch {p['batch_size']}")
    xla = f["xla_compiled_per_device (loop bodies once)"]
    lines.append(f"FLOPs per round: {f['model_per_round']:.4g} (model), {f['with_recompute_per_round']:.4g} with "
                 f"remat's recomputation; per device {f['per_device']:.4g} (XLA's compiled count, loop bodies "
                 f"once: {'-' if xla is None else f'{xla:.4g}'})")
    if "roofline" in f:
        r, memory_s = f["roofline"], f["roofline"]["memory_s (a lower bound)"]
        lines.append(f"roofline on {r['chip']}: {r['round_s']:.3g} s per round (compute {r['compute_s']:.3g} s, "
                     f"memory >= {'-' if memory_s is None else f'{memory_s:.3g}'} s), MFU at that time {r['mfu']:.0%}"
                     " (real rounds reach a fraction of the peak: BENCHMARKS.md)")
    if p["fits"] is False and "changes" not in p:
        lines.append("does not fit: --search tries an embedding cache (data.kind=embeddings), more remat "
                     "(model.remat_policy), then a smaller per-device batch; or plan a larger topology")
    return "\n".join(lines)


def with_per_device_batch(c: ml_collections.ConfigDict, devices: list[jax.Device], n: int) -> ml_collections.ConfigDict:
    """`c` with batch_size = n x the devices the batch splits over (mesh data x fsdp) on `devices`."""
    mesh = mesh_lib.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
    return override(copy.deepcopy(c), {"batch_size": n * mesh_lib.batch_divisor(mesh)})


def out_problems(path: str) -> list[str]:
    return [f"--out={path} exists; pass another --out (nothing is overwritten)"] if os.path.exists(path) else []


def write_json(path: str, obj: dict[str, Any]) -> None:
    """Writes `obj` to a new file at `path` (an existing file is never overwritten)."""
    try:
        with open(path, "x") as f:
            json.dump(obj, f, indent=2)
    except FileExistsError as e:
        raise PlanError(f"{path} exists; pass another --out (nothing was overwritten)") from e


def format_search(result: dict[str, Any]) -> str:
    lines = ["search (each setting adds one saving to the one before):",
             f"  {'changes from the config':<70} {'peak GiB':>9}  fits"]
    for p in result["tried"]:
        peak = p["memory_per_device"]["peak"]
        lines.append(f"  {str(p['changes'] or 'none'):<70} {gib(peak):>9}  {p['fits']}"
                     + (f" ({p['error']})" if "error" in p else ""))
    best = result["best"]
    if best is None:
        lines.append("nothing tried fits: use more devices (a larger topology) or a smaller image size")
    else:
        lines += [f"the first that fits: {best['changes'] or 'the config as given'}", "", format_plan(best)]
    return "\n".join(lines)
