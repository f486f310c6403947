"""`sd3`: Stable Diffusion 3 / 3.5 (diffusers `StableDiffusion3Pipeline` folders).

Text-to-image and operator fields (realism, CFG absorption), as the paper uses SD3.5-Medium.
The family has no image-conditioned path, so routes that require a source image are refused
(use `zimage` for edits). Cached per row: `prompt_embeds` [77 + T5 tokens, joint_dim] and
`pooled` [pooled_dim] exactly as the pipeline's own `encode_prompt` computes them (CLIP-L,
CLIP-G and T5; the empty prompt is CFG's negative, as in the pipeline), and the target image's
latent mean (`target_latents`, VAE shift and scale applied) for methods that train on data.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from danceopd.backends.base import Row
from danceopd.backends.images import load_bucket
from danceopd.backends.latent import LatentBackend

COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


class SD3Backend(LatentBackend):
    name = "sd3"
    sigma_grid = "sd3"
    transformer_class = "SD3Transformer2DModel"
    default_seq_len = 256
    encoder_components = COMPONENTS
    text_fields = ("prompt_embeds", "pooled")
    supports_source_image = False

    @staticmethod
    def write_tiny(out: Path, seed: int = 0, layers: int = 2, heads: int = 2, head_dim: int = 8) -> Path:
        return write_tiny_sd3(out, seed=seed, layers=layers, heads=heads, head_dim=head_dim)

    def _text_signature(self, c: dict) -> dict:
        return {"text dim": c.get("joint_attention_dim"), "pooled dim": c.get("pooled_projection_dim")}

    # ---- encoders (cache building only) ------------------------------------------------------------
    def _load_encoders(self) -> None:
        from diffusers import AutoencoderKL, StableDiffusion3Pipeline

        # The pipeline's own encode_prompt, without loading the transformer.
        self._pipe = StableDiffusion3Pipeline.from_pretrained(self.root, transformer=None, use_safetensors=True,
                                                              dtype=torch.float32).to(self.device)
        if not isinstance(self._pipe.vae, AutoencoderKL):
            raise ValueError(f"backend.pretrained: {self.root}/vae is not an AutoencoderKL")

    def _free_encoders(self) -> None:
        self._pipe = None

    @torch.no_grad()
    def encode_rows(self, rows: list[Row | None]) -> dict[str, torch.Tensor]:
        prompts = ["" if r is None else r.prompt for r in rows]
        embeds, _, pooled, _ = self._pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.seq_len)
        out = {"prompt_embeds": embeds.float(), "pooled": pooled.float()}
        has = [r is not None and r.target_image is not None for r in rows]
        target = torch.zeros(len(rows), *self.state_shape)
        if any(has):
            imgs = torch.stack([load_bucket(r.target_image, self.resolution) for r, h in zip(rows, has) if h])
            target[torch.tensor(has)] = self.vae_encode(self._pipe.vae, imgs).cpu()
        out["target_latents"] = target
        out["has_target"] = torch.tensor(has, dtype=torch.float32)[:, None]
        return out

    def vae_encode(self, vae, images: torch.Tensor) -> torch.Tensor:
        """Deterministic: the latent distribution's mean, shifted and scaled as the pipeline does."""
        mean = vae.encode(images.to(self.device, torch.float32)).latent_dist.mean
        return (mean - vae.config.shift_factor) * vae.config.scaling_factor

    # ---- the transformer --------------------------------------------------------------------------
    def forward(self, model, z, timestep, fields):
        # SD3's transformer predicts noise - x0 at timestep 1000*sigma: our convention as is.
        return model(hidden_states=z, encoder_hidden_states=fields["prompt_embeds"],
                     pooled_projections=fields["pooled"], timestep=timestep, return_dict=True).sample

    def load_vae(self):
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(self.root / "vae", use_safetensors=True, dtype=torch.float32)

    def vae_decode(self, vae, z):
        return vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1)


# ---- a tiny random pipeline of the real classes (smoke tests, CI) ---------------------------------

_CHARS = string.ascii_lowercase + string.digits


def _clip_tokenizer(folder: Path):
    """A character-level CLIP BPE vocabulary (no merges): real CLIPTokenizer files, made offline."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in _CHARS:
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(str(folder))
    return tok


def _t5_tokenizer(folder: Path):
    """A character-level Unigram tokenizer.json wrapped as the real T5TokenizerFast."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [(c, -1.0) for c in _CHARS]
    t = Tokenizer(models.Unigram(vocab, unk_id=2))
    t.normalizer = normalizers.Lowercase()
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t.save(str(folder / "tokenizer-src.json"))
    tok = T5TokenizerFast(tokenizer_file=str(folder / "tokenizer-src.json"), eos_token="</s>", pad_token="<pad>",
                          unk_token="<unk>", extra_ids=0, model_max_length=512)
    (folder / "tokenizer-src.json").unlink()
    tok.save_pretrained(str(folder))
    return tok


def write_tiny_sd3(out: Path, seed: int = 0, t5: bool = True, layers: int = 2, heads: int = 2, head_dim: int = 8) -> Path:
    """A tiny random StableDiffusion3Pipeline folder (real classes, random weights): transformer,
    VAE, CLIP-L/G-shaped text encoders with projection, T5 encoder, their tokenizers, scheduler.
    Loads back with `StableDiffusion3Pipeline.from_pretrained(out)`. `layers`, `heads`, `head_dim`
    size the transformer (a GPU smoke test wants a few hundred M parameters, tests want 30 k)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    out = Path(out)
    torch.manual_seed(seed)
    tok = _clip_tokenizer(out / "tokenizer")
    tok2 = _clip_tokenizer(out / "tokenizer_2")
    width = 32  # CLIP hidden size; two of them concatenated = the T5 width (joint_attention_dim)

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=width // 2, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            projection_dim=16, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))

    te, te2 = clip(), clip()
    te3 = tok3 = None
    if t5:
        tok3 = _t5_tokenizer(out / "tokenizer_3")
        te3 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=width, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=width, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=32, pos_embed_max_size=64)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, shift_factor=0.0609, scaling_factor=1.5035,
                        use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out
