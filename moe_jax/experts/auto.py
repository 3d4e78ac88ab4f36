"""backend="auto": the expert path chosen when the program is lowered, for the devices it is
lowered for (registry.AUTO_BACKENDS), not for this host's default backend.

A layer built on a CPU host and jitted with inputs on compile-only TPU or GPU devices is traced
on the CPU host, so a choice made while tracing would be the CPU's. Instead:
1. `by_target` traces each backend the table can pick once ("tiled", "pallas") and puts them
   in one lax.switch. Its index comes from `target_index_p`.
2. target_index_p lowers to a constant: its lowering rule reads the lowering platform and the
   target devices (jit's device assignment, or the mesh inside shard_map) and looks them up in
   AUTO_BACKENDS. One lowering rule per platform, so a program lowered for several platforms at
   once (jax.export) gets each platform's choice.
3. XLA inlines the branch of the constant index and drops the others before optimizing, so the
   compiled program holds one backend. Every branch is lowered for the target, though, so each
   must lower everywhere: the Pallas branch lowers its jnp reference where no kernel compiles
   (a CPU, an NVIDIA GPU below compute capability 8.0) instead of raising, and never an
   interpret-mode kernel.
Eagerly (outside jit) the table is read for the inputs' device and only that branch runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir

from kernels_pallas.lowering import register_target_lowering, target_devices
from moe_jax.experts import registry


def _index_lowering(ctx, *, platform, choices: tuple[str, ...]):
    platform = platform or (ctx.platforms or ctx.module_context.platforms)[0]
    devices = [d for d in target_devices(ctx) if registry.lowering_platform(d) == platform]
    name = registry.auto_backend(devices[0] if devices else None, platform)
    return [mlir.ir_constant(np.int32(choices.index(name)))]


@functools.cache
def _eager_index(choices: tuple[str, ...]):
    return jax.jit(lambda: target_index_p.bind(choices=choices))


target_index_p = Primitive("moe_jax_auto_backend")
target_index_p.def_abstract_eval(lambda **_: jax.core.ShapedArray((), np.int32))
target_index_p.def_impl(lambda *, choices: _eager_index(choices)())
register_target_lowering(target_index_p, _index_lowering, ("cpu", "tpu", "cuda", "rocm"))


def by_target(branch: Callable[[str], Callable], *args):
    """branch(name)(*args) for the backend name AUTO_BACKENDS picks for the target the program
    is lowered for; branch(name) must lower for every target (see the module docstring)."""
    leaves = jax.tree.leaves(args)
    if not any(isinstance(a, jax.core.Tracer) for a in leaves):  # eager: where the inputs are
        device = next((d for a in leaves if isinstance(a, jax.Array) for d in a.devices()), None)
        return branch(registry.auto_backend(device or jax.devices()[0]))(*args)
    choices = registry.auto_candidates()
    if len(choices) == 1:
        return branch(choices[0])(*args)
    index = target_index_p.bind(choices=choices)  # [] int32, a constant once lowered
    if not isinstance(index, jax.core.Tracer):  # e.g. eager grad: this host's default device
        return branch(choices[int(index)])(*args)
    return jax.lax.switch(index, [branch(name) for name in choices], *args)
