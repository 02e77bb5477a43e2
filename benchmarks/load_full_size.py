"""Host memory and wall time of loading a full-size SD3.5-Medium transformer checkpoint (bf16).

    python -m benchmarks.load_full_size            # full size: ~5 GB checkpoint, ~10 GB free RAM needed
    python -m benchmarks.load_full_size --quick    # same widths, 4 layers (~1.2 GB checkpoint)

Steps, each in its own fresh subprocess so every RSS figure is that process's alone:
  1. `make`: a random `SD3Transformer2DModel` with the real SD3.5-M config (`PRESETS["sd3.5-medium"]`),
     built directly in bf16 (default dtype bf16: ~4.5 GB, never an fp32 copy), `save_pretrained`
     to a temp dir (single safetensors file, as the released checkpoint);
  2. `baseline-ours`: RSS of a process that imports jax + `dpdmd_jax.weights.sd3` and initialises
     the CPU backend (nothing loaded);
  3. `ours`: `load_mmdit(folder, dtype="bfloat16")`: wall time, peak RSS (getrusage ru_maxrss and
     /proc/self/status VmHWM), VmRSS sampled every 10 ms by a thread (peak and when);
     `ours-abstract`: only the config + abstract-model step of load_mmdit (no tensor read);
  4. `baseline-diffusers` / `diffusers`: the same for `SD3Transformer2DModel.from_pretrained(folder,
     torch_dtype=torch.bfloat16)`.
The checkpoint is deleted at the end (also on failure). Ratios: peak RSS / checkpoint size, and
(peak RSS - baseline RSS) / checkpoint size; the loader's aim is <= 1.5x.
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
    """VmRSS / VmHWM (bytes) of this process from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
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


def _init_jax_backend():
    import jax
    import jax.numpy as jnp

    jax.devices()
    jnp.zeros(8).block_until_ready()


def child_baseline_ours() -> None:
    t0 = time.perf_counter()
    import dpdmd_jax.weights.sd3  # noqa: F401  (jax, flax, numpy, ml_dtypes, tqdm)

    _init_jax_backend()
    heavy = sorted(m for m in ("tensorflow", "torch", "orbax", "tensorstore", "clu") if m in sys.modules)
    emit(dict(step="baseline-ours", import_s=time.perf_counter() - t0, **proc_status(), maxrss=maxrss(),
              heavy_modules_imported=heavy))


def child_ours(folder: str, step: str = "ours") -> None:
    import dpdmd_jax.weights.sd3 as sd3

    _init_jax_backend()
    import jax
    from flax import nnx

    before = proc_status()
    with RssSampler() as s:
        t0 = time.perf_counter()
        model = sd3.load_mmdit(folder, dtype="bfloat16", progress=False)
        jax.block_until_ready(nnx.state(model))
        wall = time.perf_counter() - t0
    leaves = jax.tree.leaves(nnx.state(model))
    emit(dict(step=step, wall_s=wall, rss_before=before["VmRSS"], hwm_before=before["VmHWM"],
              maxrss=maxrss(), **proc_status(), sampled_peak=s.peak, sampled_peak_t=s.peak_t,
              state_bytes=sum(x.nbytes for x in leaves), dtypes=sorted({str(x.dtype) for x in leaves})))


def child_ours_abstract(folder: str) -> None:
    """Only what load_mmdit does before reading any tensor: config + abstract model (eval_shape)."""
    import dpdmd_jax.weights.sd3 as sd3

    _init_jax_backend()
    before = proc_status()
    t0 = time.perf_counter()
    cfg = sd3.read_config(sd3.resolve_folder(folder), dtype="bfloat16", param_dtype="bfloat16")
    sd3.abstract_mmdit(cfg)
    emit(dict(step="ours-abstract", wall_s=time.perf_counter() - t0, rss_before=before["VmRSS"], **proc_status(),
              maxrss=maxrss()))


def child_baseline_diffusers() -> None:
    t0 = time.perf_counter()
    import torch  # noqa: F401
    from diffusers import SD3Transformer2DModel  # noqa: F401

    emit(dict(step="baseline-diffusers", import_s=time.perf_counter() - t0, **proc_status(), maxrss=maxrss()))


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


