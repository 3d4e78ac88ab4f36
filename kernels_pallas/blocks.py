"""Tile sizes for the grouped matmul kernels: a frozen dataclass, per-platform defaults and a
small shape-keyed table.

The numbers are starting points, not tuned results: no TPU or GPU was available when they were
written. `fit` shrinks a choice to the problem so tiny shapes (tests, interpret mode) use one
tile per dimension instead of padding up to a large default.
"""

from __future__ import annotations

import dataclasses

BACKENDS = ("tpu", "triton")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Row tile tm, contraction tile tk, output-column tile tn; Triton launch knobs."""

    tm: int = 128  # rows of lhs per tile (the grouped, ragged dimension)
    tk: int = 128  # contraction tile (D for gmm, rows are the contraction in tgmm)
    tn: int = 128  # output column tile (F for gmm)
    num_warps: int = 4  # Triton only
    num_stages: int = 3  # Triton only

    def __post_init__(self) -> None:
        for name in ("tm", "tk", "tn", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")


# Per-platform defaults. TPU: MXU-friendly multiples of 128 that keep double-buffered bf16
# blocks plus the f32 accumulator well under 16 MiB of VMEM. Triton: the usual H100 bf16 tile.
DEFAULTS: dict[str, BlockSizes] = {
    "tpu": BlockSizes(tm=512, tk=512, tn=1024),
    "triton": BlockSizes(tm=128, tk=64, tn=128, num_warps=8, num_stages=3),
}

# Shape-keyed overrides: (backend, contraction bucket, output bucket) -> BlockSizes, where a
# bucket is "small" (<= 512) or "large". Narrow contractions want a wider output tile to keep
# the arithmetic intensity up; narrow outputs want more rows per tile.
TABLE: dict[tuple[str, str, str], BlockSizes] = {
    ("tpu", "small", "small"): BlockSizes(tm=512, tk=512, tn=512),
    ("tpu", "small", "large"): BlockSizes(tm=512, tk=512, tn=2048),
    ("tpu", "large", "small"): BlockSizes(tm=1024, tk=1024, tn=512),
    ("triton", "small", "small"): BlockSizes(tm=64, tk=64, tn=64, num_warps=4, num_stages=3),
    ("triton", "large", "large"): BlockSizes(tm=128, tk=64, tn=256, num_warps=8, num_stages=3),
}


def _bucket(n: int) -> str:
    return "small" if n <= 512 else "large"


def default_block_sizes(backend: str, k: int, n: int) -> BlockSizes:
    """Block sizes for `backend` with contraction width k and output width n."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return TABLE.get((backend, _bucket(k), _bucket(n)), DEFAULTS[backend])


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def fit_tile(
    tile: int, size: int, backend: str, *, interpret: bool = False, divisor: bool = False
) -> int:
    """Shrink `tile` to the padded extent of a dimension of length `size`.

    TPU tiles stay multiples of 128: every tile dimension is a lane dimension somewhere (tgmm
    transposes the row tile onto lanes). In interpret mode there is no layout constraint, so
    multiples of 8 are allowed (lets small tests cover several tiles). With divisor=True (a
    contraction tile, which must not read past the array) a tile that divides the aligned size
    is preferred if it is at least half the requested one, so no padding copy is needed. Triton
    tiles are powers of two, at least 16 (the smallest tl.dot operand).
    """
    size = max(size, 1)
    if backend == "tpu":
        align = 8 if interpret else 128
        size_p = _round_up(size, align)
        tile = min(_round_up(tile, align), size_p)
        candidates = range(tile, (tile - 1) // 2, -align) if divisor else ()
        return next((c for c in candidates if size_p % c == 0), tile)
    return max(16, min(_next_pow2(tile), _next_pow2(size)))
