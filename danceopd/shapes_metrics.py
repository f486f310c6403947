"""ShapesBench metrics: the paper's metrics, made exact on the procedural world (one module).

Paper metric -> ShapesBench analogue (images float32 [3, S, S] in [-1, 1]):

- FID (Inception pool features)   -> `fd`: Fréchet distance between the features of generated and
  reference images in a FIXED feature space: the 64-d penultimate layer of a small attribute
  classifier (`FeatureNet`: 3 convs + fc, heads for background, colour, kind and cell) trained once
  with seed 0 on noisy renders and saved (`feature_net()`); the analogue of Inception features.
  The reference set is the held-out split's ground-truth images of the same prompts, so partly
  specified prompts ("a red circle") reward matching the prompt's *distribution* (diversity).
- GenEval / CLIP score            -> `acc`: attribute accuracy parsed from pixels (exact scene
  decoding): every attribute the prompt determines right; free attributes always count as right.
- local edit (GEdit)              -> `success` (the decoded image is exactly the target scene and its
  object covers the target mask: IoU >= OVERLAP_FLOOR), `preservation` (pixels outside the source
  and target object keep their source value) and `success_preserved`, the two together per prompt
  (preservation >= PRESERVATION_FLOOR): a copy of the source or the object erased scores 0 there,
  although its preservation is 1. Global edits use the same `success`.
- the FD noise floor              -> `fd_floor`: the FD of the held-out ground truth against an
  independent redraw of it (each prompt's free attributes drawn again), at the row's sample size.
- LPIPS                           -> `distance`: LPIPS's formula on the fixed feature network:
  per conv layer, unit-normalise the channel vector at every pixel, squared difference summed
  over channels, mean over pixels, mean over the 3 layers (uniform weights instead of LPIPS's
  learned linear heads). 0 for identical images.

Adapters for the paper's real metrics (`inception_fid`, `clip_score`, `lpips_distance`) load their
weights from a configured local path only (argument or env var; never a hub download) and raise
`RealMetricError` with a one-line message when it is missing. Their backbones can be injected
(tests use random-initialised ones).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from danceopd import shapes_world as sw

FEATURE_SEED = 0
FEATURE_DIM = 64
FEATURE_STEPS = 600
DEFAULT_FEATURE_DIR = Path(__file__).resolve().parent.parent / "bench" / "results" / "shapes_features"


# ---- the fixed feature space ----------------------------------------------------------------------

class FeatureNet(nn.Module):
    """Attribute classifier whose penultimate layer is the fixed feature space."""

    HEADS = {"background": len(sw.COLOR_NAMES), "color": len(sw.COLOR_NAMES), "kind": len(sw.KINDS), "cell": 9}

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.convs = nn.ModuleList([nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                                    nn.Conv2d(32, 32, 3, stride=2, padding=1)])
        side = (size + 3) // 4
        self.fc = nn.Linear(32 * side * side, FEATURE_DIM)
        self.heads = nn.ModuleDict({k: nn.Linear(FEATURE_DIM, n) for k, n in self.HEADS.items()})

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for conv in self.convs:
            x = torch.relu(conv(x))
            out.append(x)
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.taps(x)[-1].flatten(1)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: h(f) for k, h in self.heads.items()}


def _scene_batch(rng: np.random.Generator, n: int, size: int):
    scenes = [sw.sample_scene(rng) for _ in range(n)]
    x = torch.from_numpy(np.stack([sw.render(s, size) for s in scenes]))
    y = {"background": [sw.COLOR_NAMES.index(s.background) for s in scenes],
         "color": [sw.COLOR_NAMES.index(s.color) for s in scenes],
         "kind": [sw.KINDS.index(s.kind) for s in scenes], "cell": [3 * s.row + s.col for s in scenes]}
    return x, {k: torch.tensor(v) for k, v in y.items()}


def train_feature_net(size: int, steps: int = FEATURE_STEPS, seed: int = FEATURE_SEED) -> FeatureNet:
    """The classifier, trained from `seed` on renders with random Gaussian noise (std up to 0.5),
    so generated images that are almost right land near their scene's features."""
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(size)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(steps):
            x, y = _scene_batch(rng, 128, size)
            x = x + torch.randn_like(x) * torch.rand(len(x), 1, 1, 1) * 0.5
            out = net(x)
            loss = sum(nn.functional.cross_entropy(out[k], y[k]) for k in y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False)