CHILDREN = {
    "make": lambda a: child_make(a.folder, a.quick),
    "baseline-ours": lambda a: child_baseline_ours(),
    "ours-abstract": lambda a: child_ours_abstract(a.folder),
    "ours": lambda a: child_ours(a.folder),
    "baseline-diffusers": lambda a: child_baseline_diffusers(),
    "diffusers": lambda a: child_diffusers(a.folder),
}


# ----------------------------------------------------------------------------- driver


def run_child(step: str, folder: str, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.load_full_size", "--child", step, "--folder", folder]
    cmd += ["--quick"] if quick else []
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {step} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["process_s"] = time.perf_counter() - t0
    print(f"  {step}: {json.dumps(out)}", flush=True)
    return out


def gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def machine() -> str:
    import platform

    vers = subprocess.run(
        [sys.executable, "-c",
         "import jax, torch, diffusers; print(jax.__version__, torch.__version__, diffusers.__version__)"],
        capture_output=True, text=True).stdout.split()
    return (f"{host()}, python {platform.python_version()}; "
            f"jax {vers[0]}, torch {vers[1]}, diffusers {vers[2]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 layers instead of 24 (same widths)")
    p.add_argument("--dir", default=None, help="parent folder for the temp checkpoint (default: $TMPDIR)")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        CHILDREN[args.child](args)
        return

    print(machine(), flush=True)
    tmp = tempfile.mkdtemp(prefix="sd35m_bf16_", dir=args.dir)
    folder = os.path.join(tmp, "transformer")
    try:
        made = run_child("make", folder, args.quick)
        files = sorted(os.listdir(folder))
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
        print(f"  checkpoint {folder}: {files}, {size / GiB:.2f} GiB ({size:,} bytes)", flush=True)
        base_o = run_child("baseline-ours", folder, args.quick)
        abstract = run_child("ours-abstract", folder, args.quick)
        ours = run_child("ours", folder, args.quick)
        base_d = run_child("baseline-diffusers", folder, args.quick)
        diff = run_child("diffusers", folder, args.quick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"  deleted {tmp}", flush=True)

    rows = []
    for name, r, b in (("ours: load_mmdit(bf16)", ours, base_o),
                       ("diffusers from_pretrained(bf16)", diff, base_d)):
        peak = max(r["VmHWM"], r["maxrss"], r["sampled_peak"])
        rows.append([
            name, f"{r['wall_s']:.1f}", gib(b["VmRSS"]), gib(r["rss_before"]), gib(r["maxrss"]), gib(r["VmHWM"]),
            f"{gib(r['sampled_peak'])} @{r['sampled_peak_t']:.1f}s", gib(r["VmRSS"]), gib(r["state_bytes"]),
            f"{peak / size:.2f}", f"{(peak - b['VmRSS']) / size:.2f}", f"{(peak - r['rss_before']) / size:.2f}",
        ])
    hdr = ["loader", "wall s", "import-only RSS GiB", "RSS before load GiB", "ru_maxrss GiB", "VmHWM GiB",
           "sampled peak GiB", "RSS after GiB", "weights in memory GiB", "peak/ckpt",
           "(peak-import-only)/ckpt", "(peak-before)/ckpt"]
    what = "SD3.5-Medium (4 layers, --quick)" if args.quick else "SD3.5-Medium"
    summary = (
        f"{what} random bf16 checkpoint: {made['n_params']:,} parameters + pos-embed buffer, "
        f"{size / GiB:.2f} GiB on disk ({len(files) - 1} safetensors file(s)); made in {made['build_s']:.0f}s build + "
        f"{made['save_s']:.0f}s save.\nimport-only baselines: ours {gib(base_o['VmRSS'])} GiB (heavy modules "
        f"imported: {base_o['heavy_modules_imported'] or 'none'}, {base_o['import_s']:.1f}s), torch+diffusers "
        f"{gib(base_d['VmRSS'])} GiB ({base_d['import_s']:.1f}s).\n"
        f"ours, abstract model only (config + nnx.eval_shape, no tensor read): {abstract['wall_s']:.1f}s, peak "
        f"{gib(abstract['VmHWM'])} GiB, RSS after {gib(abstract['VmRSS'])} GiB.\n" + table(hdr, rows)
    )
    print("\n\n# ===== summary =====\n" + machine() + "\n\n" + summary)


if __name__ == "__main__":
    main()
