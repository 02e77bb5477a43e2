"""Plans of the shipped configs for TPU topologies (docs/benchmarks/plans.md): each row is one
`python -m dpdmd_jax.plan` run (a child process: libtpu on this CPU host), its JSON kept in --out.

    python -m benchmarks.plans --out=plans/                  # every row of ROWS (hours on 2 cores)
    python -m benchmarks.plans --out=plans/ --only=sd35_v5p8_full   # one row
    python -m benchmarks.plans --out=plans/ --table            # the table of what --out holds
    python -m benchmarks.plans --out=plans/ --refresh-flops    # recount stored plans' FLOPs (no compile)

A row whose JSON exists is not planned again (delete it to redo it).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

B4 = ["--per_device_batch=4"]  # the paper's batch per chip
SD35, SDXL = "--config=configs/sd35.py", "--config=configs/sdxl.py"
V5P8, V6E8 = "--target=tpu:v5p:2x2x1", "--target=tpu:v6e:2x4"  # 4 and 8 chips
V4_8, V5E16 = "--target=tpu:v4:2x2x1", "--target=tpu:v5e:4x4"  # 4 and 16 chips
FULL, DNB = "--config.model.remat_policy=full", "--config.model.remat_policy=dots_no_batch"
V5P1, EMB = "--target=tpu:v5p:1x1x1", "--config.data.kind=embeddings"  # one chip; an embedding cache
ROWS = {  # name -> plan flags (remat named, whatever the config's default)
    "sd35_v5p8_dots_no_batch": [SD35, V5P8, *B4, DNB],
    "sd35_v5p8_full": [SD35, V5P8, *B4, FULL],
    "sdxl_v5p8_dots_no_batch": [SDXL, V5P8, *B4, DNB],
    "sdxl_v5p8_full": [SDXL, V5P8, *B4, FULL],
    "sd35_v5p8_full_embeddings": [SD35, V5P8, *B4, FULL, "--config.data.kind=embeddings"],
    "sd35_v6e8_full": [SD35, V6E8, *B4, FULL],
    "sd35_v4_8_full": [SD35, V4_8, *B4, FULL],
    "sd35_v5e16_full_search": [SD35, V5E16, *B4, FULL, "--search"],
    "sd35_v6e8_full_search": [SD35, V6E8, *B4, FULL, "--search"],
    "sd35_v4_8_full_search": [SD35, V4_8, *B4, FULL, "--search"],
    "sdxl_v6e8_full": [SDXL, V6E8, *B4, FULL],
    "sdxl_v4_8_full": [SDXL, V4_8, *B4, FULL],
    "sdxl_v5e16_full_search": [SDXL, V5E16, *B4, FULL, "--search"],
    "sdxl_v6e8_full_search": [SDXL, V6E8, *B4, FULL, "--search"],
    "sdxl_v4_8_full_search": [SDXL, V4_8, *B4, FULL, "--search"],
    "sdxl_v5e16_b1_embeddings": [SDXL, V5E16, "--per_device_batch=1", FULL, EMB],  # the search's likely end
    # The v6e-8 search's third step on its own (its first two: out of memory); no verdict yet: plans.md.
    "sdxl_v6e8_b2_embeddings": [SDXL, V6E8, "--per_device_batch=2", FULL, EMB],
    "sdxl_v5e16_b2_embeddings": [SDXL, V5E16, "--per_device_batch=2", FULL, EMB],  # does 2 per chip fit?
    # One chip: LoRA (`:lora`, rank R, bf16 base) against full fine-tuning, from an embedding cache
    # (a one-accelerator run would not keep T5-XXL beside the round).
    "sd35_v5p1_full_embeddings": [SD35, V5P1, *B4, FULL, EMB],
    **{f"sd35_v5p1_lora{r}_embeddings": [f"{SD35}:lora={r}", V5P1, *B4, FULL, EMB] for r in (16, 64, 128)},
    "sdxl_v5p1_lora64_embeddings": [f"{SDXL}:lora=64", V5P1, *B4, FULL, EMB],
    # The largest batch one chip holds with LoRA (the round's activations grow with it), and 8 chips.
    **{f"sd35_v5p1_lora64_b{b}_embeddings": [f"{SD35}:lora=64", V5P1, f"--per_device_batch={b}", FULL, EMB]
       for b in (8, 9, 10, 11, 12)},
    "sd35_v5p16_lora64_embeddings": [f"{SD35}:lora=64", "--target=tpu:v5p:2x2x2", *B4, FULL, EMB],  # 8 chips
    "sdxl_v5p1_full_embeddings": [SDXL, V5P1, *B4, FULL, EMB],
    "sdxl_v5p16_lora64_embeddings": [f"{SDXL}:lora=64", "--target=tpu:v5p:2x2x2", *B4, FULL, EMB],
    **{f"sdxl_v5p1_lora{r}_embeddings": [f"{SDXL}:lora={r}", V5P1, *B4, FULL, EMB] for r in (16, 128)},
    # The paper's baselines against DP-DMD (sd35_v5p8_full_embeddings / sdxl_v5p8_full_embeddings) on a
    # v5p-8, from an embedding cache (which also holds the GAN's real latents): DMD, DMD + regression (L2
    # on latents: LPIPS cannot be planned yet), DMD + GAN, DP-DMD + GAN.
    **{f"{name}_v5p8_{arm}_embeddings": [f"{flag}:{variant}", V5P8, *B4, FULL, EMB]
       for name, flag in (("sd35", SD35), ("sdxl", SDXL))
       for arm, variant in (("dmd", "dmd"), ("dmd_regression", "dmd,regression"), ("dmd_gan", "dmd,gan"),
                            ("gan", "gan"))},
    # DMD v1's regression from a pair cache (no teacher sample in the round; planned shape-only, no cache read).
    **{f"{name}_v5p8_dmd_regression_pairs_embeddings": [f"{flag}:dmd,regression", V5P8, *B4, FULL, EMB,
                                                        "--config.regression.pairs=PAIRS"]
       for name, flag in (("sd35", SD35), ("sdxl", SDXL))},
    "sdxl_v5p8_full_embeddings": [SDXL, V5P8, *B4, FULL, EMB],
    # Full fine-tuning on the same 8 chips, against LoRA's 8-chip rows.
    "sd35_v5p16_full_embeddings": [SD35, "--target=tpu:v5p:2x2x2", *B4, FULL, EMB],
    "sdxl_v5p16_full_embeddings": [SDXL, "--target=tpu:v5p:2x2x2", *B4, FULL, EMB],
}


def gib(b) -> str:
    return "-" if b is None else f"{b / 2**30:.1f}"


def row(name: str, result: dict) -> list[str]:
    p = (result["best"] or result["tried"][-1]) if "tried" in result else result
    m, f = p["memory_per_device"], p["flops"]
    program = m["round program"] or {}
    roof = f.get("roofline", {})
    verdict = "OOM (compile)" if "error" in p else ("fits" if p["fits"] else "does not fit")
    changes = p.get("changes", "") if "tried" in result else ""
    setting = p["setting"]
    return [name, p["target"], str(p["per_device_batch"]), setting["model.remat_policy"], setting["data.kind"],
            str(changes or ""), gib(sum(m["round arguments"].values())), gib(program.get("temporaries")),
            gib(sum(m["resident beside the round"].values())), gib(m["peak"]), gib(m["capacity"]), verdict,
            f"{f['model_per_round'] / 1e15:.2f}", f"{f['with_recompute_per_round'] / 1e15:.2f}",
            f"{roof['round_s']:.2f}" if roof else "-", str(result.get("wall_s", "-"))]


HEADER = ["row", "target", "per chip", "remat", "prompts", "search: changes", "state GiB", "temps GiB",
          "text enc. GiB", "peak GiB", "HBM GiB", "verdict", "model PFLOP/round", "with remat PFLOP",
          "roofline s/round", "plan wall s"]


def refresh_flops(name: str, path: str) -> None:
    """Recounts a stored plan's FLOPs with today's code (no compile): the row's config and target
    rebuilt shape-only, `plan.flops_plan` without the compiled program; XLA's compiled counts kept."""
    import importlib

    from dpdmd_jax.config import override
    from dpdmd_jax.run import plan as plan_lib

    flags = dict(f[2:].split("=", 1) for f in ROWS[name] if "=" in f)
    target = plan_lib.parse_target(flags["target"])
    plan_lib.prepare_jax(target)
    devices = plan_lib.target_devices(target)
    c = importlib.import_module(flags["config"].removesuffix(".py").replace("/", ".")).get_config()
    c = override(c, {k[len("config."):]: v for k, v in flags.items() if k.startswith("config.")})
    c = plan_lib.with_per_device_batch(c, devices, int(flags["per_device_batch"]))
    result = json.load(open(path))
    plans = result["tried"] if "tried" in result else [result]
    for p in plans:
        candidate = override(copy.deepcopy(c), p.get("changes", {}))  # a search step: its changes on the row config
        run = plan_lib.abstract_run(plan_lib.plannable(candidate)[0], devices)
        f = p["flops"]
        cost = {"flops": f["xla_compiled_per_device (loop bodies once)"],
                "bytes accessed": f["xla_bytes_accessed_per_device (loop bodies once)"]}
        chip = plan_lib.chip_of(devices, None)
        p["flops"] = plan_lib.flops_plan(run, {k: v for k, v in cost.items() if v}, chip)
        m = p["memory_per_device"]  # the chip table's memory, as today's code has it
        p["chip"], m["capacity"] = chip.name, chip.memory_bytes
        p["fits"] = False if "error" in p else m["peak"] <= chip.memory_bytes
        p["margin_bytes"] = None if m["peak"] is None else chip.memory_bytes - m["peak"]
    if "tried" in result:
        result["best"] = next((p for p in plans if p["fits"]), None)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="", help="comma-separated row names")
    parser.add_argument("--table", action="store_true", help="print the table of --out's plans and exit")
    parser.add_argument("--refresh-flops", action="store_true", help="recount the FLOPs of --out's plans (no compile)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    names = args.only.split(",") if args.only else list(ROWS)
    if args.refresh_flops:
        for name in names:
            if os.path.exists(os.path.join(args.out, f"{name}.json")):
                refresh_flops(name, os.path.join(args.out, f"{name}.json"))
    elif not args.table:
        for name in names:
            path = os.path.join(args.out, f"{name}.json")
            if os.path.exists(path):
                continue
            start = time.time()
            print(f"planning {name}: python -m dpdmd_jax.plan {' '.join(ROWS[name])}", flush=True)
            child = subprocess.run([sys.executable, "-m", "dpdmd_jax.plan", *ROWS[name], f"--out={path}"],
                                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
            if child.returncode < 0:  # a signal: on this CPU host, the kernel's OOM killer (SIGKILL) in practice
                print(f"{name}: the plan process was killed by signal {-child.returncode} after "
                      f"{time.time() - start:.0f} s (SIGKILL: likely the OOM killer, see dmesg); no plan written",
                      flush=True)
            if os.path.exists(path):  # the wall time goes into the plan's JSON, for the table
                result = json.load(open(path))
                result["wall_s"] = round(time.time() - start)
                with open(path, "w") as f:
                    json.dump(result, f, indent=2)
    rows = [row(n, json.load(open(os.path.join(args.out, f"{n}.json")))) for n in names
            if os.path.exists(os.path.join(args.out, f"{n}.json"))]
    from benchmarks.common import host, table

    print(f"{host()}\n" + table(HEADER, rows))


if __name__ == "__main__":
    main()
