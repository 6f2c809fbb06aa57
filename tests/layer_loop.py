"""What the fused-kernel tests share: a model's step at a number of decode rows, the Pallas kernels in its layer
loop, and the check that a fused path computes what XLA's path computes."""

import jax
import jax.numpy as jnp
import numpy as np

from tests.test_reference_attention import random_batch


def model_step(model, tokens: int):
    """The model's step at `tokens` query rows (a decode of each of `tokens` sequences), as a function and its
    arguments."""
    cfg = model.cfg
    _, _, _, cache, md = random_batch(np.random.default_rng(0), [1] * tokens, [9 + i for i in range(tokens)],
                                      cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 16, max_seqs=tokens)
    cache = jnp.zeros((cfg.num_layers, *cache.shape[1:]), jnp.bfloat16)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, tokens), jnp.int32)
    return (lambda ids, cache, md: model(ids, jnp.arange(tokens) + 8, cache, md)[0]), (ids, cache, md)


def kernel_names(jaxpr) -> list[str]:
    """Names of the Pallas kernels in `jaxpr` and in the jaxprs nested in its equations."""
    names = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            names.append(eqn.params["name"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names += kernel_names(inner)
    return names


def loop_kernels(step, args) -> list[str]:
    (loop,) = [e for e in jax.make_jaxpr(step)(*args).jaxpr.eqns if e.primitive.name == "while"]
    return kernel_names(loop.params["body_jaxpr"].jaxpr)


def assert_fusion_matches_xla(model, monkeypatch, chooser: str, kernel: str, tokens: int = 4) -> None:
    """At `tokens` rows the model's layer loop runs `kernel`; with the model's `chooser` method switched off it does
    not, and the hidden states agree to 3% of their largest (only the rounding differs)."""
    step, args = model_step(model, tokens)
    assert kernel in loop_kernels(step, args)
    out = np.asarray(jax.jit(step)(*args), np.float32)
    monkeypatch.setattr(model, chooser, lambda rows: False)
    step, args = model_step(model, tokens)  # a new function: JAX caches traces by function
    assert kernel not in loop_kernels(step, args)
    base = np.asarray(jax.jit(step)(*args), np.float32)
    np.testing.assert_allclose(out, base, atol=3e-2 * np.abs(base).max())
