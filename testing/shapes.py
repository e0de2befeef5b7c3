"""A world of coloured shapes: the data the trained tiny model learns, and a pixel-level judge.

Scenes are 64x64 images of one shape (circle, square or triangle) of one colour on a background
of another colour, captioned "a red circle on a blue background". ``judge`` reads colour, shape
and background back from pixels alone (no learned model), so prompt adherence of the served model
is measured, not eyeballed. Some (colour, shape, background) combinations are held out of
training (``HELD_OUT``): adherence is reported on captions the model never saw.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np

SIZE = 64
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
    "yellow": (240, 210, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
ALL_SCENES = [(colour, shape, background) for colour, shape, background in itertools.product(COLOURS, SHAPES, COLOURS)
              if colour != background]
HELD_OUT = ALL_SCENES[::10]  # 9 of the 90 combinations; never in training
TRAINING_SCENES = [scene for scene in ALL_SCENES if scene not in HELD_OUT]


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def parse_caption(caption: str) -> Scene:
    words = caption.split()
    return Scene(words[1], words[2], words[5])


def render(scene: Scene, rng: random.Random) -> np.ndarray:
    """One 64x64 RGB image of ``scene`` at a random position and size."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    half = rng.randint(12, 19)
    cx, cy = rng.randint(half + 2, SIZE - half - 3), rng.randint(half + 2, SIZE - half - 3)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return np.asarray(image)


def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    distances = [np.linalg.norm(rgb - np.array(COLOURS[name])) for name in names]
    return names[int(np.argmin(distances))]


def judge(image: np.ndarray) -> Scene:
    """Read (colour, shape, background) from pixels: the background is the border's median colour;
    the shape is every pixel far from it; its kind comes from how much of its bounding box it fills
    (square ~1, circle ~0.79, triangle ~0.5)."""
    image = image.astype(np.float32)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background_rgb = np.median(border, axis=0)
    mask = np.linalg.norm(image - background_rgb, axis=-1) > 80
    background = _nearest_colour(background_rgb)
    if mask.sum() < 20:
        return Scene("none", "none", background)
    colour = _nearest_colour(np.median(image[mask], axis=0))
    rows, cols = np.nonzero(mask)
    fill = mask.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
    return Scene(colour, shape, background)


def adherence(captions: list[str], images: list[np.ndarray]) -> dict[str, float]:
    """Share of images whose judged colour / shape / background match their caption."""
    judged = [judge(image) for image in images]
    wanted = [parse_caption(caption) for caption in captions]
    return {key: float(np.mean([getattr(j, key) == getattr(w, key) for j, w in zip(judged, wanted)]))
            for key in ("colour", "shape", "background")}
