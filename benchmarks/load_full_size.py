"""Host memory and wall time of loading a full-size bf16 checkpoint: the SD3.5-Medium transformer
(default) or SD3's T5-XXL text encoder (`--model t5-xxl`).

    python -m benchmarks.load_full_size                          # SD3.5-M: ~5 GB checkpoint, ~10 GB free RAM needed
    python -m benchmarks.load_full_size --quick                  # same widths, 4 layers (~1.2 GB checkpoint)
    python -m benchmarks.load_full_size --model t5-xxl           # T5-XXL: ~9.5 GB in 2 shards, ~20 GB free RAM
    python -m benchmarks.load_full_size --model t5-xxl --quick   # same widths, 4 layers (~1.8 GB)

Steps, each in its own fresh subprocess so every RSS figure is that process's alone:
  1. `make`: a random reference model with the real config, built directly in bf16 (default dtype
     bf16, never an fp32 copy) and `save_pretrained` to a temp dir as the released checkpoint is laid
     out: the SD3.5-M `SD3Transformer2DModel` (`PRESETS["sd3.5-medium"]`, ~4.5 GB) as one safetensors
     file; the T5-XXL `T5EncoderModel` (`PRESETS["t5-v1_1-xxl"]`, ~9.5 GB) sharded with
     max_shard_size="5GB" plus model.safetensors.index.json, as SD3's text_encoder_3;
  2. `baseline-ours`: RSS of a process that imports jax + our loader module (`dpdmd_jax.weights.sd3` /
     `.t5`) and initialises the CPU backend (nothing loaded);
  3. `ours`: `load_mmdit(folder, dtype="bfloat16")` / `load_t5_encoder(folder, dtype="bfloat16")`: wall
     time, peak RSS (getrusage ru_maxrss and /proc/self/status VmHWM), VmRSS sampled every 10 ms by a
     thread (peak and when); `ours-abstract`: only the config + abstract-model step (no tensor read);
  4. the reference's baseline and load: `SD3Transformer2DModel.from_pretrained(folder,
     torch_dtype=torch.bfloat16)` (steps `baseline-diffusers` / `diffusers`) or
     `T5EncoderModel.from_pretrained(folder, dtype=torch.bfloat16)` (`baseline-transformers` /
     `transformers`; `dtype` is transformers 5's name for `torch_dtype`).
The checkpoint is deleted at the end (also on failure). Ratios: peak RSS / checkpoint size, and
(peak RSS - baseline RSS) / checkpoint size; the loader's aim is <= 1.5x. A watchdog in the driver
kills a child (by its pid) if the machine's MemAvailable falls below `--min-available-gib` (default
1.5), so an out-of-memory load is reported instead of waking the kernel's OOM killer on a shared box.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.common import host, table  # standard library only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the children run from here

GiB = 2**30


# ----------------------------------------------------------------------------- memory probes


def proc_status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile (bytes) of this process from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class RssSampler:
    """Samples VmRSS every `period` s in a thread; `.peak` and `.peak_t` (s after start)."""

    def __init__(self, period: float = 0.01):
        import threading

        self.period, self.peak, self.peak_t, self._stop = period, 0, 0.0, False
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop:
            rss = proc_status()["VmRSS"]
            if rss > self.peak:
                self.peak, self.peak_t = rss, time.perf_counter() - self._t0
            time.sleep(self.period)

    def __enter__(self):
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def emit(d: dict) -> None:
    print("RESULT " + json.dumps(d), flush=True)


# ----------------------------------------------------------------------------- children


def child_make(folder: str, quick: bool) -> None:
    import torch
    from diffusers import SD3Transformer2DModel

    from dpdmd_jax.models.mmdit import PRESETS, MMDiTConfig

    torch.set_num_threads(os.cpu_count() or 1)
    arch = dict(PRESETS["sd3.5-medium"])
    if quick:
        arch.update(num_layers=4, dual_attention_layers=(0, 1))
    config = {k: v for k, v in MMDiTConfig(**arch).to_diffusers().items() if not k.startswith("_")}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # parameters are created in bf16: no fp32 copy
    model = SD3Transformer2DModel(**config).to(torch.bfloat16).eval()
    torch.set_default_dtype(torch.float32)
    t_build = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="20GB")
    t_save = time.perf_counter() - t0
    emit(dict(step="make", n_params=n_params, build_s=t_build, save_s=t_save, maxrss=maxrss(),
              dtypes=sorted({str(p.dtype) for p in model.state_dict().values()})))


def child_make_t5(folder: str, quick: bool) -> None:
    import torch
    import transformers

    from dpdmd_jax.models.t5 import PRESETS, T5Config

    torch.set_num_threads(os.cpu_count() or 1)
    arch = dict(PRESETS["t5-v1_1-xxl"])
    if quick:
        arch.update(num_layers=4)
    raw = T5Config(**arch).to_transformers()
    config = transformers.T5Config(**{k: v for k, v in raw.items() if k != "model_type"})
    t0 = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # parameters are created (and initialised) in bf16: no fp32 copy
    model = transformers.T5EncoderModel(config).to(torch.bfloat16).eval()
    torch.set_default_dtype(torch.float32)
    t_build = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())  # the tied shared / embed_tokens table once
    t0 = time.perf_counter()
    model.save_pretrained(folder, max_shard_size="5GB")  # sharded + index, as SD3's text_encoder_3
    t_save = time.perf_counter() - t0
    emit(dict(step="make", n_params=n_params, build_s=t_build, save_s=t_save, maxrss=maxrss(),
              dtypes=sorted({str(p.dtype) for p in model.state_dict().values()})))


def _init_jax_backend():
    import jax
    import jax.numpy as jnp

    jax.devices()
    jnp.zeros(8).block_until_ready()


def _our_module(model: str):
    if model == "t5-xxl":
        import dpdmd_jax.weights.t5 as mod
    else:
        import dpdmd_jax.weights.sd3 as mod
    return mod


def child_baseline_ours(model: str) -> None:
    t0 = time.perf_counter()
    _our_module(model)  # jax, flax, numpy, ml_dtypes, tqdm

    _init_jax_backend()
    heavy = sorted(m for m in ("tensorflow", "torch", "orbax", "tensorstore", "clu") if m in sys.modules)
    emit(dict(step="baseline-ours", import_s=time.perf_counter() - t0, **proc_status(), maxrss=maxrss(),
              heavy_modules_imported=heavy))


def child_ours(folder: str, model_name: str = "sd3.5-medium", step: str = "ours") -> None:
    mod = _our_module(model_name)

    _init_jax_backend()
    import jax
    from flax import nnx

    load = mod.load_t5_encoder if model_name == "t5-xxl" else mod.load_mmdit
    before = proc_status()
    with RssSampler() as s:
        t0 = time.perf_counter()
        model = load(folder, dtype="bfloat16", progress=False)
        jax.block_until_ready(nnx.state(model))
        wall = time.perf_counter() - t0
    leaves = jax.tree.leaves(nnx.state(model))
    emit(dict(step=step, wall_s=wall, rss_before=before["VmRSS"], hwm_before=before["VmHWM"],
              maxrss=maxrss(), **proc_status(), sampled_peak=s.peak, sampled_peak_t=s.peak_t,
              state_bytes=sum(x.nbytes for x in leaves), dtypes=sorted({str(x.dtype) for x in leaves})))


def child_ours_phases(folder: str) -> None:
    """Where `load_t5_encoder`'s time goes: the per-tensor steps of `loader.load_state` timed one by one
    (read the bytes, layout change + dtype cast on the host, `device_put`), each result dropped at once."""
    import numpy as np

    import dpdmd_jax.weights.t5 as t5w
    from dpdmd_jax.weights.safetensors_io import index_checkpoint, read_tensor

    _init_jax_backend()
    import jax
    from flax import nnx

    from dpdmd_jax.models.t5 import T5Encoder

    folder = t5w.component_folder(folder, t5w.PIPELINE_SUBFOLDER)
    cfg = t5w.read_config(folder, dtype="bfloat16", param_dtype="bfloat16")
    tensors = index_checkpoint(folder, t5w.WEIGHTS_PREFIX)
    _, abstract = nnx.split(nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0))))
    sources = t5w.key_map(cfg, abstract, t5w.embedding_keys_in(tensors))
    device = jax.devices()[0]
    t = dict(read_s=0.0, transform_cast_s=0.0, device_put_s=0.0)
    n_bytes = 0
    t_all = time.perf_counter()
    for path, var in nnx.to_flat_state(abstract):
        src, target = sources[path], var.get_value()
        t0 = time.perf_counter()
        raw = read_tensor(tensors[src.keys[0]])
        t1 = time.perf_counter()
        host = src.transform(raw).astype(target.dtype)
        t2 = time.perf_counter()
        jax.block_until_ready(jax.device_put(host, device))
        t3 = time.perf_counter()
        t["read_s"] += t1 - t0
        t["transform_cast_s"] += t2 - t1
        t["device_put_s"] += t3 - t2
        n_bytes += raw.nbytes
        del raw, host
    emit(dict(step="ours-phases", **t, total_s=time.perf_counter() - t_all, bytes=n_bytes,
              numpy=np.__version__))


def child_ours_abstract(folder: str, model: str = "sd3.5-medium") -> None:
    """Only what the loader does before reading any tensor: config + abstract model (eval_shape)."""
    mod = _our_module(model)

    _init_jax_backend()
    before = proc_status()
    t0 = time.perf_counter()
    if model == "t5-xxl":
        from flax import nnx

        from dpdmd_jax.models.t5 import T5Encoder

        cfg = mod.read_config(mod.component_folder(folder, mod.PIPELINE_SUBFOLDER), dtype="bfloat16",
                              param_dtype="bfloat16")
        nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))
    else:
        cfg = mod.read_config(mod.resolve_folder(folder), dtype="bfloat16", param_dtype="bfloat16")
        mod.abstract_mmdit(cfg)
    emit(dict(step="ours-abstract", wall_s=time.perf_counter() - t0, rss_before=before["VmRSS"], **proc_status(),
              maxrss=maxrss()))


def child_baseline_diffusers() -> None:
    t0 = time.perf_counter()
    import torch  # noqa: F401
    from diffusers import SD3Transformer2DModel  # noqa: F401

    emit(dict(step="baseline-diffusers", import_s=time.perf_counter() - t0, **proc_status(), maxrss=maxrss()))


def _torch_state_bytes(sd) -> int:
    """Bytes of a state dict, each storage once (T5's tied shared / encoder.embed_tokens appear twice)."""
    seen = {}
    for t in sd.values():
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def child_diffusers(folder: str) -> None:
    import torch
    from diffusers import SD3Transformer2DModel

    before = proc_status()
    with RssSampler() as s:
        t0 = time.perf_counter()
        model = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
        wall = time.perf_counter() - t0
    sd = model.state_dict()
    emit(dict(step="diffusers", wall_s=wall, rss_before=before["VmRSS"], hwm_before=before["VmHWM"],
              maxrss=maxrss(), **proc_status(), sampled_peak=s.peak, sampled_peak_t=s.peak_t,
              state_bytes=sum(t.numel() * t.element_size() for t in sd.values()),
              dtypes=sorted({str(t.dtype) for t in sd.values()})))


def child_baseline_transformers() -> None:
    t0 = time.perf_counter()
    import torch  # noqa: F401
    from transformers import T5EncoderModel  # noqa: F401

    emit(dict(step="baseline-transformers", import_s=time.perf_counter() - t0, **proc_status(), maxrss=maxrss()))


def child_transformers(folder: str) -> None:
    """from_pretrained, then one read of every weight. transformers 5 leaves the parameters as views of
    the mmap'd safetensors files, so `from_pretrained` returns before most bytes are read; the second
    phase faults every page in (`tensor.max()` per tensor), as the first forward would."""
    import torch
    from transformers import T5EncoderModel

    before = proc_status()
    with RssSampler() as s:
        t0 = time.perf_counter()
        model = T5EncoderModel.from_pretrained(folder, dtype=torch.bfloat16)
        wall = time.perf_counter() - t0
    returned = dict(proc_status(), maxrss=maxrss())
    sd = model.state_dict()
    with RssSampler() as s2, torch.no_grad():
        t0 = time.perf_counter()
        for t in sd.values():
            t.max()
        touch = time.perf_counter() - t0
    emit(dict(step="transformers", wall_s=wall, rss_before=before["VmRSS"], hwm_before=before["VmHWM"],
              returned=dict(returned, sampled_peak=s.peak, sampled_peak_t=s.peak_t),
              touch_s=touch, maxrss=maxrss(), **proc_status(), sampled_peak=max(s.peak, s2.peak),
              sampled_peak_t=s.peak_t if s.peak >= s2.peak else wall + s2.peak_t,
              state_bytes=_torch_state_bytes(sd), dtypes=sorted({str(t.dtype) for t in sd.values()})))


CHILDREN = {
    "make": lambda a: (child_make_t5 if a.model == "t5-xxl" else child_make)(a.folder, a.quick),
    "baseline-ours": lambda a: child_baseline_ours(a.model),
    "ours-abstract": lambda a: child_ours_abstract(a.folder, a.model),
    "ours": lambda a: child_ours(a.folder, a.model),
    "ours-phases": lambda a: child_ours_phases(a.folder),
    "baseline-diffusers": lambda a: child_baseline_diffusers(),
    "diffusers": lambda a: child_diffusers(a.folder),
    "baseline-transformers": lambda a: child_baseline_transformers(),
    "transformers": lambda a: child_transformers(a.folder),
}

# model -> (temp-dir prefix, component folder name, name in the summary, reference steps and table label)
MODELS = {
    "sd3.5-medium": dict(prefix="sd35m_bf16_", component="transformer", what="SD3.5-Medium",
                         ref_steps=("baseline-diffusers", "diffusers"), ours_label="ours: load_mmdit(bf16)",
                         ref_label="diffusers from_pretrained(bf16)", imports="torch+diffusers"),
    "t5-xxl": dict(prefix="t5xxl_bf16_", component="text_encoder_3", what="T5-XXL encoder (t5-v1_1-xxl)",
                   ref_steps=("baseline-transformers", "transformers"), ours_label="ours: load_t5_encoder(bf16)",
                   ref_label="transformers T5EncoderModel.from_pretrained(bf16)", imports="torch+transformers"),
}


# ----------------------------------------------------------------------------- driver


def mem_available() -> int:
    """MemAvailable of the machine (bytes)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(step: str, folder: str, quick: bool, model: str = "sd3.5-medium", min_available: float = 1.5) -> dict:
    """Runs one step in a fresh process. While it runs, a watchdog kills it (its pid only) if the
    machine's MemAvailable drops below `min_available` GiB; that is reported as a failure."""
    cmd = [sys.executable, "-m", "benchmarks.load_full_size", "--child", step, "--folder", folder, "--model", model]
    cmd += ["--quick"] if quick else []
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3")
    avail0 = mem_available()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=ROOT)
        low, killed = avail0, False
        while proc.poll() is None:
            avail = mem_available()
            low = min(low, avail)
            if avail < min_available * GiB:
                proc.kill()
                killed = True
                proc.wait()
                break
            time.sleep(0.1)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if killed:
        raise RuntimeError(f"child {step} killed by the watchdog: MemAvailable {low / GiB:.2f} GiB < "
                           f"{min_available} GiB (it was {avail0 / GiB:.2f} GiB at the start)\n{stderr[-3000:]}")
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {step} failed (rc {proc.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["process_s"] = time.perf_counter() - t0
    out["mem_available_start"], out["mem_available_min"] = avail0, low
    print(f"  {step}: {json.dumps(out)}", flush=True)
    return out


def gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def machine() -> str:
    import platform

    vers = subprocess.run(
        [sys.executable, "-c",
         "import jax, torch, diffusers, transformers; "
         "print(jax.__version__, torch.__version__, diffusers.__version__, transformers.__version__)"],
        capture_output=True, text=True).stdout.split()
    return (f"{host()}, python {platform.python_version()}; "
            f"jax {vers[0]}, torch {vers[1]}, diffusers {vers[2]}, transformers {vers[3]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="sd3.5-medium")
    p.add_argument("--quick", action="store_true", help="4 layers instead of 24 (same widths)")
    p.add_argument("--dir", default=None, help="parent folder for the temp checkpoint (default: $TMPDIR)")
    p.add_argument("--min-available-gib", type=float, default=1.5,
                   help="kill a child when the machine's MemAvailable drops below this")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        CHILDREN[args.child](args)
        return

    spec = MODELS[args.model]
    print(machine(), flush=True)
    print(f"  MemAvailable at start: {mem_available() / GiB:.2f} GiB", flush=True)
    tmp = tempfile.mkdtemp(prefix=spec["prefix"], dir=args.dir)
    folder = os.path.join(tmp, spec["component"])
    run = lambda step: run_child(step, folder, args.quick, args.model, args.min_available_gib)
    try:
        made = run("make")
        files = sorted(os.listdir(folder))
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
        shards = [f for f in files if f.endswith(".safetensors")]
        print(f"  checkpoint {folder}: {files}, {size / GiB:.2f} GiB ({size:,} bytes)", flush=True)
        base_o = run("baseline-ours")
        abstract = run("ours-abstract")
        ours = run("ours")
        base_r = run(spec["ref_steps"][0])
        ref = run(spec["ref_steps"][1])
        phases = run("ours-phases") if args.model == "t5-xxl" else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"  deleted {tmp}", flush=True)

    def row(name, r, b, wall, r_end):
        peak = max(r_end["VmHWM"], r_end["maxrss"], r_end["sampled_peak"])
        return [
            name, f"{wall:.1f}", gib(b["VmRSS"]), gib(r["rss_before"]), gib(r_end["maxrss"]), gib(r_end["VmHWM"]),
            f"{gib(r_end['sampled_peak'])} @{r_end['sampled_peak_t']:.1f}s", gib(r_end["VmRSS"]),
            gib(r_end.get("RssFile", 0)), gib(r["state_bytes"]),
            f"{peak / size:.2f}", f"{(peak - b['VmRSS']) / size:.2f}", f"{(peak - r['rss_before']) / size:.2f}",
        ]

    rows = [row(spec["ours_label"], ours, base_o, ours["wall_s"], ours)]
    if "returned" in ref:  # transformers: as from_pretrained returns (mmap'd), then after one read of every weight
        rows.append(row(spec["ref_label"] + ", as returned", ref, base_r, ref["wall_s"], ref["returned"]))
        rows.append(row(spec["ref_label"] + ", + one read of every weight", ref, base_r,
                        ref["wall_s"] + ref["touch_s"], ref))
    else:
        rows.append(row(spec["ref_label"], ref, base_r, ref["wall_s"], ref))
    hdr = ["loader", "wall s", "import-only RSS GiB", "RSS before load GiB", "ru_maxrss GiB", "VmHWM GiB",
           "sampled peak GiB", "RSS after GiB", "of which file-backed GiB", "weights held GiB", "peak/ckpt",
           "(peak-import-only)/ckpt", "(peak-before)/ckpt"]
    what = f"{spec['what']} (4 layers, --quick)" if args.quick else spec["what"]
    extra = " + pos-embed buffer" if args.model == "sd3.5-medium" else ""
    summary = (
        f"{what} random bf16 checkpoint: {made['n_params']:,} parameters{extra}, "
        f"{size / GiB:.2f} GiB on disk ({len(shards)} safetensors file(s)); made in {made['build_s']:.0f}s build + "
        f"{made['save_s']:.0f}s save (make peak RSS {gib(made['maxrss'])} GiB).\n"
        f"import-only baselines: ours {gib(base_o['VmRSS'])} GiB (heavy modules "
        f"imported: {base_o['heavy_modules_imported'] or 'none'}, {base_o['import_s']:.1f}s), {spec['imports']} "
        f"{gib(base_r['VmRSS'])} GiB ({base_r['import_s']:.1f}s).\n"
        f"ours, abstract model only (config + nnx.eval_shape, no tensor read): {abstract['wall_s']:.1f}s, peak "
        f"{gib(abstract['VmHWM'])} GiB, RSS after {gib(abstract['VmRSS'])} GiB.\n"
        f"weights dtypes: ours {ours['dtypes']}, reference {ref['dtypes']}; machine MemAvailable at each load's "
        f"start / lowest during it: ours {gib(ours['mem_available_start'])} / {gib(ours['mem_available_min'])} GiB, "
        f"reference {gib(ref['mem_available_start'])} / {gib(ref['mem_available_min'])} GiB.\n" + table(hdr, rows)
    )
    if phases:
        gb = phases["bytes"] / 1e9
        summary += (
            f"\nours, the loader's per-tensor steps timed one by one (fresh process, after the loads above): "
            f"read {phases['read_s']:.1f}s ({gb / phases['read_s']:.2f} GB/s), layout change + cast on the host "
            f"{phases['transform_cast_s']:.1f}s, device_put {phases['device_put_s']:.1f}s; "
            f"total {phases['total_s']:.1f}s for {gb:.2f} GB (numpy {phases['numpy']})."
        )
    print("\n\n# ===== summary =====\n" + machine() + "\n\n" + summary)


if __name__ == "__main__":
    main()
