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
- local edit (GEdit)              -> `success` (the decoded image is exactly the target scene) and
  `preservation` (pixels outside the source and target object keep their source value).
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

def _decoded_is(image, scene: sw.Scene) -> bool:
    return sw.decode_scene(image) == scene


def score_t2i(images, prompts: list[str], reference) -> dict[str, float]:
    """fd (feature Fréchet distance to the reference images), acc (every determined attribute
    right), and per-attribute accuracies."""
    x = _tensor(images)
    acc = sw.attribute_accuracy(x.numpy(), prompts)
    return {"fd": frechet_distance(features(x), features(reference)), "acc": acc["all"],
            **{f"acc_{k}": v for k, v in acc.items() if k != "all"}}


def score_local(images, sources, prompts: list[str]) -> dict[str, float]:
    """success (decoded image == target scene exactly), preservation (outside the edited objects)."""
    x = _tensor(images).numpy()
    srcs = [np.asarray(s, np.float32) for s in sources]
    targets = [sw.target_scene(p, s) for p, s in zip(prompts, srcs)]
    success = float(np.mean([_decoded_is(i, t) for i, t in zip(x, targets)]))
    return {"success": success, "preservation": sw.preservation(x, srcs, prompts)}


def score_global(images, sources, prompts: list[str]) -> dict[str, float]:
    """distance (the LPIPS analogue to the ground truth, mean), success (exact target scene), rmse."""
    x = _tensor(images)
    srcs = [np.asarray(s, np.float32) for s in sources]
    targets = [sw.target_scene(p, s) for p, s in zip(prompts, srcs)]
    truth = np.stack([sw.render(t, x.shape[-1]) for t in targets])
    return {"distance": float(perceptual_distance(x, truth).mean()),
            "success": float(np.mean([_decoded_is(i, t) for i, t in zip(x.numpy(), targets)])),
            "rmse": sw.image_distance(x.numpy(), truth)}


def per_prompt(task: str, images, sources, prompts: list[str]) -> list[int]:
    """1 or 0 per image: t2i every attribute its prompt determines right (what `acc` averages),
    edits the decoded image is exactly the target scene (what `success` averages)."""
    x = _tensor(images).numpy()
    if task == "t2i":
        return [int(sw.attribute_accuracy(i[None], [p])["all"] == 1.0) for i, p in zip(x, prompts, strict=True)]
    targets = [sw.target_scene(p, np.asarray(s, np.float32)) for p, s in zip(prompts, sources, strict=True)]
    return [int(_decoded_is(i, t)) for i, t in zip(x, targets, strict=True)]


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
