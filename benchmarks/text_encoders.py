"""SD3 text-encoder speed and parity: our jitted Flax NNX CLIP-L, OpenCLIP-bigG and T5 v1.1 ports vs
transformers (torch eager), fp32 and bf16, on CPU.

    python -m benchmarks.text_encoders            # mid size (about 10 min on 2 cores)
    python -m benchmarks.text_encoders --quick    # fewer layers, batch 2, 3 rounds (about 2 min)

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
     `from_pretrained(dtype=torch.bfloat16)` for torch bf16, so all four hold the same weights;
  2. checks in the same run that the outputs agree (relative error, everything against torch fp32);
  3. times per encoder the four implementations interleaved (A B C D, order reversed every other
     round), medians and the median of the per-round ratios; torch runs what SD3's `encode_prompt`
     runs (`output_hidden_states=True` for CLIP), ours the jitted model (all outputs);
  4. "total": the whole SD3 prompt encoding, ours `SD3TextEncoder.encode_tokens` (one jitted program:
     three encoders, concatenation, padding to 4096, fp32 cast) vs torch doing the same three calls
     and the same assembly as `StableDiffusion3Pipeline.encode_prompt`;
  5. XLA cost-analysis FLOPs of each of our programs and the fp32 / bf16 2048^3 matmul rate of JAX and
     torch on this CPU (standalone, before the models run), to tell slow kernels from slow models.

Thread counts: `--threads N` (default 2) sets torch.set_num_threads, OMP/MKL and XLA's intra-op pool
before jax and torch are imported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from benchmarks.common import flops_of, host, table  # standard library only


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


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Runs every fn `warmup` times, then `repeats` rounds of all fns (order reversed every other
    round); returns the wall times per fn. Each fn must block until its result is ready."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def med(xs):
    return statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num_i / den_i (robust to load that changes between rounds)."""
    return statistics.median(a / b for a, b in zip(num, den))


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


# ----------------------------------------------------------------------------- matmul rate

PEAK_N = 2048


