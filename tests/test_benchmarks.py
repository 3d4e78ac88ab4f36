"""The benchmark helpers measure what they claim (no timing is asserted): the profiler
breakdown attributes a program's ops to the named scopes they were traced under."""

import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_scopes  # noqa: E402


def test_scope_shares_follow_the_named_scopes():
    # "big" holds 64x the matmul work of "small"; the rest is a cheap reduction.
    @jax.jit
    def f(a, b):
        with jax.named_scope("big"):
            x = jnp.tanh(a @ a)  # [512, 512] @ [512, 512]
        with jax.named_scope("small"):
            y = jnp.tanh(b @ b)  # [128, 128] @ [128, 128]
        return jnp.sum(x) + jnp.sum(y)

    a, b = jnp.ones((512, 512)) * 1e-3, jnp.ones((128, 128)) * 1e-3
    compiled = f.lower(a, b).compile()
    cats = (("big", ("big",)), ("small", ("small",)))
    shares = profile_scopes.scope_shares(
        compiled, lambda: jax.block_until_ready(compiled(a, b)), cats, calls=3
    )
    assert set(shares) == {"big", "small", "rest"}
    assert abs(sum(shares.values()) - 1.0) < 1e-6
    assert shares["big"] > 0.5 and shares["big"] > 4 * shares["small"] > 0


def test_categorize_matches_whole_scope_names():
    cats = (("combine", ("combine",)), ("router", ("route", "router_logits")))
    assert profile_scopes.categorize("jit(f)/transpose(jvp(route))/top_k", cats) == "router"
    assert profile_scopes.categorize("jit(f)/experts/while/body/combine/add", cats) == "combine"
    assert profile_scopes.categorize("jit(f)/routed/dot", cats) == "rest"  # not a prefix match
