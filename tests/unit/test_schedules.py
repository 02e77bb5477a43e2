"""Flow schedule facts that need no reference implementation: the public 4-step student grid at
shift 3, per-sample sigmas broadcast over NHWC, bf16 inputs stepped in fp32 (the comparisons with the
diffusers schedulers are tests/parity/test_schedules_diffusers.py)."""

import jax.numpy as jnp
import numpy as np

from dpdmd_jax.diffusion import flow

RNG = np.random.default_rng(0)


def _randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------- flow


def test_four_step_shift3_grid_is_the_public_student_grid():
    s = flow.flow_match_sigmas(4, 3.0)
    np.testing.assert_allclose(s, [1.0, 0.8577, 0.6022, 0.0089, 0.0], atol=5e-5)
    assert s[0] == 1.0 and s[-1] == 0.0

    # The end point is shifted twice: shift(shift(1/1000)), not shift(1/1000).
    def shifted(t):
        return 3.0 * t / (1.0 + 2.0 * t)

    np.testing.assert_allclose(s[3], shifted(shifted(1e-3)), rtol=1e-5)
    assert abs(s[3] - shifted(1e-3)) > 5e-3


def test_per_sample_sigma_broadcasts_over_trailing_hwc_axes():
    z, v = _randn(3, 4, 5, 2), _randn(3, 4, 5, 2)
    s, s_next = np.float32([1.0, 0.6, 0.3]), np.float32([0.8, 0.2, 0.0])
    out = np.asarray(flow.euler_step(z, v, s, s_next))
    for b in range(3):
        np.testing.assert_allclose(out[b], z[b] + (s_next[b] - s[b]) * v[b], atol=1e-6)
    noisy = np.asarray(flow.add_noise(z, v, s))
    for b in range(3):
        np.testing.assert_allclose(noisy[b], (1 - s[b]) * z[b] + s[b] * v[b], atol=1e-6)


def test_bf16_inputs_step_in_fp32_and_keep_dtype():
    z = jnp.asarray(_randn(2, 3, 3, 4), jnp.bfloat16)
    v = jnp.asarray(_randn(2, 3, 3, 4), jnp.bfloat16)
    out = flow.euler_step(z, v, 0.8577, 0.6022)
    assert out.dtype == jnp.bfloat16
    want = (z.astype(jnp.float32) + (jnp.float32(0.6022) - jnp.float32(0.8577)) * v.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want.astype(jnp.bfloat16)))
