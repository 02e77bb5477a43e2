"""SD3 text-encoder speed and parity: our jitted Flax NNX CLIP-L, OpenCLIP-bigG and T5 v1.1 ports vs
transformers (torch eager), fp32 and bf16, on CPU.

    python -m benchmarks.text_encoders            # mid size (13-14 min on the shared 2-core VM)
    python -m benchmarks.text_encoders --quick    # fewer layers, batch 2, 3 rounds (2-4 min)

Mid size (the real widths, fewer layers where the real depth would take minutes per batch here):
  CLIP-L:         the real config (12 layers, 768 wide, 12 heads, quick_gelu, projection 768);
  OpenCLIP-bigG:  the real widths (1280, 20 heads, MLP 5120, exact gelu, projection 1280), 8 of 32 layers;
  T5 v1.1 XXL:    the real widths (d_model 4096, 64 heads x 64, gated-gelu d_ff 10240, vocab 32128),
                  2 of 24 layers;
  batch 4, 77 CLIP tokens, 256 T5 tokens (SD3's max_sequence_length).

What it does:
  1. builds each reference with transformers (`CLIPTextModelWithProjection`, `T5EncoderModel`): the
     default init, norm weights and biases perturbed by 0.05 N(0, 1); `save_pretrained`s it (fp32) to a
     temp dir and loads it with `load_clip_text` / `load_t5_encoder` in fp32 and in bf16, and with
     `from_pretrained(dtype=torch.bfloat16)` for torch bf16, so all of them hold the same weights;
  2. checks in the same run that the outputs agree (relative error, everything against torch fp32);
  3. times per encoder the implementations interleaved (A B C D E, order reversed every other
     round), medians and the median of the per-round ratios; torch runs what SD3's `encode_prompt`
     runs (`output_hidden_states=True` for CLIP), ours the jitted model (all outputs);
  4. "total": the whole SD3 prompt encoding, ours `SD3TextEncoder.encode_tokens` (one jitted program:
     three encoders, concatenation, padding to 4096, fp32 cast) vs torch doing the same three calls
     and the same assembly as `StableDiffusion3Pipeline.encode_prompt`;
  5. XLA cost-analysis FLOPs of each of our programs and the fp32 / bf16 2048^3 matmul rate of JAX and
     torch on this CPU (standalone, before the models run), to tell slow kernels from slow models;
  6. a diagnostic bf16 variant of ours, "ours bf16 f32-acc": the same bf16 weights and activations, but
     every `nnx.Linear` asks its dot for a float32 result (`preferred_element_type`) and casts it back
     to bf16. XLA:CPU (jax 0.10.2) rewrites a bf16 x bf16 -> bf16 dot into converts + an fp32 dot, while
     bf16 x bf16 -> fp32 runs a native bf16 kernel; this row measures what that is worth per model.
     It is a benchmark-only patch of the loaded models (`f32_accumulating_dots`), not the library's path.

Thread counts: `--threads N` (default 2) sets torch.set_num_threads, OMP/MKL and XLA's intra-op pool
before jax and torch are imported.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import tempfile
import time

from benchmarks.common import flops_of, host, table  # standard library only
from benchmarks.mmdit_forward import interleaved, med, paired_ratio  # the same timing protocol


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CLIP-L 4 layers, bigG 2, T5 1; batch 2; 3 rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="default 4 (--quick: 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per set; default 5 (--quick: 3)")
    p.add_argument("--clip-l-layers", type=int, default=None, help="default 12 (--quick: 4)")
    p.add_argument("--bigg-layers", type=int, default=None, help="default 8 of 32 (--quick: 2)")
    p.add_argument("--t5-layers", type=int, default=None, help="default 2 of 24 (--quick: 1)")
    p.add_argument("--no-total", action="store_true", help="skip the whole-encode_prompt timing set")
    return p.parse_args()


ARGS = _args() if __name__ == "__main__" else None
_THREADS = str(ARGS.threads if ARGS else 2)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={_THREADS}"
)
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = _THREADS
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The thread / platform flags above must be set before jax and torch are imported.
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from dpdmd_jax.models import clip as clip_lib  # noqa: E402
from dpdmd_jax.models import t5 as t5_lib  # noqa: E402
from dpdmd_jax.parallel import mesh as mesh_lib  # noqa: E402
from dpdmd_jax.text.sd3 import SD3TextEncoder, SD3Tokens  # noqa: E402
from dpdmd_jax.weights.clip import load_clip_text  # noqa: E402
from dpdmd_jax.weights.t5 import load_t5_encoder  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

# ----------------------------------------------------------------------------- configs

CLIP_LEN, T5_LEN = 77, 256  # SD3: the CLIP tokenizers' model_max_length, max_sequence_length
CLIP_BOS, CLIP_EOS, CLIP_G_PAD = 49406, 49407, 0  # CLIP-L pads with EOS, bigG with "!" (id 0)
T5_EOS, T5_PAD = 1, 0


def sizes(args) -> dict:
    q = args.quick
    pick = lambda v, full, quick: v if v is not None else (quick if q else full)
    return dict(
        batch=pick(args.batch, 4, 2), repeats=pick(args.repeats, 5, 3),
        clip_l=pick(args.clip_l_layers, 12, 4), clip_g=pick(args.bigg_layers, 8, 2), t5=pick(args.t5_layers, 2, 1),
    )


def arches(n: dict) -> dict:
    return {
        "clip_l": dict(clip_lib.PRESETS["clip-l"], num_hidden_layers=n["clip_l"]),
        "clip_g": dict(clip_lib.PRESETS["clip-bigg"], num_hidden_layers=n["clip_g"]),
        "t5": dict(t5_lib.PRESETS["t5-v1_1-xxl"], num_layers=n["t5"]),
    }


LABELS = {"clip_l": "CLIP-L", "clip_g": "OpenCLIP-bigG", "t5": "T5-XXL width"}
FULL_LAYERS = {"clip_l": 12, "clip_g": 32, "t5": 24}


# ----------------------------------------------------------------------------- timing helpers (as mmdit_forward)


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


# ----------------------------------------------------------------------------- matmul rate

PEAK_N = 2048


def matmul_rates(repeats: int) -> dict[str, float]:
    """GFLOP/s of an n^3 matmul, JAX and torch, fp32 and bf16 (bf16 in, bf16 out), and JAX bf16 in with
    a float32 result (`preferred_element_type`)."""
    a = np.random.default_rng(0).standard_normal((PEAK_N, PEAK_N), np.float32)
    b = np.random.default_rng(1).standard_normal((PEAK_N, PEAK_N), np.float32)
    f = jax.jit(lambda x, y: x @ y)
    f_acc = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    fns = {}
    for name, jd, td in (("fp32", jnp.float32, torch.float32), ("bf16", jnp.bfloat16, torch.bfloat16)):
        ja, jb = jnp.asarray(a, jd), jnp.asarray(b, jd)
        ta, tb = torch.from_numpy(a).to(td), torch.from_numpy(b).to(td)
        fns[f"jax {name}"] = lambda ja=ja, jb=jb: f(ja, jb).block_until_ready()
        fns[f"torch {name}"] = lambda ta=ta, tb=tb: torch.matmul(ta, tb)
    ja, jb = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    fns["jax bf16 f32-acc"] = lambda: f_acc(ja, jb).block_until_ready()
    times = interleaved(fns, repeats, warmup=2)
    return {k: 2.0 * PEAK_N**3 / med(v) / 1e9 for k, v in times.items()}


def hlo_dot_summary() -> str:
    """What XLA:CPU compiles a bf16 x bf16 -> bf16 matmul into: the entry computation's ops, in order."""
    x = jax.ShapeDtypeStruct((PEAK_N, PEAK_N), jnp.bfloat16)
    txt = jax.jit(lambda a, b: a @ b).lower(x, x).compile().as_text()
    ops = []
    for line in txt[txt.index("ENTRY"):].splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\w+)\[[^\]]*\]\S* (\w+)\(", line)
        if m and m.group(3) != "parameter":
            kind = re.search(r'kind=(\w+)', line)
            lib = re.search(r'"kind":"(\w+)"', line)
            ops.append(f"{m.group(1)} -> {m.group(2)}" + (f" ({kind.group(1)}" + (f" {lib.group(1)}" if lib else "")
                                                          + ")" if kind else ""))
    return "; ".join(ops)


def _f32_acc_dot(lhs, rhs, dims, precision=None, preferred_element_type=None, *, out_dtype, **kw):
    del preferred_element_type
    return jax.lax.dot_general(lhs, rhs, dims, precision=precision, preferred_element_type=jnp.float32,
                               **kw).astype(out_dtype)


def f32_accumulating_dots(model: nnx.Module) -> nnx.Module:
    """Benchmark-only: every nnx.Linear of `model` computes its dot with a float32 result, cast back to its
    compute dtype (bias added after, in that dtype, as before). Attention's own dots are unchanged."""
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.Linear):
            m.dot_general = functools.partial(_f32_acc_dot, out_dtype=m.dtype)
    return model


