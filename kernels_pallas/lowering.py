"""Lowering rules that depend on the target devices (shared by kernels_pallas.dispatch and the
library's target-picked primitives: moe_jax.experts.auto and moe_jax.experts.tokamax).

A jitted program is traced before its devices are known; a primitive whose lowering needs them
registers one rule per platform with register_target_lowering and reads the devices with
target_devices(ctx) in the rule.
"""

from __future__ import annotations

import functools

import numpy as np
from jax.interpreters import mlir


def target_devices(ctx) -> list:
    """The devices the program is lowered for (jit's device assignment or the shard_map mesh),
    when the lowering context knows them; [] otherwise."""
    axis_context = ctx.module_context.axis_context
    devices = getattr(axis_context, "device_assignment", None)
    if devices is None:  # inside shard_map: the mesh
        try:
            devices = np.asarray(axis_context.mesh.devices).ravel().tolist()
        except Exception:  # no mesh, or an AbstractMesh without devices
            devices = None
    return list(devices or [])


def register_target_lowering(prim, rule, platforms) -> None:
    """Registers rule(ctx, *args, platform=p, **params) for each platform p (and platform=None
    as the default rule), and asks jit to put its device assignment into the lowering context
    (private API, as jax's own cuDNN primitives do); without it target_devices(ctx) is [] under
    plain jit and the rules fall back to their platform's default."""
    mlir.register_lowering(prim, functools.partial(rule, platform=None))
    for platform in platforms:
        mlir.register_lowering(prim, functools.partial(rule, platform=platform), platform=platform)
    try:
        from jax._src import dispatch as _jax_dispatch

        _jax_dispatch.prim_requires_devices_during_lowering.add(prim)
    except (ImportError, AttributeError):  # pragma: no cover - a future jax
        pass
