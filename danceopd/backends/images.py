"""Images of dataset rows for the latent backends: checked before any encoder loads, and
resized to the training bucket preserving aspect ratio (scale the short side to the bucket,
then centre-crop), as the reference trainer's image pipeline does for edit sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 64 * 1024 * 1024  # refuse decompression bombs before decoding


def check_image(path: Path | None, what: str, uid: str) -> None:
    if path is None:
        raise ValueError(f"row {uid}: no {what} image")
    if not Path(path).is_file():
        raise ValueError(f"row {uid}: {what} image {path} does not exist")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ValueError(f"row {uid}: {what} image {Path(path).name} is {w}x{h}, over {MAX_PIXELS} pixels")
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"row {uid}: {what} image {Path(path).name} is not a readable image ({type(e).__name__})") from None


def load_bucket(path: Path, size: int) -> torch.Tensor:
    """RGB image -> [3, size, size] in [-1, 1]: short side scaled to `size`, centre crop."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()