# ----------------------------------------------------------------------------- models and inputs


def clip_ids(rng, batch: int, pad: int) -> np.ndarray:
    """[BOS, words..., EOS, pad...] rows of different prompt lengths, as the CLIP tokenizers give."""
    rows = []
    for i in range(batch):
        n = int(np.linspace(8, CLIP_LEN - 2, batch)[i])
        row = [CLIP_BOS, *rng.integers(320, 49000, n), CLIP_EOS]
        rows.append(row + [pad] * (CLIP_LEN - len(row)))
    return np.asarray(rows, np.int64)


def t5_ids(rng, batch: int) -> np.ndarray:
    rows = []
    for i in range(batch):
        n = int(np.linspace(16, T5_LEN - 1, batch)[i])
        row = [*rng.integers(3, 32000, n), T5_EOS]
        rows.append(row + [T5_PAD] * (T5_LEN - len(row)))
    return np.asarray(rows, np.int64)


def perturb_constants(model: torch.nn.Module, seed: int) -> None:
    """Adds 0.05 N(0, 1) to every parameter the default init sets to a constant (norm weights,
    biases), so they are exercised; the random matrices keep transformers' width-scaled init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and float(p.std()) == 0.0:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def build_pair(name: str, arch: dict, tmp: str, seed: int) -> dict:
    """The torch reference (fp32, and bf16 via from_pretrained) and ours (fp32, bf16, bf16 with f32-acc dots)
    from one folder."""
    folder = os.path.join(tmp, name)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if name == "t5":
        raw = t5_lib.T5Config(**arch).to_transformers()
        hf_cfg = transformers.T5Config(**{k: v for k, v in raw.items() if k != "model_type"})
        cls = transformers.T5EncoderModel
    else:
        raw = clip_lib.CLIPTextConfig(**arch).to_transformers()
        hf_cfg = transformers.CLIPTextConfig(**{k: v for k, v in raw.items() if k != "model_type"})
        cls = transformers.CLIPTextModelWithProjection
    ref = cls(hf_cfg).eval()
    perturb_constants(ref, seed)
    ref.save_pretrained(folder)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    load = load_t5_encoder if name == "t5" else load_clip_text
    ours32 = load(folder, dtype="float32", progress=False)
    ours16 = load(folder, dtype="bfloat16", progress=False)
    t_load = time.perf_counter() - t0
    ours16acc = f32_accumulating_dots(load(folder, dtype="bfloat16", progress=False))
    ref16 = cls.from_pretrained(folder, dtype=torch.bfloat16).eval()
    n_params = sum(p.numel() for p in ref.parameters())
    return dict(ref32=ref, ref16=ref16, ours32=ours32, ours16=ours16, ours16acc=ours16acc, n_params=n_params,
                build_s=t_build, load_s=t_load, attn=getattr(ref.config, "_attn_implementation", "?"),
                ref16_dtypes=sorted({str(p.dtype) for p in ref16.parameters()}))


# ----------------------------------------------------------------------------- runners


def torch_runner(name: str, model, ids: np.ndarray):
    """What SD3's encode_prompt reads: (penultimate hidden states, text_embeds) for CLIP, the last
    hidden state for T5."""
    t = torch.from_numpy(ids)

    def run():
        with torch.inference_mode():
            if name == "t5":
                return model(input_ids=t)[0]
            out = model(input_ids=t, output_hidden_states=True)
            return out.hidden_states[-2], out.text_embeds

    return run


def torch_outputs(name: str, run) -> dict[str, np.ndarray]:
    out = run()
    if name == "t5":
        return {"last_hidden_state": out.float().numpy()}
    return {"penultimate": out[0].float().numpy(), "text_embeds": out[1].float().numpy()}


def ours_runner(model, ids: np.ndarray):
    """Jitted pure function of (state, ids), compiled ahead; returns (run, outputs, compile_s, flops)."""
    graphdef, state = nnx.split(model)
    fn = lambda st, x: nnx.merge(graphdef, st)(x)
    x = jnp.asarray(ids, jnp.int32)
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(state, x)
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
    run = lambda: jax.block_until_ready(compiled(state, x))
    return run, t_compile, flops_of(lowered)


def ours_outputs(name: str, run) -> dict[str, np.ndarray]:
    out = run()
    if name == "t5":
        return {"last_hidden_state": np.asarray(out, np.float32)}
    return {"penultimate": np.asarray(out.penultimate, np.float32),
            "text_embeds": np.asarray(out.text_embeds, np.float32)}


def torch_encode_prompt(refs: dict, ids: dict):
    """`StableDiffusion3Pipeline.encode_prompt` (one prompt per row, no CFG): the three encoders, CLIP
    penultimate states concatenated and zero-padded to T5's width, then [CLIP ; T5] on the sequence
    axis; pooled = both projected pooled vectors. fp32 out, as ours."""
    runs = {k: torch_runner(k, refs[k], ids[k]) for k in ("clip_l", "clip_g", "t5")}

    def run():
        (l_pen, l_pool), (g_pen, g_pool), t5 = runs["clip_l"](), runs["clip_g"](), runs["t5"]()
        with torch.inference_mode():
            clip = torch.cat([l_pen, g_pen], dim=-1)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            context = torch.cat([clip, t5.to(clip.dtype)], dim=-2)
            return context.float(), torch.cat([l_pool, g_pool], dim=-1).float()

    return run


def ours_encode_prompt(models: dict, ids: dict, mesh):
    enc = SD3TextEncoder({}, models, mesh, max_sequence_length=T5_LEN)
    tokens = SD3Tokens(*(mesh_lib.global_batch(mesh, ids[k].astype(np.int32)) for k in ("clip_l", "clip_g", "t5")))
    t0 = time.perf_counter()
    enc._encode.compile(enc.params, tokens)
    t_compile = time.perf_counter() - t0
    return (lambda: jax.block_until_ready(enc.encode_tokens(tokens))), t_compile


# ----------------------------------------------------------------------------- main


def machine() -> str:
    return (f"{host()}; jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"threads {torch.get_num_threads()} (torch) / intra_op_parallelism_threads={_THREADS} (XLA), "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


# implementation name -> (which model of build_pair, dtype label)
IMPLS = {"ours fp32": "ours32", "torch fp32": "ref32", "ours bf16": "ours16", "ours bf16 f32-acc": "ours16acc",
         "torch bf16": "ref16"}
ROWS = (("fp32", "ours fp32", "torch fp32"), ("bf16", "ours bf16", "torch bf16"),
        ("bf16, ours f32-acc dots (diagnostic)", "ours bf16 f32-acc", "torch bf16"))


def main():
    args = ARGS
    torch.set_num_threads(args.threads)
    n = sizes(args)
    arch = arches(n)
    b, repeats = n["batch"], n["repeats"]
    log = lambda s: print(s, flush=True)
    log(machine())
    log(f"config: batch {b}, {CLIP_LEN} CLIP / {T5_LEN} T5 tokens, {repeats} rounds; layers "
        + ", ".join(f"{LABELS[k]} {n[k]}/{FULL_LAYERS[k]}" for k in arch))
    out = []

    rates = matmul_rates(3 if args.quick else 7)
    keys = ("jax fp32", "torch fp32", "jax bf16", "torch bf16", "jax bf16 f32-acc")
    out.append(
        f"{PEAK_N}^3 matmul, median GFLOP/s (standalone, before the models run); 'JAX bf16 f32-acc' = bf16 inputs, "
        "preferred_element_type=float32:\n"
        + table(["", "JAX fp32", "torch fp32", "JAX bf16", "torch bf16", "JAX bf16 f32-acc"],
                [["GFLOP/s", *(f"{rates[k]:.0f}" for k in keys)]])
        + f"\nXLA:CPU's optimised HLO of a bf16 x bf16 -> bf16 matmul: {hlo_dot_summary()}"
    )
    log(out[-1])

    rng = np.random.default_rng(0)
    ids = {"clip_l": clip_ids(rng, b, CLIP_EOS), "clip_g": clip_ids(rng, b, CLIP_G_PAD), "t5": t5_ids(rng, b)}
    pairs, runners, info = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(arch):
            p = pairs[name] = build_pair(name, arch[name], tmp, seed=i)
            runners[name], info[name] = {}, {"compile": {}}
            for impl, key in IMPLS.items():
                if impl.startswith("ours"):
                    runners[name][impl], info[name]["compile"][impl], flops = ours_runner(p[key], ids[name])
                    info[name].setdefault("flops", flops)  # fp32 first: the model's FLOPs
                else:
                    runners[name][impl] = torch_runner(name, p[key], ids[name])
            log(f"\n== {LABELS[name]}: {p['n_params']:,} params; torch attention {p['attn']!r}, torch bf16 params "
                f"{p['ref16_dtypes']}; build+save {p['build_s']:.0f}s, our fp32 + bf16 loads {p['load_s']:.1f}s; "
                "XLA compile " + ", ".join(f"{k} {v:.1f}s" for k, v in info[name]["compile"].items())
                + f"; {info[name]['flops'] / 1e9:.1f} GFLOP per batch (XLA cost analysis)")

    # --- parity, before timing: everything against torch fp32
    parity_rows = []
    others = [k for k in IMPLS if k != "torch fp32"]
    for name in arch:
        r = runners[name]
        want = torch_outputs(name, r["torch fp32"])
        got = {k: (ours_outputs if k.startswith("ours") else torch_outputs)(name, r[k]) for k in others}
        for key in want:
            row = [LABELS[name], key, *(f"{rel_err(got[k][key], want[key]):.1e}" for k in others),
                   f"{rel_err(got['ours bf16'][key], got['torch bf16'][key]):.1e}",
                   str(all(bool(np.isfinite(got[k][key]).all()) for k in others))]
            parity_rows.append(row)
            log(f"   parity {row}")

    # --- per-encoder timing sets
    results, loads = {}, {}
    for name in arch:
        log(f"\n== timing {LABELS[name]}")
        loads[name] = [os.getloadavg()[0]]
        results[name] = interleaved(runners[name], repeats)
        loads[name].append(os.getloadavg()[0])
        log("   " + ", ".join(f"{k} {fmt_ms(med(v))} ms" for k, v in results[name].items())
            + f"; 1-min load average {loads[name][0]:.1f} -> {loads[name][1]:.1f}")

    # --- the whole SD3 encode_prompt
    total_note = ""
    if not args.no_total:
        mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
        fns, compile_s, outs = {}, {}, {}
        for impl, key in IMPLS.items():
            models = {k: pairs[k][key] for k in arch}
            if impl.startswith("ours"):
                fns[impl], compile_s[impl] = ours_encode_prompt(models, ids, mesh)
            else:
                fns[impl] = torch_encode_prompt(models, ids)
        for k, fn in fns.items():
            o = fn()
            outs[k] = (np.asarray(o.context), np.asarray(o.pooled)) if k.startswith("ours") else \
                (o[0].numpy(), o[1].numpy())
        ref_c, ref_p = outs["torch fp32"]
        errs = {k: (rel_err(c, ref_c), rel_err(p, ref_p)) for k, (c, p) in outs.items() if k != "torch fp32"}
        total_note = (
            "total = `SD3TextEncoder.encode_tokens` (ours: one jitted program; XLA compile "
            + ", ".join(f"{k} {v:.1f}s" for k, v in compile_s.items())
            + f") vs torch: encode_prompt's three calls + assembly; context [{b}, {CLIP_LEN + T5_LEN}, 4096], pooled "
            f"[{b}, 2048]; rel err vs torch fp32 (context / pooled): "
            + ", ".join(f"{k} {c:.1e} / {p:.1e}" for k, (c, p) in errs.items()))
        log("\n== timing total\n   " + total_note)
        loads["total"] = [os.getloadavg()[0]]
        results["total"] = interleaved(fns, repeats)
        loads["total"].append(os.getloadavg()[0])
        log("   " + ", ".join(f"{k} {fmt_ms(med(v))} ms" for k, v in results["total"].items())
            + f"; 1-min load average {loads['total'][0]:.1f} -> {loads['total'][1]:.1f}")

    for name, times in results.items():
        log(f"rounds {name}: " + "; ".join(f"{k} " + " ".join(fmt_ms(t) for t in v) for k, v in times.items()))

    # --- tables
    def row(label, flops, o, t, dt):
        return [label, dt, f"{flops / 1e9:.1f}", fmt_ms(med(o)), fmt_ms(med(t)), f"{paired_ratio(t, o):.2f}",
                f"{flops / med(o) / 1e9:.0f}", f"{flops / med(t) / 1e9:.0f}"]

    rows = []
    all_flops = sum(i["flops"] for i in info.values())
    for name, times in results.items():
        flops = info[name]["flops"] if name in info else all_flops
        label = ("total (SD3 encode_prompt)" if name == "total"
                 else f"{LABELS[name]} ({n[name]}/{FULL_LAYERS[name]} layers)")
        rows += [row(label, flops, times[o], times[t], dt) for dt, o, t in ROWS]
    for dt, o_name, t_name in ROWS:  # sum of the three encoders' sets, per round
        o = [sum(x) for x in zip(*(results[k][o_name] for k in arch))]
        t = [sum(x) for x in zip(*(results[k][t_name] for k in arch))]
        rows.append(row("sum of the three sets", all_flops, o, t, dt))
    out.append(
        f"Batch {b}, {CLIP_LEN} CLIP / {T5_LEN} T5 tokens; medians over {repeats} interleaved rounds; torch / ours is "
        "the median of per-round ratios (>1: ours faster); GFLOP = XLA cost analysis of our fp32 program (the "
        "same maths for torch); GFLOP/s = GFLOP / median time.\n"
        + table(["encoder", "dtype", "GFLOP", "ours ms", "torch ms", "torch / ours", "ours GFLOP/s", "torch GFLOP/s"],
                rows)
        + "\n" + "\n".join(
            f"- {LABELS[k]}: {pairs[k]['n_params']:,} params; our XLA compile "
            + ", ".join(f"{i} {v:.1f}s" for i, v in info[k]["compile"].items())
            + f"; torch attention {pairs[k]['attn']!r}" for k in arch)
        + (f"\n- {total_note}" if total_note else "")
        + "\n- 1-min load average at the start -> end of each timing set (this job alone keeps it near "
        f"{args.threads}): " + ", ".join(f"{k} {a:.1f} -> {z:.1f}" for k, (a, z) in loads.items())
        + "; per-round times of every set: see the log lines 'rounds'."
    )
    log("\n" + out[-1])
    out.append(
        "Parity (relative error ||a - b|| / ||b||, same weights and ids; the CLIP outputs are what SD3 reads):\n"
        + table(["encoder", "output", *(f"{k} vs torch fp32" for k in others), "ours bf16 vs torch bf16",
                 "all finite"], parity_rows)
    )
    log("\n" + out[-1])
    print("\n\n# ===== summary =====\n" + machine() + "\n\n" + "\n\n".join(out))


if __name__ == "__main__":
    main()
