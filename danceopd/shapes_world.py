"""ShapesBench: a procedural image world where every task has an exact ground truth.

A scene is a background colour plus one shape (kind, colour, cell of a 3x3 grid), rendered
with hard binary masks from a palette of the 8 RGB cube corners. The palette is closed under
inversion, channel rotation and colour swaps, so every global edit of a scene is again a scene,
every pixel is exactly -1 or +1 (PNG round trips are lossless), and a rendered image can be
parsed back into its scene exactly. That is what lets an oracle teacher (and the tests)
recompute any target from the condition alone: `ground_truth(prompt, source_image)`.

Tasks and prompts (a fixed, small vocabulary):
  t2i          "a red circle at top left on a blue background" (fully specified), or partly
               specified: "a red circle", "a red circle at top left", "a red circle on a blue
               background" -- the free attributes make a distribution of correct images
  local_edit   "make the circle green" | "turn the circle into a square" | "move the circle to bottom right"
  global_edit  "invert the colors" | "make the background red" | "swap the colors" | "rotate the color channels"
Images are float32 [3, H, W] in [-1, 1].
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

COLORS: dict[str, tuple[float, float, float]] = {
    "black": (-1.0, -1.0, -1.0), "white": (1.0, 1.0, 1.0),
    "red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0), "cyan": (-1.0, 1.0, 1.0), "magenta": (1.0, -1.0, 1.0),
}
COLOR_NAMES = list(COLORS)
KINDS = ["square", "circle", "triangle", "cross"]
ROWS = ["top", "middle", "bottom"]
COLS = ["left", "center", "right"]
TASKS = ("t2i", "local_edit", "global_edit")
LOCAL_OPS = ("recolor", "reshape", "move")
GLOBAL_OPS = ("invert", "background", "swap", "rotate")

_WORDS = {"a", "at", "on", "background", "make", "the", "turn", "into", "move", "to",
          "invert", "colors", "swap", "rotate", "color", "channels"}
PAD, UNK = "<pad>", "<unk>"
VOCAB: list[str] = [PAD, UNK, *sorted(_WORDS | set(COLOR_NAMES) | set(KINDS) | set(ROWS) | set(COLS))]
PAD_ID, UNK_ID = 0, 1
_WORD_ID = {w: i for i, w in enumerate(VOCAB)}
MIN_SIZE = 15  # below this shapes are 3 px wide and a circle is a square


@dataclass(frozen=True)
class Scene:
    background: str
    color: str
    kind: str
    row: int
    col: int

    def to_dict(self) -> dict:
        return {**asdict(self), "position": f"{ROWS[self.row]} {COLS[self.col]}"}


@dataclass(frozen=True)
class Instruction:
    """A parsed prompt: the task, the operation and its arguments."""

    task: str
    op: str
    scene: Scene | None = None  # t2i: the described scene (None when the prompt leaves attributes free)
    background: str | None = None  # t2i: the determined background (None = free)
    kind: str | None = None  # edits: the shape the prompt names
    new_kind: str | None = None
    color: str | None = None
    row: int | None = None
    col: int | None = None


# ---- rendering --------------------------------------------------------------------------------

def check_size(size: int) -> None:
    if size < MIN_SIZE:
        raise ValueError(f"ShapesBench image_size {size} is too small (at least {MIN_SIZE})")


def _box_side(size: int) -> int:
    b = size // 3
    return b if b % 2 else b - 1  # odd, so crosses and triangles have a centre column


def _kind_mask(kind: str, b: int) -> np.ndarray:
    yy, xx = np.mgrid[0:b, 0:b].astype(np.float64)
    c = (b - 1) / 2
    dy, dx = yy - c, xx - c
    if kind == "square":
        return np.ones((b, b), bool)
    if kind == "circle":
        return dy**2 + dx**2 <= c * c + c + 1e-9
    if kind == "triangle":
        return np.abs(dx) <= yy / (b - 1) * c + 1e-9
    if kind == "cross":
        t = b // 6
        return (np.abs(dx) <= t) | (np.abs(dy) <= t)
    raise ValueError(f"unknown shape kind {kind!r} (known: {', '.join(KINDS)})")


@lru_cache(maxsize=16)
def _masks(size: int) -> dict[tuple[str, int, int], np.ndarray]:
    """Boolean [size, size] mask of every (kind, row, col), computed once per size."""
    check_size(size)
    b = _box_side(size)
    out = {}
    for kind in KINDS:
        km = _kind_mask(kind, b)
        for r in range(3):
            for c in range(3):
                top = min(int(np.floor((r + 0.5) * size / 3 - b / 2 + 0.5)), size - b)
                left = min(int(np.floor((c + 0.5) * size / 3 - b / 2 + 0.5)), size - b)
                m = np.zeros((size, size), bool)
                m[top:top + b, left:left + b] = km
                m.setflags(write=False)
                out[(kind, r, c)] = m
    return out


def shape_mask(scene: Scene, size: int) -> np.ndarray:
    return _masks(size)[(scene.kind, scene.row, scene.col)]


def render(scene: Scene, size: int = 16) -> np.ndarray:
    img = np.empty((3, size, size), np.float32)
    img[:] = np.asarray(COLORS[scene.background], np.float32)[:, None, None]
    img[:, shape_mask(scene, size)] = np.asarray(COLORS[scene.color], np.float32)[:, None]
    return img


def sample_scene(rng: np.random.Generator) -> Scene:
    bg, color = rng.choice(len(COLOR_NAMES), size=2, replace=False)
    return Scene(COLOR_NAMES[bg], COLOR_NAMES[color], KINDS[rng.integers(len(KINDS))],
                 int(rng.integers(3)), int(rng.integers(3)))


# ---- parsing images back into scenes ------------------------------------------------------------

_PALETTE = np.asarray([COLORS[n] for n in COLOR_NAMES], np.float32)  # [P, 3]


def _as_image(image) -> np.ndarray:
    if hasattr(image, "detach"):  # a torch tensor; this module stays torch-free
        image = image.detach().cpu().numpy()
    img = np.asarray(image, np.float32)
    if img.ndim != 3 or img.shape[0] != 3 or img.shape[1] != img.shape[2]:
        raise ValueError(f"expected an image of shape [3, S, S], got {list(img.shape)}")
    return img


def _nearest_color(img: np.ndarray) -> np.ndarray:
    """Palette index of every pixel: [S, S]."""
    d = ((img[None] - _PALETTE[:, :, None, None]) ** 2).sum(1)
    return d.argmin(0)


def decode_scene(image) -> Scene | None:
    """Best-effort reading of an image as a scene (for evaluating generated images): majority
    palette colour is the background, the majority other colour is the shape, and kind and cell
    are the template mask with the best IoU. None when no pixel differs from the background."""
    img = _as_image(image)
    size = img.shape[-1]
    idx = _nearest_color(img)
    counts = np.bincount(idx.ravel(), minlength=len(COLOR_NAMES))
    bg = int(counts.argmax())
    counts[bg] = 0
    if counts.sum() == 0:
        return None
    color = int(counts.argmax())
    obj = idx == color
    best, best_iou = None, -1.0
    for (kind, r, c), m in _masks(size).items():
        iou = (obj & m).sum() / (obj | m).sum()
        if iou > best_iou:
            best, best_iou = (kind, r, c), iou
    return Scene(COLOR_NAMES[bg], COLOR_NAMES[color], *best)


def scene_from_image(image) -> Scene:
    """The exact scene an image renders; ValueError when the image is not a rendered scene."""
    img = _as_image(image)
    scene = decode_scene(img)
    if scene is None or np.abs(render(scene, img.shape[-1]) - img).max() > 1e-3:
        raise ValueError("source image is not a ShapesBench scene (it does not re-render exactly)")
    return scene


# ---- prompts ----------------------------------------------------------------------------------

def _pos(row: int, col: int) -> str:
    return f"{ROWS[row]} {COLS[col]}"


def describe(scene: Scene) -> str:
    return f"a {scene.color} {scene.kind} at {_pos(scene.row, scene.col)} on a {scene.background} background"


def _index(word: str, names: list[str], prompt: str) -> int:
    if word not in names:
        raise ValueError(f"prompt {prompt!r}: {word!r} is not one of {', '.join(names)}")
    return names.index(word)


def _name(word: str, names: list[str], prompt: str) -> str:
    return names[_index(word, names, prompt)]


T2I_ATTRIBUTES = ("kind", "color", "position", "background")
T2I_FORMS = ("full", "kind_color", "no_background", "no_position")  # which attributes a t2i prompt fixes


def describe_partial(scene: Scene, form: str = "full") -> str:
    """A t2i prompt of `scene` that fixes kind and colour, plus position and/or background by `form`."""
    head = f"a {scene.color} {scene.kind}"
    at, on = f" at {_pos(scene.row, scene.col)}", f" on a {scene.background} background"
    parts = {"full": at + on, "kind_color": "", "no_background": at, "no_position": on}
    if form not in parts:
        raise ValueError(f"unknown t2i prompt form {form!r} (known: {', '.join(T2I_FORMS)})")
    return head + parts[form]


def determined(ins: Instruction) -> tuple[str, ...]:
    """The attributes a t2i instruction fixes (kind and colour always)."""
    out = ["kind", "color"]
    if ins.row is not None:
        out.append("position")
    if ins.background is not None:
        out.append("background")
    return tuple(out)


def _parse_t2i(w: list[str], p: str) -> Instruction | None:
    """`a COLOR KIND [at ROW COL] [on a BG background]`; None for a prompt not starting with `a`."""
    if len(w) < 3 or w[0] != "a":
        return None
    color, kind = _name(w[1], COLOR_NAMES, p), _name(w[2], KINDS, p)
    rest, row = w[3:], None
    col = bg = None
    if rest[:1] == ["at"] and len(rest) >= 3:
        row, col, rest = _index(rest[1], ROWS, p), _index(rest[2], COLS, p), rest[3:]
    if len(rest) == 4 and rest[:2] == ["on", "a"] and rest[3] == "background":
        bg, rest = _name(rest[2], COLOR_NAMES, p), []
    if rest:
        raise ValueError(f"prompt {p!r}: not a ShapesBench prompt")
    if bg == color:
        raise ValueError(f"prompt {p!r}: the shape and the background have the same colour")
    scene = Scene(bg, color, kind, row, col) if bg is not None and row is not None else None
    return Instruction("t2i", "t2i", scene=scene, background=bg, kind=kind, color=color, row=row, col=col)


def parse_prompt(prompt: str) -> Instruction:
    w, p = prompt.split(), prompt
    n = len(w)
    t2i = _parse_t2i(w, p)
    if t2i is not None:
        return t2i
    if w == ["invert", "the", "colors"]:
        return Instruction("global_edit", "invert")
    if w == ["swap", "the", "colors"]:
        return Instruction("global_edit", "swap")
    if w == ["rotate", "the", "color", "channels"]:
        return Instruction("global_edit", "rotate")
    if n == 4 and w[:3] == ["make", "the", "background"]:
        return Instruction("global_edit", "background", color=_name(w[3], COLOR_NAMES, p))
    if n == 4 and w[:2] == ["make", "the"]:
        return Instruction("local_edit", "recolor", kind=_name(w[2], KINDS, p), color=_name(w[3], COLOR_NAMES, p))
    if n == 6 and w[:2] == ["turn", "the"] and w[3:5] == ["into", "a"]:
        return Instruction("local_edit", "reshape", kind=_name(w[2], KINDS, p), new_kind=_name(w[5], KINDS, p))
    if n == 6 and w[:2] == ["move", "the"] and w[3] == "to":
        return Instruction("local_edit", "move", kind=_name(w[2], KINDS, p),
                           row=_index(w[4], ROWS, p), col=_index(w[5], COLS, p))
    raise ValueError(f"prompt {p!r}: not a ShapesBench prompt")


def _rotate(color: str) -> str:
    r, g, b = COLORS[color]
    return COLOR_NAMES[[COLORS[n] for n in COLOR_NAMES].index((b, r, g))]


def _invert(color: str) -> str:
    return COLOR_NAMES[[COLORS[n] for n in COLOR_NAMES].index(tuple(-v for v in COLORS[color]))]


def apply_instruction(ins: Instruction, source: Scene | None) -> Scene:
    """The target scene of an instruction (edits need the source scene)."""
    if ins.task == "t2i":
        if ins.scene is None:
            free = [a for a in T2I_ATTRIBUTES if a not in determined(ins)]
            raise ValueError(f"t2i prompt leaves {' and '.join(free)} free: it has no single ground truth")
        return ins.scene
    if source is None:
        raise ValueError(f"{ins.task} ({ins.op}) needs a source image")
    if ins.kind is not None and ins.kind != source.kind:
        raise ValueError(f"the prompt names a {ins.kind} but the source image shows a {source.kind}")
    if ins.op == "recolor":
        if ins.color == source.background:
            raise ValueError(f"recolouring the shape {ins.color} would hide it on a {source.background} background")
        return replace(source, color=ins.color)
    if ins.op == "reshape":
        return replace(source, kind=ins.new_kind)
    if ins.op == "move":
        return replace(source, row=ins.row, col=ins.col)
    if ins.op == "invert":
        return replace(source, background=_invert(source.background), color=_invert(source.color))
    if ins.op == "swap":
        return replace(source, background=source.color, color=source.background)
    if ins.op == "rotate":
        return replace(source, background=_rotate(source.background), color=_rotate(source.color))
    if ins.op == "background":
        if ins.color == source.color:
            raise ValueError(f"a {ins.color} background would hide the {source.color} shape")
        return replace(source, background=ins.color)
    raise ValueError(f"unknown edit operation {ins.op!r}")


FREE_ATTRIBUTES = ("position", "background")  # what a partly specified t2i prompt may leave free
_FORM_FREES = {"kind_color": {"position", "background"}, "no_background": {"background"}, "no_position": {"position"}}


def partial_forms(free=FREE_ATTRIBUTES) -> tuple[str, ...]:
    """The partly specified t2i prompt forms that leave free only attributes in `free`."""
    bad = sorted(set(free) - set(FREE_ATTRIBUTES))
    if bad or not free:
        raise ValueError(f"t2i free attributes: {list(free)} must be a non-empty subset of {list(FREE_ATTRIBUTES)}")
    return tuple(f for f in T2I_FORMS[1:] if _FORM_FREES[f] <= set(free))


def make_example(task: str, rng: np.random.Generator, size: int = 16, partial_t2i: float = 0.0,
                 t2i_free=FREE_ATTRIBUTES) -> tuple[str, Scene | None, Scene]:
    """(prompt, source scene or None, target scene) of one random example of a task. With
    `partial_t2i` > 0 that fraction of t2i prompts leaves some of `t2i_free` (position,
    background) free (the target is then one draw from the prompt's distribution of correct images)."""
    check_size(size)
    src = sample_scene(rng)
    if task == "t2i":
        if partial_t2i > 0 and rng.random() < partial_t2i:
            forms = partial_forms(t2i_free)
            return describe_partial(src, forms[int(rng.integers(len(forms)))]), None, src
        return describe(src), None, src
    if task == "local_edit":
        op = LOCAL_OPS[rng.integers(len(LOCAL_OPS))]
        if op == "recolor":
            choices = [c for c in COLOR_NAMES if c not in (src.color, src.background)]
            prompt = f"make the {src.kind} {choices[rng.integers(len(choices))]}"
        elif op == "reshape":
            choices = [k for k in KINDS if k != src.kind]
            prompt = f"turn the {src.kind} into a {choices[rng.integers(len(choices))]}"
        else:
            cells = [(r, c) for r in range(3) for c in range(3) if (r, c) != (src.row, src.col)]
            r, c = cells[rng.integers(len(cells))]
            prompt = f"move the {src.kind} to {_pos(r, c)}"
    elif task == "global_edit":
        op = GLOBAL_OPS[rng.integers(len(GLOBAL_OPS))]
        if op == "background":
            choices = [c for c in COLOR_NAMES if c not in (src.color, src.background)]
            prompt = f"make the background {choices[rng.integers(len(choices))]}"
        else:
            if op == "rotate" and src.background in ("black", "white"):
                # Rotating channels leaves grey levels alone; a global edit must change the background.
                choices = [c for c in COLOR_NAMES if c not in ("black", "white", src.color)]
                src = replace(src, background=choices[rng.integers(len(choices))])
            prompt = {"invert": "invert the colors", "swap": "swap the colors", "rotate": "rotate the color channels"}[op]
    else:
        raise ValueError(f"unknown ShapesBench task {task!r} (known: {', '.join(TASKS)})")
    return prompt, src, apply_instruction(parse_prompt(prompt), src)


def target_scene(prompt: str, source_image=None) -> Scene:
    src = None if source_image is None else scene_from_image(source_image)
    return apply_instruction(parse_prompt(prompt), src)


def ground_truth(prompt: str, source_image=None, size: int = 16) -> np.ndarray:
    """The exact target image of a prompt (and source image, for edits), from the condition alone."""
    if source_image is not None and _as_image(source_image).shape[-1] != size:
        raise ValueError(f"source image is {_as_image(source_image).shape[-1]} px, expected {size}")
    return render(target_scene(prompt, source_image), size)


# ---- tokenizer --------------------------------------------------------------------------------

def tokenize(prompt: str, max_tokens: int) -> list[int]:
    """Word ids padded (or truncated) to max_tokens; unknown words become <unk>."""
    ids = [_WORD_ID.get(w, UNK_ID) for w in prompt.split()][:max_tokens]
    return ids + [PAD_ID] * (max_tokens - len(ids))


def detokenize(ids) -> str:
    return " ".join(VOCAB[int(i)] for i in ids if int(i) != PAD_ID)


# ---- PNG io and the dataset -------------------------------------------------------------------

def save_png(image, path: str | Path) -> None:
    from PIL import Image

    img = _as_image(image)
    u8 = np.clip(np.round((img + 1) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    Image.fromarray(u8, "RGB").save(path)


MAX_IMAGE_BYTES = 64 * 2**20  # larger image files are refused before they are read
MAX_IMAGE_SIDE = 4096  # and images with a larger side before they are decoded


class ImageError(ValueError):
    """An image file that cannot be used; the message is one line and names the file."""


def load_png(path: str | Path, size: int | None = None) -> np.ndarray:
    """A PNG as float32 [3, H, W] in [-1, 1]. ImageError for a missing, oversized or unreadable
    file, and (with `size`) for an image that is not size x size; sizes are read from the header,
    so an oversized image is never decoded."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path} not found")
    nbytes = path.stat().st_size
    if nbytes > MAX_IMAGE_BYTES:
        raise ImageError(f"image {path} is {nbytes / 2**20:.0f} MiB, more than {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if max(w, h) > MAX_IMAGE_SIDE:
                raise ImageError(f"image {path} is {w}x{h}, more than {MAX_IMAGE_SIDE} px a side")
            if size is not None and (w, h) != (size, size):
                raise ImageError(f"image {path} is {w}x{h}, expected {size}x{size}")
            u8 = np.asarray(im.convert("RGB"), np.float32)
    except ImageError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        detail = (str(e).splitlines() or [type(e).__name__])[0].replace(f" '{path}'", "").replace(str(path), "the file")
        raise ImageError(f"image {path} is not a readable image ({detail[:100]})") from None
    return (u8.transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32)


def write_shapes_dataset(out_dir: str | Path, n_per_task: int, seed: int, image_size: int = 16,
                         tasks=TASKS, partial_t2i: float = 0.0, heldout: int = 0, t2i_free=FREE_ATTRIBUTES) -> Path:
    """Write n_per_task examples of each task: PNGs under out_dir/images/ and out_dir/data.csv.
    `partial_t2i`: fraction of t2i prompts that leave some of `t2i_free` (position, background) free.
    `heldout` > 0 also writes out_dir/heldout.csv: that many examples per task from a separate
    random stream, none of whose (prompt, source) pairs is in data.csv (partly specified t2i
    prompts excepted: there are few of them, their drawn target is what is new). Every row's caption_dict
    holds the exact source and target scenes and the attributes its prompt determines."""
    if not 0.0 <= partial_t2i <= 1.0:
        raise ValueError(f"partial_t2i: {partial_t2i} is not a fraction in [0, 1]")
    partial_forms(t2i_free)  # an unknown attribute fails before anything is written
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    seen: set[tuple[str, str]] = set()
    path = _write_split(out, "data.csv", "", np.random.default_rng(seed), n_per_task, image_size, tasks, partial_t2i, seen,
                        t2i_free=t2i_free)
    if heldout > 0:
        _write_split(out, "heldout.csv", "heldout-", np.random.default_rng([seed, 1]), heldout, image_size, tasks,
                     partial_t2i, seen, exclude=True, t2i_free=t2i_free)
    return path


def _write_split(out: Path, name: str, prefix: str, rng: np.random.Generator, n_per_task: int, image_size: int,
                 tasks, partial_t2i: float, seen: set, exclude: bool = False, t2i_free=FREE_ATTRIBUTES) -> Path:
    rows = []
    for task in tasks:
        i = tries = 0
        while i < n_per_task:
            prompt, src, tgt = make_example(task, rng, image_size, partial_t2i, t2i_free)
            # Partly specified t2i prompts are few (32 kind-colour pairs, ...): held out in their draw only.
            key = (prompt, "" if src is None else describe(src))
            free = task == "t2i" and parse_prompt(prompt).scene is None
            tries += 1
            if exclude and key in seen and not free:
                if tries > 1000 * n_per_task:
                    raise ValueError(f"cannot draw {n_per_task} held-out {task} examples unseen in training")
                continue
            seen.add(key)
            uid = f"{prefix}{task}-{i:05d}"
            i += 1
            src_rel = ""
            if src is not None:
                src_rel = f"images/{uid}_src.png"
                save_png(render(src, image_size), out / src_rel)
            tgt_rel = f"images/{uid}_tgt.png"
            save_png(render(tgt, image_size), out / tgt_rel)
            caption = {"source": src.to_dict() if src else None, "target": tgt.to_dict()}
            ins = parse_prompt(prompt)
            if ins.task == "t2i":
                caption["determined"] = list(determined(ins))
            rows.append({"uid": uid, "task": task, "prompt": prompt, "source_image": src_rel,
                         "target_image": tgt_rel, "raw_task": parse_prompt(prompt).op,
                         "caption_dict": json.dumps(caption, sort_keys=True)})
    path = out / name
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["uid", "task", "prompt", "source_image", "target_image", "raw_task", "caption_dict"])
        w.writeheader()
        w.writerows(rows)
    return path


# ---- evaluation -------------------------------------------------------------------------------

def _as_batch(images) -> list[np.ndarray]:
    return [_as_image(im) for im in images]


def attribute_accuracy(images, prompts) -> dict[str, float]:
    """GenEval-like: fraction of images whose decoded shape kind / colour / cell / background
    match the description. `prompts` holds t2i prompts or target Scenes (for edits);
    `all` counts images with every attribute right."""
    keys = ("kind", "color", "position", "background", "all")
    hits = dict.fromkeys(keys, 0)
    imgs = _as_batch(images)
    if len(imgs) != len(prompts):
        raise ValueError(f"{len(imgs)} images but {len(prompts)} prompts")
    for img, p in zip(imgs, prompts, strict=True):
        ins = None if isinstance(p, Scene) else parse_prompt(p)
        if ins is not None and ins.task != "t2i":
            raise ValueError(f"prompt {p!r}: attribute accuracy needs a t2i prompt or a target Scene")
        want = p if ins is None else ins  # both carry kind, color, row, col, background
        fixed = T2I_ATTRIBUTES if ins is None else determined(ins)  # free attributes are always right
        got = decode_scene(img)
        if got is None:
            continue
        ok = {"kind": got.kind == want.kind, "color": got.color == want.color,
              "position": "position" not in fixed or (got.row, got.col) == (want.row, want.col),
              "background": "background" not in fixed or got.background == want.background}
        ok["all"] = all(ok.values())
        for k in keys:
            hits[k] += int(ok[k])
    return {k: hits[k] / max(len(imgs), 1) for k in keys}


def preservation(images, sources, prompts=None, tol: float = 0.5) -> float:
    """Local edits: mean fraction of pixels outside the edited object that keep their source value
    (max channel error below tol). The excluded region is the source object, plus the target
    object when the edit prompts are given (a move or reshape may paint new pixels)."""
    imgs, srcs = _as_batch(images), _as_batch(sources)
    if len(imgs) != len(srcs):
        raise ValueError(f"{len(imgs)} images but {len(srcs)} sources")
    scores = []
    for i, (img, src) in enumerate(zip(imgs, srcs, strict=True)):
        size = src.shape[-1]
        scene = scene_from_image(src)
        region = shape_mask(scene, size).copy()
        if prompts is not None:
            region |= shape_mask(target_scene(prompts[i], src), size)
        keep = ~region
        ok = np.abs(img - src).max(0) < tol
        scores.append(float(ok[keep].mean()))
    return float(np.mean(scores)) if scores else 0.0


def image_distance(images, targets) -> float:
    """Mean per-image RMSE to the ground-truth images (0 = exact)."""
    imgs, tgts = _as_batch(images), _as_batch(targets)
    if len(imgs) != len(tgts):
        raise ValueError(f"{len(imgs)} images but {len(tgts)} targets")
    return float(np.mean([np.sqrt(((a - b) ** 2).mean()) for a, b in zip(imgs, tgts, strict=True)])) if imgs else 0.0
