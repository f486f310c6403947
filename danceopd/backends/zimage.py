"""`zimage`: Z-Image (diffusers `ZImagePipeline` / `ZImageOmniPipeline` folders).

Text-to-image, and editing through the image-conditioned Omni path when the transformer takes
SigLIP features (`siglip_feat_dim`, an Omni folder with `siglip/` and `siglip_processor/`).
Each row is computed exactly as the pipeline's own methods do, called on a pipeline built from
the folder without its transformer:

- text: `encode_prompt` (Qwen, hidden_states[-2], attention mask -> variable length), padded to
  `seq_len` in the cache with its length. A plain model formats t2i prompts with the chat
  template (`ZImagePipeline`); an Omni model through `ZImageOmniPipeline`, which for an edit
  splits the text into three segments around the vision tokens: [user<vision_start>],
  [<vision_end>PROMPT...<vision_start>], [<vision_end><im_end>]. Segments 0 and 2 never depend on
  the prompt and neither does the empty prompt's segment 1: they are cached in every row as the
  short `frame` field ([3, P, D]), so CFG's null branch of an edit (segment 1 of the empty prompt,
  as the pipeline's negative) needs no second null row.
- source image (edits): resized to the bucket preserving aspect ratio (`images.load_bucket`),
  VAE latent mean with the pipeline's shift and scale (deterministic; the pipeline's `mode()` is
  the same value), and SigLIP2 features from `prepare_siglip_embeds`, padded to the processor's
  `max_num_patches` with their patch grid `siglip_hw`. Image fields always come from the row,
  so the null branch keeps the source.
- target image: `target_latents` (+ `has_target`) for sft / offpolicy.

Differences from the diffusers pipelines, on purpose:
- SigLIP sees the bucket crop; `ZImageOmniPipeline` gives it the uncropped image (only
  downscaled above 1 MP) while the VAE gets the crop. One image for both keeps the cache
  fixed-shape and the two views consistent.
- The VAE encodes in fp32; the pipeline casts the image to bf16 (`image.bfloat16()`).
- One condition image per edit (the pipeline takes several: `image_noise_mask` [0]*n + [1]).
  Multi-image editing would need a variable number of cached images per row; not built.
- A batch mixing t2i and edit rows runs as two transformer calls (the Omni transformer decides
  whether SigLIP is used from the batch's first item), each exactly what the pipeline runs.

Time and sign: the pipelines pass the transformer t = (1000 - 1000*sigma) / 1000 = 1 - sigma
(0 = noise) and step the scheduler with the negated output, so our velocity
v = noise - x0 (z = (1 - sigma) x0 + sigma noise) is minus the transformer's output.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from danceopd import cond_cache as cc
from danceopd.backends.base import Row
from danceopd.backends.images import load_bucket
from danceopd.backends.latent import LatentBackend
from danceopd.backends.tiny_zimage import write_tiny_zimage

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config

__all__ = ["ZImageBackend", "write_tiny_zimage"]


def _round8(n: int) -> int:
    return max(8, -(-n // 8) * 8)


class ZImageBackend(LatentBackend):
    name = "zimage"
    sigma_grid = "zimage"
    transformer_class = "ZImageTransformer2DModel"
    default_seq_len = 512
    encoder_components = ("text_encoder", "tokenizer", "siglip", "siglip_processor")
    text_fields = ("cap", "cap_len")

    @staticmethod
    def write_tiny(out: Path, seed: int = 0, **_sd3_shape) -> Path:
        return write_tiny_zimage(out, seed=seed)  # one fixed tiny shape: make-tiny's sd3 shape options do not apply

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.omni = self.transformer_config.get("siglip_feat_dim") is not None
        self.supports_source_image = self.omni  # edits need the Omni (SigLIP) transformer
        self.text_dim = int(self.transformer_config["cap_feat_dim"])
        self._pipe = None

    def _text_signature(self, c: dict) -> dict:
        return {"text dim": c.get("cap_feat_dim"), "siglip dim": c.get("siglip_feat_dim")}

    def encoder_fingerprint(self) -> dict:
        return {**super().encoder_fingerprint(), "omni": self.omni}  # the cache layout depends on it

    def check_row(self, row: Row, needs_target: bool = False, teachers=()) -> None:
        if row.source_image is not None and not self.omni:
            raise ValueError(f"row {row.uid}: a source image needs an Omni Z-Image transformer (siglip_feat_dim); "
                             f"{self.root} is text-to-image only")
        super().check_row(row, needs_target, teachers)

    # ---- encoders (cache building only) ------------------------------------------------------------
    def _load_encoders(self) -> None:
        from diffusers import ZImageOmniPipeline, ZImagePipeline

        if self.omni:
            missing = [c for c in ("siglip", "siglip_processor") if not (self.root / c).is_dir()]
            if missing:
                raise ValueError(f"backend.pretrained: {self.root} has an Omni transformer but no {missing[0]}/")
        cls = ZImageOmniPipeline if self.omni else ZImagePipeline
        self._pipe = cls.from_pretrained(self.root, transformer=None, use_safetensors=True,
                                         dtype=torch.float32).to(self.device)
        if self.omni:
            # The edit template's prompt-independent segments, and the empty prompt's segment 1.
            self._frame = self._encode_text([""], 1)[0]
            self._frame_len = _round8(max(len(s) for s in self._frame))

    def _free_encoders(self) -> None:
        self._pipe = None

    def _encode_text(self, prompts: list[str], n_images: int) -> list:
        """Pipeline embeddings: t2i -> one [len, D] tensor per prompt; edit -> 3 segments."""
        kw = {"num_condition_images": n_images} if self.omni else {}
        embeds, _ = self._pipe.encode_prompt(list(prompts), device=self.device, do_classifier_free_guidance=False,
                                             max_sequence_length=self.seq_len, **kw)
        if self.omni and n_images == 0:
            return [e[0] for e in embeds]
        return embeds

    def vae_encode(self, vae, images: torch.Tensor) -> torch.Tensor:
        mean = vae.encode(images.to(self.device, torch.float32)).latent_dist.mean
        return (mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    @torch.no_grad()
    def encode_rows(self, rows: list[Row | None]) -> dict[str, torch.Tensor]:
        n, L, D = len(rows), self.seq_len, self.text_dim
        edit = [r is not None and r.source_image is not None for r in rows]
        for r, e in zip(rows, edit):
            if e and not self.omni:
                raise ValueError(f"row {r.uid}: a source image needs an Omni Z-Image transformer (siglip_feat_dim)")
        cap, cap_len = torch.zeros(n, L, D), torch.zeros(n, 1)

        def put(idx, embs):
            for i, e in zip(idx, embs):
                cap[i, : len(e)] = e.float().cpu()
                cap_len[i] = len(e)

        t2i = [i for i in range(n) if not edit[i]]
        eds = [i for i in range(n) if edit[i]]
        if t2i:
            put(t2i, self._encode_text(["" if rows[i] is None else rows[i].prompt for i in t2i], 0))
        if eds:
            put(eds, [segs[1] for segs in self._encode_text([rows[i].prompt for i in eds], 1)])
        out = {"cap": cap, "cap_len": cap_len}
        if self.omni:
            P = self._frame_len
            frame, frame_len = torch.zeros(3, P, D), torch.zeros(3)
            for j, s in enumerate(self._frame):
                frame[j, : len(s)], frame_len[j] = s.float().cpu()[:P], len(s)
            out["frame"], out["frame_len"] = frame.expand(n, -1, -1, -1), frame_len.expand(n, -1)
            out.update(self._encode_sources([rows[i] for i in eds], eds, n))
        has_t = [r is not None and r.target_image is not None for r in rows]
        target = torch.zeros(n, *self.state_shape)
        if any(has_t):
            imgs = torch.stack([load_bucket(r.target_image, self.resolution) for r, h in zip(rows, has_t) if h])
            target[torch.tensor(has_t)] = self.vae_encode(self._pipe.vae, imgs).float().cpu()
        out["target_latents"] = target
        out["has_target"] = torch.tensor(has_t, dtype=torch.float32)[:, None]
        return out

    def _encode_sources(self, rows: list[Row], idx: list[int], n: int) -> dict[str, torch.Tensor]:
        proc = self._pipe.siglip_processor
        n_patch, sig_dim = int(proc.max_num_patches), int(self.transformer_config["siglip_feat_dim"])
        src = torch.zeros(n, *self.state_shape)
        sig, sig_hw, has = torch.zeros(n, n_patch, sig_dim), torch.zeros(n, 2), torch.zeros(n, 1)
        if rows:
            imgs = torch.stack([load_bucket(r.source_image, self.resolution) for r in rows])
            src[idx] = self.vae_encode(self._pipe.vae, imgs).float().cpu()
            pils = [Image.fromarray(((im.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()) for im in imgs]
            feats = self._pipe.prepare_siglip_embeds(pils, 1, self.device, torch.float32)[0]  # [[h, w, C] per image]
            for i, f in zip(idx, feats):
                h, w, _ = f.shape
                sig[i, : h * w] = f.reshape(h * w, -1).float().cpu()
                sig_hw[i] = torch.tensor([h, w], dtype=torch.float32)
                has[i] = 1.0
        return {"src_latents": src, "siglip": sig, "siglip_hw": sig_hw, "has_source": has}

    # ---- the transformer --------------------------------------------------------------------------
    def gather(self, cond, device):
        fields = super().gather(cond, device)
        fields["text_on"] = cc.handle_text_on(cond).to(device)  # edits pick their null text segment
        return fields

    def forward(self, model, z, timestep, fields):
        dt = next(model.parameters()).dtype
        t = (1000.0 - timestep.float()) / 1000.0  # Z-Image time: 0 = noise, 1 = data
        x = z.to(dt).unsqueeze(2)  # [B, C, F=1, h, w]
        lens = fields["cap_len"][:, 0].round().long().tolist()
        caps = [fields["cap"][i, :n].to(dt) for i, n in enumerate(lens)]
        call = dict(patch_size=self.patch_size, f_patch_size=1, return_dict=False)
        if not self.omni:  # ZImagePipeline: flat lists
            out = model(list(x.unbind(0)), t, caps, **call)[0]
            return -torch.stack(out).squeeze(2).float()
        out: list = [None] * len(caps)
        has_src = (fields["has_source"][:, 0] > 0.5).tolist()
        t2i = [i for i, h in enumerate(has_src) if not h]
        eds = [i for i, h in enumerate(has_src) if h]
        if t2i:  # ZImageOmniPipeline without images: one noisy image, no SigLIP
            res = model(x=[[x[i]] for i in t2i], t=t[t2i], cap_feats=[[caps[i]] for i in t2i],
                        siglip_feats=[None] * len(t2i), image_noise_mask=[[1]] * len(t2i), **call)[0]
            for i, r in zip(t2i, res):
                out[i] = r
        if eds:  # one clean condition image, then the noisy target
            fl = fields["frame_len"].round().long()
            text_on = fields["text_on"].tolist()
            hw = fields["siglip_hw"].round().long().tolist()

            def seg(i, j):
                return fields["frame"][i, j, : fl[i, j]].to(dt)

            cap_feats = [[seg(i, 0), caps[i] if text_on[i] else seg(i, 1), seg(i, 2)] for i in eds]
            sig = [[fields["siglip"][i, : hw[i][0] * hw[i][1]].reshape(hw[i][0], hw[i][1], -1).to(dt), None] for i in eds]
            xs = [[fields["src_latents"][i].to(dt).unsqueeze(1), x[i]] for i in eds]
            res = model(x=xs, t=t[eds], cap_feats=cap_feats, siglip_feats=sig, image_noise_mask=[[0, 1]] * len(eds), **call)[0]
            for i, r in zip(eds, res):
                out[i] = r
        return -torch.stack(out).squeeze(2).float()

    # ---- VAE ---------------------------------------------------------------------------------------
    def load_vae(self):
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(self.root / "vae", use_safetensors=True, dtype=torch.float32)

    def vae_decode(self, vae, z):
        return vae.decode(z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample.clamp(-1, 1)