def matmul_rates(repeats: int) -> dict[str, float]:
    """GFLOP/s of an n^3 matmul, JAX and torch, fp32 and bf16 (bf16 in, bf16 out)."""
    a = np.random.default_rng(0).standard_normal((PEAK_N, PEAK_N), np.float32)
    b = np.random.default_rng(1).standard_normal((PEAK_N, PEAK_N), np.float32)
    f = jax.jit(lambda x, y: x @ y)
    fns = {}
    for name, jd, td in (("fp32", jnp.float32, torch.float32), ("bf16", jnp.bfloat16, torch.bfloat16)):
        ja, jb = jnp.asarray(a, jd), jnp.asarray(b, jd)
        ta, tb = torch.from_numpy(a).to(td), torch.from_numpy(b).to(td)
        fns[f"jax {name}"] = lambda ja=ja, jb=jb: f(ja, jb).block_until_ready()
        fns[f"torch {name}"] = lambda ta=ta, tb=tb: torch.matmul(ta, tb)
    times = interleaved(fns, repeats, warmup=2)
    return {k: 2.0 * PEAK_N**3 / med(v) / 1e9 for k, v in times.items()}


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
    """The torch reference (fp32, and bf16 via from_pretrained) and ours (fp32, bf16) from one folder."""
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
    ref16 = cls.from_pretrained(folder, dtype=torch.bfloat16).eval()
    n_params = sum(p.numel() for p in ref.parameters())
    return dict(ref32=ref, ref16=ref16, ours32=ours32, ours16=ours16, n_params=n_params, build_s=t_build,
                load_s=t_load, attn=getattr(ref.config, "_attn_implementation", "?"),
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
    out.append(f"{PEAK_N}^3 matmul, median GFLOP/s (standalone, before the models run):\n" + table(
        ["", "JAX fp32", "torch fp32", "JAX bf16", "torch bf16"],
        [["GFLOP/s", *(f"{rates[k]:.0f}" for k in ("jax fp32", "torch fp32", "jax bf16", "torch bf16"))]]))
    log(out[-1])

    rng = np.random.default_rng(0)
    ids = {"clip_l": clip_ids(rng, b, CLIP_EOS), "clip_g": clip_ids(rng, b, CLIP_G_PAD), "t5": t5_ids(rng, b)}
    pairs, runners, info = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(arch):
            p = pairs[name] = build_pair(name, arch[name], tmp, seed=i)
            run32, c32, flops = ours_runner(p["ours32"], ids[name])
            run16, c16, _ = ours_runner(p["ours16"], ids[name])
            runners[name] = {"ours fp32": run32, "torch fp32": torch_runner(name, p["ref32"], ids[name]),
                             "ours bf16": run16, "torch bf16": torch_runner(name, p["ref16"], ids[name])}
            info[name] = dict(flops=flops, compile32=c32, compile16=c16)
            log(f"\n== {LABELS[name]}: {p['n_params']:,} params; torch attention {p['attn']!r}, torch bf16 params "
                f"{p['ref16_dtypes']}; build+save {p['build_s']:.0f}s, our two loads {p['load_s']:.1f}s; XLA compile "
                f"fp32 {c32:.1f}s, bf16 {c16:.1f}s; {flops / 1e9:.1f} GFLOP per batch (XLA cost analysis)")

    # --- parity, before timing: everything against torch fp32
    parity_rows = []
    for name in arch:
        r = runners[name]
        want = torch_outputs(name, r["torch fp32"])
        got = {"ours fp32": ours_outputs(name, r["ours fp32"]), "ours bf16": ours_outputs(name, r["ours bf16"]),
               "torch bf16": torch_outputs(name, r["torch bf16"])}
        for key in want:
            errs = [rel_err(got[k][key], want[key]) for k in ("ours fp32", "ours bf16", "torch bf16")]
            row = [LABELS[name], key, *(f"{e:.1e}" for e in errs),
                   f"{rel_err(got['ours bf16'][key], got['torch bf16'][key]):.1e}",
                   str(bool(np.isfinite(got["ours bf16"][key]).all()))]
            parity_rows.append(row)
            log(f"   parity {row}")

    # --- per-encoder timing sets
    results = {}
    for name in arch:
        log(f"\n== timing {LABELS[name]}")
        times = interleaved(runners[name], repeats)
        results[name] = times
        log("   " + ", ".join(f"{k} {fmt_ms(med(v))} ms" for k, v in times.items()))

    # --- the whole SD3 encode_prompt
    total_note = ""
    if not args.no_total:
        mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
        fns, compile_s, outs = {}, {}, {}
        for dt in ("fp32", "bf16"):
            models = {k: pairs[k]["ours32" if dt == "fp32" else "ours16"] for k in arch}
            fns[f"ours {dt}"], compile_s[dt] = ours_encode_prompt(models, ids, mesh)
            fns[f"torch {dt}"] = torch_encode_prompt({k: pairs[k]["ref32" if dt == "fp32" else "ref16"] for k in arch},
                                                     ids)
        for k, fn in fns.items():
            o = fn()
            outs[k] = (np.asarray(o.context), np.asarray(o.pooled)) if k.startswith("ours") else \
                (o[0].numpy(), o[1].numpy())
        ref_c, ref_p = outs["torch fp32"]
        errs = {k: (rel_err(c, ref_c), rel_err(p, ref_p)) for k, (c, p) in outs.items() if k != "torch fp32"}
        total_note = (f"total = SD3TextEncoder.encode_tokens (ours: one jitted program, XLA compile fp32 "
                      f"{compile_s['fp32']:.1f}s, bf16 {compile_s['bf16']:.1f}s) vs torch encode_prompt's calls + "
                      f"assembly; context [{b}, {CLIP_LEN + T5_LEN}, 4096], pooled [{b}, 2048]; rel err vs torch fp32 "
                      "(context / pooled): " + ", ".join(f"{k} {c:.1e} / {p:.1e}" for k, (c, p) in errs.items()))
        log("\n== timing total\n   " + total_note)
        order = ["ours fp32", "torch fp32", "ours bf16", "torch bf16"]
        results["total"] = interleaved({k: fns[k] for k in order}, repeats)
        log("   " + ", ".join(f"{k} {fmt_ms(med(v))} ms" for k, v in results["total"].items()))

    # --- tables
    rows = []
    for name, times in results.items():
        flops = info[name]["flops"] if name in info else sum(i["flops"] for i in info.values())
        label = "total (SD3 encode_prompt)" if name == "total" else f"{LABELS[name]} ({n[name]}/{FULL_LAYERS[name]} layers)"
        for dt in ("fp32", "bf16"):
            o, t = times[f"ours {dt}"], times[f"torch {dt}"]
            rows.append([label, dt, f"{flops / 1e9:.1f}", fmt_ms(med(o)), fmt_ms(med(t)),
                         f"{paired_ratio(t, o):.2f}", f"{flops / med(o) / 1e9:.0f}", f"{flops / med(t) / 1e9:.0f}"])
    if "total" not in results:  # sum of the parts, per round
        for dt in ("fp32", "bf16"):
            o = [sum(x) for x in zip(*(results[k][f"ours {dt}"] for k in arch))]
            t = [sum(x) for x in zip(*(results[k][f"torch {dt}"] for k in arch))]
            fl = sum(i["flops"] for i in info.values())
            rows.append(["sum of the three", dt, f"{fl / 1e9:.1f}", fmt_ms(med(o)), fmt_ms(med(t)),
                         f"{paired_ratio(t, o):.2f}", f"{fl / med(o) / 1e9:.0f}", f"{fl / med(t) / 1e9:.0f}"])
    out.append(
        f"Batch {b}, {CLIP_LEN} CLIP / {T5_LEN} T5 tokens; medians over {repeats} interleaved rounds; torch / ours is "
        "the median of per-round ratios (>1: ours faster); GFLOP = XLA cost analysis of our program (the same "
        "maths for torch); GFLOP/s = GFLOP / median time.\n"
        + table(["encoder", "dtype", "GFLOP", "ours ms", "torch ms", "torch / ours", "ours GFLOP/s", "torch GFLOP/s"],
                rows)
        + "\n" + "\n".join(
            f"- {LABELS[k]}: {pairs[k]['n_params']:,} params; our XLA compile fp32 {info[k]['compile32']:.1f}s, "
            f"bf16 {info[k]['compile16']:.1f}s; torch attention {pairs[k]['attn']!r}" for k in arch)
        + (f"\n- {total_note}" if total_note else "")
    )
    log("\n" + out[-1])
    out.append(
        "Parity (relative error ||a - b|| / ||b||, same weights and ids; the CLIP rows are what SD3 reads):\n"
        + table(["encoder", "output", "ours fp32 vs torch fp32", "ours bf16 vs torch fp32",
                 "torch bf16 vs torch fp32", "ours bf16 vs torch bf16", "ours bf16 finite"], parity_rows)
    )
    log("\n" + out[-1])
    print("\n\n# ===== summary =====\n" + machine() + "\n\n" + "\n\n".join(out))


if __name__ == "__main__":
    main()
