"""Per-row errors of the Mosaic GPU kernel on the check cases, under variants (splits, approx math).

    python benchmarks/gpu_kernel_debug.py CASE [CASE ...]
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu

sys.path.insert(0, "benchmarks")
import attention as A  # noqa: E402

from pallas_kernels import gpu  # noqa: E402

key = jax.random.key(1)
for i in map(int, sys.argv[1:]):
    q_lens, ctx, h, kvh, d, page, window, cap, _ = A.CHECKS[i]
    q, cache, md = A.ragged_batch(q_lens, ctx, page, jax.random.fold_in(key, i), h, kvh, d, max_seqs=len(q_lens) + 2)
    kw = dict(sm_scale=d**-0.5, sliding_window=window, soft_cap=cap)
    ref = np.asarray(A.attend_fn("reference", **kw)(q.astype(jnp.float32), cache.astype(jnp.float32), md))
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    for approx in (True, False):
        gpu._COMPILER_PARAMS = plgpu.CompilerParams(approx_math=approx, lowering_semantics=plgpu.LoweringSemantics.Lane)
        for splits in (1, 3):
            out = np.asarray(A.attend_fn("pallas_gpu", sizes=gpu.BlockSizes(num_splits=splits), **kw)(q, cache, md),
                             np.float32)
            err = np.linalg.norm(out - ref, axis=2) / np.maximum(np.linalg.norm(ref, axis=2), 1e-6)  # [T, H]
            bad = [(s, t - cu[s], round(float(err[t].max()), 3)) for s in range(len(q_lens))
                   for t in range(cu[s], cu[s + 1]) if err[t].max() > 2e-2]
            print(f"case {i} approx={approx} splits={splits}: worst {err.max():.3f}; bad (seq, tok, err) {bad[:12]}"
                  f" of {len(bad)}; bad heads {sorted(set(np.nonzero(err.max(0) > 2e-2)[0].tolist()))[:16]}")
