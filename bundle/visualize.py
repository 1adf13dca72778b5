"""Overlays a person can look at: the image with predicted (and, where known, true) outlines per class."""

from __future__ import annotations

import os

import cv2
import numpy as np

__all__ = ["overlay", "draw_prompts", "save_overlay", "montage", "legend", "colour"]

# distinct colours (RGB) for up to 8 classes; cycled beyond
_COLOURS = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
]


def colour(c: int) -> tuple[int, int, int]:
    """RGB colour of class index ``c`` (1-based)."""
    return _COLOURS[(c - 1) % len(_COLOURS)]


def _to_rgb8(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    lo, hi = np.percentile(img, [0.5, 99.5])
    img = np.clip((img - lo) / max(hi - lo, 1e-8), 0, 1)
    return (img[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, prediction: np.ndarray, truth: np.ndarray | None = None, title: str = "") -> np.ndarray:
    """RGB uint8 picture: filled translucent prediction with solid outline; ground truth as a thin white outline."""
    out = _to_rgb8(image).copy()
    thick = max(1, round(max(out.shape[:2]) / 256))
    classes = sorted(
        set(np.unique(prediction).tolist()) | (set(np.unique(truth).tolist()) if truth is not None else set())
    )
    fill = out.copy()
    for c in classes:
        if c == 0:
            continue
        rgb = colour(c)
        mask = (prediction == c).astype(np.uint8)
        fill[mask > 0] = rgb
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, rgb, thick)
    out = cv2.addWeighted(fill, 0.25, out, 0.75, 0)
    if truth is not None:
        for c in classes:
            if c == 0:
                continue
            contours, _ = cv2.findContours((truth == c).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(out, contours, -1, (255, 255, 255), max(1, thick // 2))
    if title:
        scale = max(out.shape[:2]) / 800
        cv2.putText(
            out,
            title,
            (8, int(28 * scale) + 4),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (255, 255, 0),
            max(1, thick),
            cv2.LINE_AA,
        )
    return out


def draw_prompts(
    picture: np.ndarray, boxes: np.ndarray | None, points: np.ndarray | None, labels: np.ndarray | None
) -> np.ndarray:
    """Boxes (N, 4) as yellow rectangles; points (N, P, 2) as green (positive) and red (negative) markers."""
    out = picture.copy()
    thick = max(1, round(max(out.shape[:2]) / 256))
    size = 4 * thick + 4
    for box in boxes if boxes is not None else []:
        if np.any(box):
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            cv2.rectangle(out, (x0, y0), (x1, y1), (255, 220, 0), thick)
    if points is not None:
        for pts, labs in zip(points, labels):
            for (x, y), lab in zip(pts, labs):
                if lab < 0:
                    continue
                marker = cv2.MARKER_CROSS if lab == 1 else cv2.MARKER_TILTED_CROSS
                rgb = (0, 255, 0) if lab == 1 else (255, 40, 40)
                cv2.drawMarker(out, (int(round(x)), int(round(y))), rgb, marker, size, thick + 1)
    return out


def save_overlay(path: str, picture: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".part.png"
    cv2.imwrite(tmp, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    os.replace(tmp, path)
    return path


def montage(pictures: list[np.ndarray], height: int = 256, columns: int = 4) -> np.ndarray:
    """Tile pictures (resized to a common height) into a grid."""
    tiles = [
        cv2.resize(p, (max(1, round(p.shape[1] * height / p.shape[0])), height), interpolation=cv2.INTER_AREA)
        for p in pictures
    ]
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tiles]
    rows = []
    for i in range(0, len(tiles), columns):
        row = tiles[i : i + columns]
        row += [np.zeros_like(tiles[0])] * (columns - len(row))
        rows.append(np.concatenate(row, 1))
    return np.concatenate(rows, 0)


def legend(picture: np.ndarray, class_names: list[str]) -> np.ndarray:
    """``picture`` with a strip below naming each class in its colour (and the truth's white outline)."""
    width = picture.shape[1]
    entries = [(n, colour(c + 1)) for c, n in enumerate(class_names)] + [("truth (outline)", (255, 255, 255))]
    scale, line = 0.5, 24
    per_row = max(1, width // 200)
    strip = np.zeros((line * ((len(entries) + per_row - 1) // per_row) + 8, width, 3), np.uint8)
    for i, (name, rgb) in enumerate(entries):
        x, y = 8 + (i % per_row) * (width // per_row), 20 + (i // per_row) * line
        cv2.rectangle(strip, (x, y - 12), (x + 14, y + 2), rgb, -1)
        cv2.putText(strip, name[:28], (x + 20, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (235, 235, 235), 1, cv2.LINE_AA)
    return np.concatenate([picture, strip], 0)
