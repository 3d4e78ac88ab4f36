"""Tile sizes for the grouped matmul kernels: a frozen dataclass, per-platform defaults, a
small shape-keyed table and, for Triton, a table keyed by the GPU's shared memory.

The numbers are starting points, not tuned results: no TPU or GPU was available when they were
written (they are checked by compiling for compile-only devices, tests/test_kernels_compile.py).
`fit_tile` shrinks a choice to the problem so tiny shapes (tests, interpret mode) use one tile
per dimension instead of padding up to a large default.

Triton keeps its software-pipelined operand tiles in shared memory: num_stages copies of both
operand tiles of one loop step, i.e. num_stages * (tm*tk + tk*tn) * itemsize bytes for gmm and
num_stages * (tm*tk + tm*tn) * itemsize for tgmm (rows are its contraction). That must stay
below the device's opt-in shared memory per block (227 KiB on H100, 163 KiB on A100, 99 KiB on
L4), so `triton_block_sizes` picks an entry of GPU_TABLE for the device and shrinks it until
the estimate fits. The estimate is exact on sm90 for bf16 (XLA reported "requested 245760" for
3 * (128*64 + 128*256) * 2) and conservative on sm80 / sm89, where Triton was seen to keep
num_stages - 1 copies.
"""

from __future__ import annotations

import dataclasses