@lru_cache(maxsize=4)
def feature_net(size: int, folder: str | None = None) -> FeatureNet:
    """The saved feature network of this image size (trained once with FEATURE_SEED and written to
    `folder`/features-<size>.safetensors when absent)."""
    from safetensors.torch import load_file, save_file

    path = Path(folder or DEFAULT_FEATURE_DIR) / f"features-{size}.safetensors"
    if path.is_file():
        net = FeatureNet(size)
        net.load_state_dict(load_file(str(path)))
        return net.eval().requires_grad_(False)
    net = train_feature_net(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return net


def _tensor(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
    else:
        x = torch.from_numpy(np.stack([np.asarray(i, np.float32) for i in images]))
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape [N, 3, S, S], got {list(x.shape)}")
    return x


@torch.no_grad()
def features(images, net: FeatureNet | None = None) -> torch.Tensor:
    x = _tensor(images)
    return (net or feature_net(x.shape[-1])).features(x).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (float64):
    |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)."""
    a, b = a.double(), b.double()
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Fréchet distance needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)

    def sqrtm(m):
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp(min=0).sqrt()) @ v.T

    s = sqrtm(ca)
    cross = torch.linalg.eigvalsh(s @ cb @ s).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(ca) + torch.trace(cb) - 2 * cross)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


@torch.no_grad()
def perceptual_distance(a, b, net: FeatureNet | None = None) -> torch.Tensor:
    """LPIPS's formula on the fixed feature network, per image pair [N]."""
    xa, xb = _tensor(a), _tensor(b)
    if xa.shape != xb.shape:
        raise ValueError(f"image batches differ in shape: {list(xa.shape)} vs {list(xb.shape)}")
    net = net or feature_net(xa.shape[-1])
    d = [(_unit(fa) - _unit(fb)).pow(2).sum(1).mean((1, 2)) for fa, fb in zip(net.taps(xa), net.taps(xb))]
    return torch.stack(d).mean(0)


# ---- per-task scores --------------------------------------------------------------------------------

# An edit counts only when its object lands on the target mask, not merely when the best-matching
# template is the right one: IoU of the pixels of the target's shape colour with the target mask at
# least this. The exact target scores 1; the object kept at its source cell and also drawn at the
# target (a copy-and-paste smudge) 0.5; any shape 1 px off 0.29-0.67; a quarter of it missing 0.75.
# Measured on a 4000-update local-edit teacher (512 held-out edits): of its 219 outputs that decode
# as the target, the 153 at or above 0.75 are the shape with a pixel or two off, those below are
# half-drawn or misshapen; its 1000-update checkpoint's 69 such "successes" have median IoU 0.44.
OVERLAP_FLOOR = 0.75
# A local edit counts together with preservation only at or above this per prompt: 206-247 pixels lie
# outside the edited objects, so a stray copy of the smallest shape (a 9-px cross) anywhere fails.
# That teacher's successes keep at least 0.983.
PRESERVATION_FLOOR = 0.97


def target_overlap(image, scene: sw.Scene) -> float:
    """IoU of the pixels whose nearest palette colour is the scene's shape colour with the scene's
    shape mask (1 for the exact rendering, 0 when no pixel has that colour)."""
    img = sw._as_image(image)
    obj = sw._nearest_color(img) == sw.COLOR_NAMES.index(scene.color)  # decode_scene's own pixel reading
    mask = sw.shape_mask(scene, img.shape[-1])
    return float((obj & mask).sum() / (obj | mask).sum())


def edit_success(image, target: sw.Scene) -> bool:
    """The decoded image is exactly the target scene and its object covers the target mask."""
    return sw.decode_scene(image) == target and target_overlap(image, target) >= OVERLAP_FLOOR


def _local_outcomes(x: np.ndarray, sources, prompts: list[str]) -> tuple[list[bool], list[float]]:
    """Per image: edit success, preservation."""
    srcs = [np.asarray(s, np.float32) for s in sources]
    targets = [sw.target_scene(p, s) for p, s in zip(prompts, srcs, strict=True)]
    success = [edit_success(i, t) for i, t in zip(x, targets, strict=True)]
    kept = [sw.preservation(i[None], s[None], [p]) for i, s, p in zip(x, srcs, prompts, strict=True)]
    return success, kept


def score_t2i(images, prompts: list[str], reference) -> dict[str, float]:
    """fd (feature Fréchet distance to the reference images), acc (every determined attribute
    right), and per-attribute accuracies."""
    x = _tensor(images)
    acc = sw.attribute_accuracy(x.numpy(), prompts)
    return {"fd": frechet_distance(features(x), features(reference)), "acc": acc["all"],
            **{f"acc_{k}": v for k, v in acc.items() if k != "all"}}


def score_local(images, sources, prompts: list[str]) -> dict[str, float]:
    """success (exact target scene, object over its mask), preservation (outside the edited
    objects), success_preserved (both per prompt: success and preservation >= PRESERVATION_FLOOR)."""
    success, kept = _local_outcomes(_tensor(images).numpy(), sources, prompts)
    both = [s and k >= PRESERVATION_FLOOR for s, k in zip(success, kept)]
    return {"success": float(np.mean(success)), "preservation": float(np.mean(kept)),
            "success_preserved": float(np.mean(both))}


def score_global(images, sources, prompts: list[str]) -> dict[str, float]:
    """distance (the LPIPS analogue to the ground truth, mean), success (exact target scene, object
    over its mask), rmse."""
    x = _tensor(images)
    srcs = [np.asarray(s, np.float32) for s in sources]
    targets = [sw.target_scene(p, s) for p, s in zip(prompts, srcs)]
    truth = np.stack([sw.render(t, x.shape[-1]) for t in targets])
    return {"distance": float(perceptual_distance(x, truth).mean()),
            "success": float(np.mean([edit_success(i, t) for i, t in zip(x.numpy(), targets)])),
            "rmse": sw.image_distance(x.numpy(), truth)}


def per_prompt(task: str, images, sources, prompts: list[str]) -> list[int]:
    """1 or 0 per image, the outcome the claims count: t2i every attribute its prompt determines
    right (what `acc` averages), local edits success and preservation (`success_preserved`),
    global edits success."""
    x = _tensor(images).numpy()
    if task == "t2i":
        return [int(sw.attribute_accuracy(i[None], [p])["all"] == 1.0) for i, p in zip(x, prompts, strict=True)]
    if task == "local_edit":
        success, kept = _local_outcomes(x, sources, prompts)
        return [int(s and k >= PRESERVATION_FLOOR) for s, k in zip(success, kept)]
    targets = [sw.target_scene(p, np.asarray(s, np.float32)) for p, s in zip(prompts, sources, strict=True)]
    return [int(edit_success(i, t)) for i, t in zip(x, targets, strict=True)]


# ---- reference outputs and the FD noise floor -------------------------------------------------------

def erased(source) -> np.ndarray:
    """The source image with its object painted over with the background colour."""
    img = np.array(source, np.float32)
    scene = sw.scene_from_image(img)
    img[:, sw.shape_mask(scene, img.shape[-1])] = np.asarray(sw.COLORS[scene.background], np.float32)[:, None]
    return img


def redraw(prompt: str, rng: np.random.Generator) -> sw.Scene:
    """One draw of a t2i prompt's correct scenes, as the world draws them: what the prompt leaves
    free (background: any colour but the shape's; position: any cell) uniformly."""
    ins = sw.parse_prompt(prompt)
    if ins.task != "t2i":
        raise ValueError(f"prompt {prompt!r}: the FD floor redraws t2i prompts only")
    bg = ins.background or str(rng.choice([c for c in sw.COLOR_NAMES if c != ins.color]))
    row, col = (ins.row, ins.col) if ins.row is not None else divmod(int(rng.integers(9)), 3)
    return sw.Scene(bg, ins.color, ins.kind, row, col)


FD_FLOOR_RESAMPLES = 20


def fd_floor(prompts: list[str], reference, resamples: int = FD_FLOOR_RESAMPLES, seed: int = 0,
             net: FeatureNet | None = None) -> dict:
    """The FD a perfect model would score: the reference images against `resamples` independent
    redraws of the same prompts' ground truth (same sample size as a row's FD); mean, sample std
    and every value."""
    ref = _tensor(reference)
    if len(prompts) != len(ref):
        raise ValueError(f"FD floor: {len(ref)} reference images but {len(prompts)} prompts")
    if resamples < 2:
        raise ValueError(f"FD floor: needs at least 2 resamples, got {resamples}")
    size, rng = ref.shape[-1], np.random.default_rng(seed)
    f_ref = features(ref, net)
    values = [frechet_distance(f_ref, features(np.stack([sw.render(redraw(p, rng), size) for p in prompts]), net))
              for _ in range(resamples)]
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)), "n": len(ref),
            "resamples": resamples, "values": [round(v, 4) for v in values]}


