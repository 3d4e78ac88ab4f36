"""Where a compiled program's time goes, by the named scopes of its HLO ops (XLA CPU/GPU
profiler): run it under jax.profiler, sum each op's event time, and attribute the op to a
category through the ``op_name`` metadata (the jax.named_scope path) in the compiled HLO.

    shares = scope_shares(compiled, call, categories)   # {category: share of op time}

Loop and call ops (while, conditional, call) are left out: their bodies' ops are counted
themselves. Ops run on several threads at once, so the shares are of summed op time, not of
wall time; multiply by a measured step time to read milliseconds.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile

import jax
from jax.profiler import ProfileData

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CONTAINER = re.compile(r"\s(while|conditional|call)\(")


_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_DOT = re.compile(r"\s(dot|convolution)\(")


def op_scopes(hlo_text: str) -> tuple[dict[str, str], set[str]]:
    """({instruction name: op_name metadata}, names of loop/call instructions).

    A fusion carries the metadata of its root op, so a matmul fused under a reduction would
    be named after the reduction: a fusion whose computation holds a dot gets the dot's."""
    scopes, containers, calls = {}, set(), {}
    dot_scope, comp = {}, None
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            header = _HEADER.match(line)
            if header:
                comp = header.group(1)
            continue
        name, rest = m.groups()
        meta = _OP_NAME.search(rest)
        scopes[name] = meta.group(1) if meta else ""
        body = rest.split(", metadata=")[0]
        if _CONTAINER.search(body):
            containers.add(name)
        elif _DOT.search(body) and comp is not None and scopes[name]:
            dot_scope.setdefault(comp, scopes[name])
        callee = _CALLS.search(body)
        if callee:
            calls[name] = callee.group(1)
    for name, callee in calls.items():
        if name not in containers and callee in dot_scope:
            scopes[name] = dot_scope[callee]
    return scopes, containers


def categorize(op_name: str, categories) -> str:
    """The first category whose scope names appear in op_name's path; "rest" otherwise.
    categories: [(category, (scope, ...))], most specific first."""
    parts = set(re.split(r"[/()]", op_name))
    for cat, scope_names in categories:
        if any(s in parts for s in scope_names):
            return cat
    return "rest"


def scope_shares(compiled, call, categories, *, calls: int = 3) -> dict[str, float]:
    """Share of the summed op time per category over `calls` calls of call() (which runs
    `compiled`, a jax Compiled, and blocks)."""
    scopes, containers = op_scopes(compiled.as_text())
    call()  # warm
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            for _ in range(calls):
                call()
        finally:
            jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        data = ProfileData.from_file(path)
    totals = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                op = dict(ev.stats).get("hlo_op") if ev.name in scopes else None
                if op is None or op in containers:
                    continue
                totals[categorize(scopes[op], categories)] += ev.duration_ns
    whole = sum(totals.values()) or 1.0
    names = [c for c, _ in categories] + ["rest"]
    return {c: totals.get(c, 0.0) / whole for c in names}