BACKENDS = ("tpu", "triton", "mosaic_gpu")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Row tile tm, contraction tile tk, output-column tile tn; Triton launch knobs.

    Raises:
        ValueError: a field that is not a positive int, naming it.
    """

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
    "mosaic_gpu": BlockSizes(tm=128, tk=64, tn=128),
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


# Opt-in shared memory per block in bytes by CUDA compute capability (CUDA programming guide,
# "technical specifications per compute capability"). Unknown capabilities use the largest
# known one that is not above them.
SMEM_OPTIN_BY_CC: dict[tuple[int, int], int] = {
    (7, 5): 64 * 1024,
    (8, 0): 163 * 1024,
    (8, 6): 99 * 1024,
    (8, 7): 163 * 1024,
    (8, 9): 99 * 1024,
    (9, 0): 227 * 1024,
    (10, 0): 227 * 1024,
    (12, 0): 99 * 1024,
}
MIN_TRITON_CC = (8, 0)  # XLA compiles Triton kernels only on Ampere and newer
SMEM_HEADROOM = 1024  # bytes kept free for Triton's own barriers and scratch

# Triton tiles keyed by the minimum opt-in shared memory (KiB) they are meant for, then by op.
# "gmm" tiles: tm rows, tk contraction, tn output columns; "tgmm" tiles: tm rows (the
# contraction), tk D columns, tn F columns. bf16 footprints are noted; f32 doubles them and
# triton_block_sizes then drops a stage or halves a tile.
GPU_TABLE: dict[int, dict[str, BlockSizes]] = {
    227: {  # H100 / H200 (sm90): 144 KiB bf16
        "gmm": BlockSizes(tm=128, tk=64, tn=256, num_warps=8, num_stages=3),
        "tgmm": BlockSizes(tm=64, tk=128, tn=256, num_warps=8, num_stages=3),
    },
    163: {  # A100 (sm80): 96 KiB bf16
        "gmm": BlockSizes(tm=128, tk=64, tn=128, num_warps=8, num_stages=3),
        "tgmm": BlockSizes(tm=64, tk=128, tn=128, num_warps=8, num_stages=3),
    },
    99: {  # L4, RTX 30xx/40xx (sm86 / sm89): 48 KiB bf16
        "gmm": BlockSizes(tm=128, tk=32, tn=128, num_warps=4, num_stages=3),
        "tgmm": BlockSizes(tm=32, tk=128, tn=128, num_warps=4, num_stages=3),
    },
    0: {  # anything smaller: 16 KiB bf16
        "gmm": BlockSizes(tm=64, tk=32, tn=64, num_warps=4, num_stages=2),
        "tgmm": BlockSizes(tm=32, tk=64, tn=64, num_warps=4, num_stages=2),
    },
}


def smem_optin_bytes(compute_capability: tuple[int, int]) -> int:
    """Opt-in shared memory per block for a compute capability (SMEM_OPTIN_BY_CC)."""
    known = [cc for cc in SMEM_OPTIN_BY_CC if cc <= tuple(compute_capability)]
    return SMEM_OPTIN_BY_CC[max(known)] if known else 48 * 1024


def triton_smem_bytes(op: str, bs: BlockSizes, itemsize: int) -> int:
    """Shared memory of the pipelined operand tiles of one Triton program (module docstring)."""
    if op not in ("gmm", "tgmm"):
        raise ValueError(f"op must be 'gmm' or 'tgmm', got {op!r}")
    second = bs.tk * bs.tn if op == "gmm" else bs.tm * bs.tn
    return bs.num_stages * (bs.tm * bs.tk + second) * itemsize


def triton_block_sizes(
    op: str, m: int, k: int, n: int, *, itemsize: int, smem_bytes: int
) -> BlockSizes:
    """Triton tiles for `op` on a GPU with `smem_bytes` opt-in shared memory per block.

    m, k, n are the sizes the tiles tm, tk, tn cover (gmm: R, D, F; tgmm: R, D, F). The table
    entry is fitted to the problem (fit_tile), then, while the shared memory estimate exceeds
    smem_bytes - SMEM_HEADROOM: drop pipeline stages down to 2, then halve the loop tile (the
    one both operands share: tk for gmm, tm for tgmm) down to 32, then the larger other tile,
    down to 16.
    """
    entry = GPU_TABLE[max(kib for kib in GPU_TABLE if kib * 1024 <= max(smem_bytes, 0))][op]
    tiles = {
        "tm": fit_tile(entry.tm, m, "triton"),
        "tk": fit_tile(entry.tk, k, "triton"),
        "tn": fit_tile(entry.tn, n, "triton"),
    }
    bs = dataclasses.replace(entry, **tiles)
    loop, others = ("tk", ("tm", "tn")) if op == "gmm" else ("tm", ("tk", "tn"))
    cap = smem_bytes - SMEM_HEADROOM
    while triton_smem_bytes(op, bs, itemsize) > cap:
        if bs.num_stages > 2:
            bs = dataclasses.replace(bs, num_stages=bs.num_stages - 1)
        elif getattr(bs, loop) > 32:
            bs = dataclasses.replace(bs, **{loop: getattr(bs, loop) // 2})
        else:
            name = max(others, key=lambda t: getattr(bs, t))
            if getattr(bs, name) <= 16:
                raise ValueError(
                    f"no Triton tiles fit {smem_bytes} bytes of shared memory for {op}"
                )
            bs = dataclasses.replace(bs, **{name: getattr(bs, name) // 2})
    return bs


# Mosaic GPU (Hopper wgmma) tiles per op, for 227 KiB of shared memory (H100 / H200): "gmm" tm
# rows, tk contraction, tn output columns; "tgmm" tm rows (the contraction), tk D rows of the
# accumulator, tn F columns. wgmma wants accumulator rows in multiples of 64 and columns of at
# most 256; a 64-wide bf16 contraction tile is one 128-byte swizzled row. num_warps/num_stages
# are not used (the pipeline depth is MOSAIC_GPU_STEPS).
MOSAIC_GPU_STEPS = 3
MOSAIC_GPU_TILES: dict[str, BlockSizes] = {
    "gmm": BlockSizes(tm=128, tk=64, tn=128),  # 96 KiB operands + 64 KiB f32 output tile
    "tgmm": BlockSizes(tm=64, tk=128, tn=128),  # 96 KiB operands + 64 KiB f32 output tile
}


def mosaic_gpu_smem_bytes(op: str, bs: BlockSizes, out_itemsize: int) -> int:
    """Shared memory of one Mosaic GPU program (16-bit operands): pipelined tiles + output."""
    if op not in ("gmm", "tgmm"):
        raise ValueError(f"op must be 'gmm' or 'tgmm', got {op!r}")
    if op == "gmm":
        operands, out = bs.tm * bs.tk + bs.tk * bs.tn, bs.tm * bs.tn
    else:
        operands, out = bs.tm * bs.tk + bs.tm * bs.tn, bs.tk * bs.tn
    return MOSAIC_GPU_STEPS * operands * 2 + out * out_itemsize


def check_mosaic_gpu_block_sizes(
    op: str, bs: BlockSizes, out_itemsize: int, smem_bytes: int = 227 * 1024
) -> BlockSizes:
    """bs, after checking it suits the Mosaic GPU kernels; raises naming the field otherwise."""
    for name in ("tm", "tk", "tn"):
        if getattr(bs, name) % 64:
            raise ValueError(
                f"BlockSizes.{name} must be a multiple of 64 for the Mosaic GPU kernels "
                f"(wgmma tiles), got {getattr(bs, name)}"
            )
    if bs.tn > 256:
        raise ValueError(f"BlockSizes.tn must be at most 256 for Mosaic GPU (wgmma), got {bs.tn}")
    need = mosaic_gpu_smem_bytes(op, bs, out_itemsize)
    if need > smem_bytes:
        raise ValueError(
            f"block_sizes {bs} need {need} bytes of shared memory for Mosaic GPU {op}, more "
            f"than the target's {smem_bytes}: lower the tiles, or pass block_sizes=None"
        )
    return bs


def mosaic_gpu_block_sizes(op: str, out_itemsize: int, smem_bytes: int = 227 * 1024) -> BlockSizes:
    """The MOSAIC_GPU_TILES entry for `op`, with tn halved (down to 64) until it fits."""
    bs = MOSAIC_GPU_TILES[op]
    while mosaic_gpu_smem_bytes(op, bs, out_itemsize) > smem_bytes and bs.tn > 64:
        bs = dataclasses.replace(bs, tn=bs.tn // 2)
    return check_mosaic_gpu_block_sizes(op, bs, out_itemsize, smem_bytes)
