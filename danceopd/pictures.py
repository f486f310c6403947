"""Pictures of states: images ([3, H, W] in [-1, 1], what `Backend.decode` returns) become RGB
pixels, vectors (the toy backend) become a strip of coloured cells (blue < 0 < red); labelled
grids of them, and PNG files. Pillow only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CELL = 64  # smallest side of one grid cell in pixels (tiny images are enlarged, nearest neighbour)
MAX_CELL = 256  # largest side (big images are reduced)
VECTOR_RANGE = 3.0  # |value| shown at full colour in a vector strip


def to_rgb(x) -> np.ndarray:
    """One state -> uint8 [H, W, 3]: an image [3, H, W] in [-1, 1], or a vector [D] as a strip of
    D square cells."""
    x = np.asarray(x.detach().cpu().float() if hasattr(x, "detach") else x, dtype=np.float32)
    if x.ndim == 3 and x.shape[0] in (1, 3):
        img = np.repeat(x, 3, 0) if x.shape[0] == 1 else x
        return np.clip(np.round((img + 1) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    if x.ndim != 1:
        raise ValueError(f"no picture for a state of shape {list(x.shape)} (an image [3, H, W] or a vector)")
    v = np.clip(x / VECTOR_RANGE, -1, 1)[None, :, None]
    white = np.ones((1, len(x), 3), np.float32)
    red, blue = np.array([0.85, 0.15, 0.1]), np.array([0.1, 0.3, 0.85])
    rgb = np.where(v >= 0, white + v * (red - white), white - v * (blue - white))
    return np.round(rgb * 255).astype(np.uint8)


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file (a dataset's source or target image) as uint8 [H, W, 3]."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _fit(img: np.ndarray, height: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    if h == height:
        return img
    width = max(1, round(w * height / h))
    resample = Image.NEAREST if height > h else Image.BILINEAR
    return np.asarray(Image.fromarray(img).resize((width, height), resample))


def grid(rows: list[list[np.ndarray | None]], columns: list[str], row_labels: list[str]) -> np.ndarray:
    """A labelled grid, uint8 [H, W, 3]: a header of column names, then one row per entry of
    `rows` (its label on the left, its cells in column order; None leaves a cell empty)."""
    from PIL import Image, ImageDraw

    cells = [c for r in rows for c in r if c is not None]
    if not cells:
        raise ValueError("grid: no pictures")
    native = max(c.shape[0] for c in cells)
    height = min(max(native, CELL), MAX_CELL)
    fitted = [[None if c is None else _fit(c, height) for c in r] for r in rows]
    widths = [max([r[j].shape[1] for r in fitted if r[j] is not None] or [height]) for j in range(len(columns))]
    label_w, head_h, pad = 6 * max([len(s) for s in row_labels] + [4]) + 8, 14, 4
    out = Image.new("RGB", (label_w + sum(w + pad for w in widths), head_h + len(rows) * (height + pad)), "white")
    draw = ImageDraw.Draw(out)
    x = label_w
    for name, w in zip(columns, widths):
        draw.text((x, 2), name, fill="black")
        x += w + pad
    for i, (label, row) in enumerate(zip(row_labels, fitted)):
        y = head_h + i * (height + pad)
        draw.text((2, y + height // 2 - 5), label, fill="black")
        x = label_w
        for w, cell in zip(widths, row):
            if cell is not None:
                out.paste(Image.fromarray(cell), (x, y))
            x += w + pad
    return np.asarray(out)


def save_png(img: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(img, dtype=np.uint8), "RGB").save(path)
    return path
