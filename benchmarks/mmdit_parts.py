"""Where the mid config's forward+backward gap to PyTorch sits: the MMDiT block's parts, timed alone.

    python -m benchmarks.mmdit_parts

At the shapes of `mmdit_forward.py`'s mid config (1024 image tokens + 333 context tokens, width 768,
12 heads x 64, MLP 3072, fp32, batch 1, 2 threads each side), each part runs forward+backward
(gradients w.r.t. its input and its weights) as a jitted JAX function and as a torch autograd call,
interleaved (`mmdit_forward.interleaved`). The parts are the ones a JointTransformerBlock is made of:
dense layers of each shape, the MLP (dense, tanh-GELU, dense), LayerNorm + adaLN modulation, and the
joint attention. "per model" multiplies each part by how often the 8-layer mid model (3 dual-attention
layers) runs it, which shows where the model-level gap comes from.
"""

from __future__ import annotations

import argparse

from benchmarks import mmdit_forward as mf  # first: sets the thread flags before jax loads

import jax
import jax.numpy as jnp
import numpy as np
import torch

from dpdmd_jax.models.layers import attention

D, HEADS, MLP = 768, 12, 3072
IMG, CTX = 1024, 333
LAYERS, DUAL = 8, 3


def rnd(*shape):
    return np.random.default_rng(len(shape) * 7 + shape[-1]).standard_normal(shape).astype(np.float32) * 0.1


def pair(jax_fn, torch_fn, arrays):
    """(jax runner, torch runner) for forward+backward of sum(f(*arrays)^2) w.r.t. every array."""
    jarrs = [jnp.asarray(a) for a in arrays]
    g = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.square(jax_fn(*a))), argnums=tuple(range(len(arrays)))))
    tarrs = [torch.from_numpy(a).requires_grad_() for a in arrays]

    def t():
        for a in tarrs:
            a.grad = None
        torch_fn(*tarrs).square().sum().backward()

    return (lambda: jax.block_until_ready(g(*jarrs))), t


def gelu_t(x):
    return torch.nn.functional.gelu(x, approximate="tanh")


def ln_mod_j(x, shift, scale):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-6) * (1 + scale) + shift


def ln_mod_t(x, shift, scale):
    return torch.nn.functional.layer_norm(x, (D,), eps=1e-6) * (1 + scale) + shift


def parts() -> dict[str, tuple]:
    """name -> (jax fn, torch fn, arrays, uses per mid model)."""
    out = {}
    for tokens, stream in ((IMG, "image"), (CTX, "context")):
        x, w_qkv, w_o = rnd(tokens, D), rnd(D, 3 * D), rnd(D, D)
        w1, w2 = rnd(D, MLP), rnd(MLP, D)
        extra = DUAL if stream == "image" else 0  # dual-attention layers add a second qkv/out on the image
        out[f"dense {D}->{3 * D} ({stream}, qkv)"] = (lambda a, w: a @ w, lambda a, w: a @ w, [x, w_qkv],
                                                   LAYERS + extra)
        out[f"dense {D}->{D} ({stream}, attn out)"] = (lambda a, w: a @ w, lambda a, w: a @ w, [x, w_o],
                                                    LAYERS + extra)
        out[f"MLP {D}->{MLP}->{D} tanh-GELU ({stream})"] = (
            lambda a, u, v: jax.nn.gelu(a @ u, approximate=True) @ v,
            lambda a, u, v: gelu_t(a @ u) @ v, [x, w1, w2], LAYERS)
        shift, scale = rnd(1, D), rnd(1, D)
        out[f"LayerNorm + modulate ({stream})"] = (ln_mod_j, ln_mod_t, [x, shift, scale], 2 * LAYERS + extra)
    q, k, v = rnd(1, IMG + CTX, HEADS, 64), rnd(1, IMG + CTX, HEADS, 64), rnd(1, IMG + CTX, HEADS, 64)

    def sdpa(a, b, c):
        return torch.nn.functional.scaled_dot_product_attention(
            a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2)).transpose(1, 2)

    out["joint attention (1357 tokens)"] = (attention, sdpa, [q, k, v], LAYERS)
    qi, ki, vi = rnd(1, IMG, HEADS, 64), rnd(1, IMG, HEADS, 64), rnd(1, IMG, HEADS, 64)
    out["image self-attention (dual, 1024 tokens)"] = (attention, sdpa, [qi, ki, vi], DUAL)
    return out


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(2)
    fns, uses = {}, {}
    for name, (jf, tf, arrays, n) in parts().items():
        fns[name + " | ours"], fns[name + " | torch"] = pair(jf, tf, arrays)
        uses[name] = n
    times = mf.interleaved(fns, repeats=15, warmup=2)
    rows, tot_j, tot_t = [], 0.0, 0.0
    for name, n in uses.items():
        tj, tt = mf.med(times[name + " | ours"]), mf.med(times[name + " | torch"])
        tot_j, tot_t = tot_j + n * tj, tot_t + n * tt
        rows.append([name, f"{tj * 1e3:.2f}", f"{tt * 1e3:.2f}",
                     f"{mf.paired_ratio(times[name + ' | ours'], times[name + ' | torch']):.2f}", str(n),
                     f"{n * (tj - tt) * 1e3:+.0f}"])
    rows.append(["sum of parts per model", f"{tot_j * 1e3:.0f}", f"{tot_t * 1e3:.0f}", f"{tot_j / tot_t:.2f}", "",
                 f"{(tot_j - tot_t) * 1e3:+.0f}"])
    print(f"\n{mf.machine()}\nforward+backward, fp32, 15 interleaved rounds, medians\n")
    print(mf.table(["part", "ours ms", "torch ms", "ours / torch", "uses per mid model", "gap per model ms"], rows))


if __name__ == "__main__":
    main()