# ---- adapters for the paper's real metrics ----------------------------------------------------------

class RealMetricError(RuntimeError):
    """A real metric cannot run (weights or package missing); the message is one line."""


def _local_path(path: str | os.PathLike | None, env: str, what: str) -> Path:
    p = path or os.environ.get(env)
    if not p:
        raise RealMetricError(f"{what}: no weights path configured (pass it or set ${env}); "
                              "weights are read from local files only, never downloaded")
    p = Path(p).expanduser()
    if not p.exists():
        raise RealMetricError(f"{what}: weights not found at {p} (set ${env} to a local copy)")
    return p


def _to_unit_range(images) -> torch.Tensor:
    return (_tensor(images) + 1) / 2  # [0, 1]


@torch.no_grad()
def inception_fid(real, fake, weights: str | os.PathLike | None = None, backbone: nn.Module | None = None,
                  resize: int = 299) -> float:
    """FID: Fréchet distance of Inception-v3 pool features. `weights`: a local torchvision
    inception_v3 state dict (.pth/.safetensors) (or $DANCEOPD_INCEPTION_WEIGHTS); `backbone`: any
    module mapping [N, 3, H, W] in [0, 1] to [N, D] features (tests inject a random one)."""
    if backbone is None:
        path = _local_path(weights, "DANCEOPD_INCEPTION_WEIGHTS", "FID (Inception-v3)")
        try:
            from torchvision.models import inception_v3
        except ImportError:
            raise RealMetricError("FID (Inception-v3): needs torchvision (pip install torchvision matching torch)") from None
        net = inception_v3(weights=None, aux_logits=False, init_weights=False)
        state = _load_state(path)
        net.load_state_dict({k: v for k, v in state.items() if not k.startswith("AuxLogits")}, strict=False)
        net.fc = nn.Identity()
        backbone = net.eval()

    def feats(x):
        x = _to_unit_range(x)
        if resize and x.shape[-1] != resize:
            x = nn.functional.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
        return backbone(x).flatten(1).double()

    return frechet_distance(feats(real), feats(fake))


