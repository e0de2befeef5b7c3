"""A harder shapes world: two objects in a spatial relation, and a pixel-level judge for it.

Scenes are 64x64 images of two shapes of different colours, side by side or one above the other,
on a background of a third colour, captioned "a red circle left of a blue square on a white
background" (or "... above ..."). A model must bind each shape to its colour and put them in the
asked order: what fewer steps and aggressive step caches break first. ``judge`` reads every object
back from pixels alone (its colour, its kind from how much of its bounding box it fills, its centre)
so adherence is measured per attribute: the two colours, each colour's shape, the relation, the
background. ``HELD_OUT`` combinations are never rendered for training.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np

from .shapes import COLOURS, SHAPES, SIZE

RELATIONS = ("left of", "above")
ALL_SCENES = [(colour, shape, relation, colour_2, shape_2, background)
              for colour, colour_2, background in itertools.permutations(COLOURS, 3)
              for shape, shape_2 in itertools.product(SHAPES, SHAPES) for relation in RELATIONS]
# Every 20th pair of objects on a background, in both relations: 108 of the 2,160 combinations, never
# in training (neither "a red circle left of a green circle on a blue background" nor "... above ...").
HELD_OUT = [scene for index, scene in enumerate(ALL_SCENES) if index // len(RELATIONS) % 20 == 0]
TRAINING_SCENES = [scene for scene in ALL_SCENES if scene not in set(HELD_OUT)]
ATTRIBUTES = ("colours", "shapes", "relation", "background")
WORDS = ("a", "on", "background", "left", "of", "above", *COLOURS, *SHAPES)
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)
_GRID = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5  # (y, x) of each pixel centre
MIN_OBJECT_PIXELS = 40  # the smallest object rendered (a triangle of half-size 7) covers ~100


@dataclass(frozen=True)
class PairScene:
    colour: str
    shape: str
    relation: str
    colour_2: str
    shape_2: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} {self.relation} a {self.colour_2} {self.shape_2} on a {self.background} background"


def parse_caption(caption: str) -> PairScene:
    words = caption.split()
    relation_words = 2 if words[3] == "left" else 1
    rest = words[3 + relation_words:]
    return PairScene(words[1], words[2], " ".join(words[3:3 + relation_words]), rest[1], rest[2], rest[5])


def _mask(shape: str, cy: float, cx: float, half: float) -> np.ndarray:
    y, x = _GRID
    if shape == "circle":
        return (y - cy) ** 2 + (x - cx) ** 2 <= half ** 2
    if shape == "square":
        return (np.abs(y - cy) <= half) & (np.abs(x - cx) <= half)
    top = cy - half  # triangle: apex up, base at cy + half as wide as it is tall
    return (y >= top) & (y <= cy + half) & (np.abs(x - cx) <= (y - top) / 2)


def render(scene: PairScene, rng: random.Random) -> np.ndarray:
    """One 64x64 RGB image of ``scene``: sizes and positions random, the first object clearly left
    of (or above) the second (centres at least both half-sizes + 4 px apart along the relation, at
    most 8 px apart across it)."""
    halves = rng.randint(7, 11), rng.randint(7, 11)
    while True:
        along = rng.uniform(halves[0] + 2, SIZE - 2 - halves[0]), rng.uniform(halves[1] + 2, SIZE - 2 - halves[1])
        if along[1] - along[0] >= halves[0] + halves[1] + 4:
            break
    low, high = max(halves) + 2, SIZE - 2 - max(halves)
    across = rng.uniform(low, high)
    across = across, min(high, max(low, across + rng.uniform(-8, 8)))
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:] = COLOURS[scene.background]
    for index, (colour, shape) in enumerate(((scene.colour, scene.shape), (scene.colour_2, scene.shape_2))):
        cy, cx = (across[index], along[index]) if scene.relation == "left of" else (along[index], across[index])
        image[_mask(shape, cy, cx, halves[index])] = COLOURS[colour]
    return image


@dataclass(frozen=True)
class Seen:
    """What the judge reads from one image: the background and each object, by colour."""

    background: str
    objects: dict  # colour -> (shape, centre y, centre x, pixels)


def judge(image: np.ndarray) -> Seen:
    """The background is the border's median colour; every pixel far from it and near a palette colour
    belongs to that colour's object; a colour with at least MIN_OBJECT_PIXELS pixels is an object, whose
    kind comes from how much of its bounding box it fills (square ~1, circle ~0.79, triangle ~0.5)."""
    image = image.astype(np.float32)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background_rgb = np.median(border, axis=0)
    background = _NAMES[int(np.argmin(np.linalg.norm(_PALETTE - background_rgb, axis=1)))]
    foreground = np.linalg.norm(image - background_rgb, axis=-1) > 80
    distances = np.linalg.norm(image[..., None, :] - _PALETTE, axis=-1)
    # a pixel counts for the palette colour it is near; blended edges (near none) count for no object
    nearest = np.where(distances.min(axis=-1) < 70, distances.argmin(axis=-1), -1)
    objects = {}
    for index, name in enumerate(_NAMES):
        mask = foreground & (nearest == index)
        pixels = int(mask.sum())
        if name == background or pixels < MIN_OBJECT_PIXELS:
            continue
        rows, cols = np.nonzero(mask)
        fill = pixels / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
        shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
        objects[name] = (shape, float(rows.mean()), float(cols.mean()), pixels)
    return Seen(background, objects)


def judged_right(seen: Seen, wanted: PairScene) -> dict[str, bool]:
    """Per attribute: the objects are exactly the two asked colours; each has its asked shape; the
    first is left of (above) the second, more along that axis than across it; the background."""
    first, second = seen.objects.get(wanted.colour), seen.objects.get(wanted.colour_2)
    both = first is not None and second is not None
    relation = False
    if both:
        down, right = second[1] - first[1], second[2] - first[2]
        relation = right > abs(down) if wanted.relation == "left of" else down > abs(right)
    return {
        "colours": set(seen.objects) == {wanted.colour, wanted.colour_2},
        "shapes": both and first[0] == wanted.shape and second[0] == wanted.shape_2,
        "relation": relation,
        "background": seen.background == wanted.background,
    }


def adherence(captions: list[str], images: list[np.ndarray]) -> dict[str, float]:
    """Share of images judged right, per attribute."""
    results = [judged_right(judge(image), parse_caption(caption)) for caption, image in zip(captions, images)]
    return {key: float(np.mean([result[key] for result in results])) for key in ATTRIBUTES}
