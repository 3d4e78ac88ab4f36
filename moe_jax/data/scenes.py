"""Procedural vision-language scenes: coloured shapes on a plain background, with captions.

A scene holds 1..max_shapes shapes, each a (kind, colour, size, position) drawn at a distinct
position slot with a small jitter; shapes later in the list are drawn on top (a centre shape,
which may overlap the corners, comes first). The caption
names them in order: "a large red circle top left and a small blue square bottom right".
Most patches of a scene are plain background (low information) while the caption is dense,
which is the regime the null-expert experiments need; `patch_foreground` says which patches
touch a shape so routing statistics can be split by it.

Everything is a pure function of (index, seed): `sample_scene` seeds a numpy Generator from
both, so any record can be produced alone, in any order, on any process.
"""

from __future__ import annotations

import dataclasses

import numpy as np

KINDS = ("circle", "square", "triangle")
COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.2, 0.8),
    "white": (1.0, 1.0, 1.0),
}
SIZES = {"small": 0.1, "large": 0.2}  # radius as a fraction of the image side
POSITIONS = {  # (row, col) centre as a fraction of the image side
    "top left": (0.25, 0.25),
    "top right": (0.25, 0.75),
    "bottom left": (0.75, 0.25),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
BACKGROUND = (0.08, 0.08, 0.08)
JITTER = 0.06  # max centre offset as a fraction of the image side
MAX_SHAPES = len(POSITIONS)


def vocabulary() -> list[str]:
    """Every word a scene caption can use."""
    words = {"a", "and", *KINDS, *COLOURS, *SIZES}
    for pos in POSITIONS:
        words.update(pos.split())
    return sorted(words)


def longest_caption(max_shapes: int) -> str:
    """A caption at least as long, in words and in characters, as any scene caption."""
    longest = lambda names: max(names, key=len)
    one = f"a {longest(SIZES)} {longest(COLOURS)} {longest(KINDS)} {longest(POSITIONS)}"
    return " and ".join([one] * max_shapes)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One shape; centre (cy, cx) and radius r in pixels of the rendered image."""

    kind: str
    colour: str
    size: str
    position: str
    cy: float
    cx: float
    r: float


def sample_scene(index: int, seed: int, image_size: int, max_shapes: int = 3) -> list[Shape]:
    """The scene of record `index` under `seed` (a pure function of its arguments)."""
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(1, max_shapes + 1))
    names = list(POSITIONS)
    slots = rng.choice(len(POSITIONS), size=n, replace=False).tolist()
    # The centre shape overlaps the corners, so it goes first (drawn underneath): every
    # shape a caption names stays visible.
    slots.sort(key=lambda k: names[k] != "center")
    shapes = []
    for slot in slots:
        position = names[int(slot)]
        size = ("small", "large")[int(rng.integers(2))]
        kind = KINDS[int(rng.integers(len(KINDS)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        fy, fx = POSITIONS[position]
        jy, jx = rng.uniform(-JITTER, JITTER, size=2)
        shapes.append(
            Shape(
                kind=kind,
                colour=colour,
                size=size,
                position=position,
                cy=(fy + jy) * image_size,
                cx=(fx + jx) * image_size,
                r=SIZES[size] * image_size,
            )
        )
    return shapes


def caption(shapes: list[Shape]) -> str:
    """'a large red circle top left and a small blue square center'."""
    return " and ".join(f"a {s.size} {s.colour} {s.kind} {s.position}" for s in shapes)


def shape_mask(shape: Shape, image_size: int) -> np.ndarray:
    """[H, W] bool: pixels whose centre lies inside the shape."""
    y = np.arange(image_size)[:, None] + 0.5 - shape.cy  # [H, 1]
    x = np.arange(image_size)[None, :] + 0.5 - shape.cx  # [1, W]
    if shape.kind == "circle":
        return x**2 + y**2 <= shape.r**2
    if shape.kind == "square":
        return (np.abs(x) <= shape.r) & (np.abs(y) <= shape.r)
    if shape.kind == "triangle":  # apex up at cy - r, base at cy + r, base width 2r
        depth = y + shape.r  # distance below the apex
        return (depth >= 0) & (y <= shape.r) & (np.abs(x) <= depth / 2)
    raise ValueError(f"Shape.kind must be one of {KINDS}, got {shape.kind!r}")


def render(shapes: list[Shape], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws shapes in order on the background: image [H, W, 3] float32 in [0, 1], mask [H, W]."""
    image = np.empty((image_size, image_size, 3), np.float32)
    image[...] = BACKGROUND
    mask = np.zeros((image_size, image_size), bool)
    for s in shapes:
        m = shape_mask(s, image_size)
        image[m] = COLOURS[s.colour]
        mask |= m
    return image, mask


def patch_foreground(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """[P] bool, patches in row-major order: True where the patch holds any shape pixel."""
    h, w = mask.shape
    m = mask.reshape(h // patch_size, patch_size, w // patch_size, patch_size)
    return m.any(axis=(1, 3)).reshape(-1)  # [P]


class ShapesSource:
    """Random-access source of scene records for indices [start, start + length).

    Record i is {"image": [H, W, 3] float32, "caption": str, "patch_fg": [P] bool}, generated
    from scene index start + i under `seed`.
    """

    def __init__(
        self,
        *,
        start: int,
        length: int,
        seed: int,
        image_size: int,
        patch_size: int,
        max_shapes: int,
    ):
        self.start, self.length, self.seed = start, length, seed
        self.image_size, self.patch_size, self.max_shapes = image_size, patch_size, max_shapes

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(f"record {i} outside [0, {self.length})")
        shapes = sample_scene(self.start + i, self.seed, self.image_size, self.max_shapes)
        image, mask = render(shapes, self.image_size)
        return {
            "image": image,
            "caption": caption(shapes),
            "patch_fg": patch_foreground(mask, self.patch_size),
        }