def _load_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def clip_score(images, prompts: list[str], model_dir: str | os.PathLike | None = None) -> float:
    """CLIP score: 100 * max(cos(image embedding, text embedding), 0), mean. `model_dir`: a local
    transformers CLIP folder (save_pretrained: config, weights, tokenizer, image processor) or
    $DANCEOPD_CLIP_MODEL; loaded with local_files_only."""
    path = _local_path(model_dir, "DANCEOPD_CLIP_MODEL", "CLIP score")
    try:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
        proc = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise RealMetricError(f"CLIP score: {path} is not a CLIP model folder ({str(e).splitlines()[0][:120]})") from None
    x = _to_unit_range(images)
    u8 = [(img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for img in x]
    inputs = proc(text=list(prompts), images=u8, return_tensors="pt", padding=True)
    out = model(**inputs)
    img = _unit(out.image_embeds)
    txt = _unit(out.text_embeds)
    return float((100 * (img * txt).sum(-1).clamp(min=0)).mean())


@torch.no_grad()
def lpips_distance(a, b, weights: str | os.PathLike | None = None, backbone: nn.Module | None = None,
                   lin: list[torch.Tensor] | None = None) -> torch.Tensor:
    """LPIPS per image pair. Real weights: `weights` (or $DANCEOPD_LPIPS_WEIGHTS) is a local
    folder with the `lpips` package's `vgg.pth` linear heads and torchvision's `vgg16.pth`
    (needs `lpips` and torchvision). `backbone`: a module with `taps(x) -> list of feature maps`
    (inputs in [-1, 1]); `lin`: per-tap channel weights (default: uniform)."""
    if backbone is None:
        folder = _local_path(weights, "DANCEOPD_LPIPS_WEIGHTS", "LPIPS")
        for name in ("vgg.pth", "vgg16.pth"):
            if not (folder / name).is_file():
                raise RealMetricError(f"LPIPS: {folder / name} not found (the folder needs vgg.pth and vgg16.pth)")
        try:
            import lpips
            from torchvision.models import vgg16
        except ImportError:
            raise RealMetricError("LPIPS: needs the lpips package and torchvision (pip install lpips torchvision)") from None
        net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
        vgg = vgg16(weights=None)
        vgg.load_state_dict(_load_state(folder / "vgg16.pth"))
        net.net.load_state_dict({k: v for k, v in vgg.features.state_dict().items()}, strict=False)
        net.load_state_dict(_load_state(folder / "vgg.pth"), strict=False)
        return net.eval()(_tensor(a), _tensor(b)).flatten()
    xa, xb = _tensor(a), _tensor(b)
    d = []
    for i, (fa, fb) in enumerate(zip(backbone.taps(xa), backbone.taps(xb))):
        diff = (_unit(fa) - _unit(fb)).pow(2)
        w = torch.ones(diff.shape[1]) if lin is None else lin[i]
        d.append((diff * w[None, :, None, None]).sum(1).mean((1, 2)))
    return torch.stack(d).sum(0)
