"""`pallas_kernels.fp8_gemm`, run by JAX's GPU interpreter on CPU: products of one layer of a stacked FP8 weight
against float64 products, and its contract errors. Mosaic's lowering and the kernel's speed are checked on an H100
by `benchmarks/fp8_gemm.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_gemm import FP8, GemmSizes, _plan, fp8_matmul

CASES = [
    # rows, K, N, layer, sizes
    (1, 256, 128, 2, GemmSizes(tile_n=64, num_stages=2, splits=1)),  # one row, padded to 8
    (16, 512, 192, 1, GemmSizes(tile_n=64, num_stages=3, splits=2)),  # two K splits, a ring of stages reused
    (72, 256, 128, 0, GemmSizes()),  # rows padded to 128, splits chosen
    (256, 128, 128, 2, GemmSizes(num_stages=4)),  # the most rows, one warpgroup, tiles of 64 channels
    (256, 256, 128, 2, GemmSizes(warpgroups=2)),  # two warpgroups of 128 rows
    (200, 1024, 128, 1, GemmSizes(num_stages=3, splits=2, warpgroups=2)),  # a ring reused, 72 rows in the second
    (200, 512, 128, 2, GemmSizes(num_stages=2, warpgroups=1)),  # one warpgroup of 256 rows, tiles of 64 channels
    (100, 512, 192, 0, GemmSizes(tile_n=64, num_stages=2, warpgroups=2)),  # two warpgroups of 64 rows
]


def random_fp8(key, shape):
    """Float8 values over the whole e4m3 range, zeros and subnormals included."""
    values = jax.random.normal(key, shape) * jnp.exp2(jax.random.randint(key, shape, -10, 8))
    return jnp.clip(values, -448, 448).astype(FP8)


@pytest.mark.parametrize("rows,k,n,layer,sizes", CASES)
def test_matches_a_float64_product_of_the_chosen_layer(rows, k, n, layer, sizes):
    kx, kw = jax.random.split(jax.random.key(rows + k + n))
    x, w = random_fp8(kx, (rows, k)), random_fp8(kw, (3, n, k))
    out = fp8_matmul(x, w, jnp.int32(layer), sizes)
    expected = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(w[layer].astype(jnp.float32), np.float64).T
    assert out.shape == (rows, n) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("splits,out_dtype,num_rows", [(1, jnp.bfloat16, 40), (2, jnp.bfloat16, 40),
                                                        (1, jnp.float32, 40), (2, jnp.float32, 37)])
def test_scales_are_applied_and_the_output_has_the_asked_dtype(splits, out_dtype, num_rows):
    """x's rows given as they are, or already padded (with rows that are not zero: they must not show)."""
    kx, kw, ks = jax.random.split(jax.random.key(splits), 3)
    x, w = random_fp8(kx, (40, 512)), random_fp8(kw, (3, 192, 512))
    x_scale = jax.random.uniform(ks, (40, 1), minval=1e-3, maxval=2.0)
    w_scale = jax.random.uniform(jax.random.fold_in(ks, 1), (3, 192), minval=1e-4, maxval=1e-2)
    out = fp8_matmul(x, w, jnp.int32(1), GemmSizes(tile_n=64, splits=splits), x_scale=x_scale, w_scale=w_scale,
                     out_dtype=out_dtype, num_rows=num_rows)
    f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
    expected = (f64(x[:num_rows]) * f64(x_scale[:num_rows])) @ (f64(w[1]) * f64(w_scale[1])[:, None]).T
    assert out.shape == (num_rows, 192) and out.dtype == out_dtype
    rtol = 1e-5 if out_dtype == jnp.float32 else 2 ** -8
    np.testing.assert_allclose(f64(out), expected, rtol=rtol, atol=rtol * np.abs(expected).max() * 1e-2)


@pytest.mark.parametrize("rows,k,n,warpgroups,tile_n,splits", [
    (256, 4096, 28672, 2, 128, 1),  # Llama-3.1-8B gate/up: wide enough for 128-channel tiles without splits
    (256, 4096, 6144, 1, 64, 1),  # q/k/v: one warpgroup, 64-channel tiles
    (256, 14336, 4096, 1, 64, 2),  # down
    (128, 4096, 28672, 1, 128, 1),  # at most 128 rows: one warpgroup holds them all
])
def test_the_plan_follows_the_measured_rules(rows, k, n, warpgroups, tile_n, splits):
    shapes = _plan(rows, k, n, GemmSizes())
    assert (shapes.warpgroups, shapes.tile_n, shapes.splits) == (warpgroups, tile_n, splits)


@pytest.mark.parametrize("x_shape,w_shape,dtype,match", [
    ((257, 128), (1, 64, 128), FP8, "T <= 256"),
    ((4, 192), (1, 64, 192), FP8, "K a multiple of 128"),
    ((4, 128), (1, 64, 128), jnp.bfloat16, "float8_e4m3fn"),
])
def test_unsupported_operands_are_refused_with_a_clear_error(x_shape, w_shape, dtype, match):
    with pytest.raises(NotImplementedError, match=match):
        fp8_matmul(jnp.zeros(x_shape, dtype), jnp.zeros(w_shape, FP8), 0)


def test_more_padding_than_the_kernel_takes_is_refused():
    with pytest.raises(NotImplementedError, match=r"\(4 rows of x\)"):
        fp8_matmul(jnp.zeros((128, 128), FP8), jnp.zeros((1, 64, 128), FP8), 0, num_rows=4)


def test_scales_of_another_shape_are_refused():
    with pytest.raises(ValueError, match=r"w_scale must be \[L, N\] = \(2, 64\)"):
        fp8_matmul(jnp.zeros((4, 128), FP8), jnp.zeros((2, 64, 128), FP8), 0, w_scale=jnp.ones((2, 128)))


def test_splits_that_do_not_divide_k_are_refused():
    with pytest.raises(ValueError, match="3 splits do not divide 4 K steps"):
        fp8_matmul(jnp.zeros((4, 512), FP8), jnp.zeros((1, 64, 512), FP8), 0, GemmSizes(splits=3))
