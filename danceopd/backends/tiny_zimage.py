"""A tiny random Z-Image Omni pipeline folder of the real classes (smoke tests, CI, `make-tiny`).

Everything is built from configs with random weights and written with `save_pretrained`, so
`ZImageOmniPipeline.from_pretrained(out)` (and the `zimage` backend) read it like a real
download: ZImageTransformer2DModel (with SigLIP input for the Omni path), a Flux-like
AutoencoderKL (16 latent channels, shift/scale factors), a Qwen3 text encoder, a byte-level
Qwen2Tokenizer with the Qwen chat template (made offline), Siglip2VisionModel +
Siglip2ImageProcessor and FlowMatchEulerDiscreteScheduler (shift 3). The VAE downsamples 8x like
the real one; 64 px is the smallest image the Omni pipeline accepts (32 px works for the backend).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
# Qwen3's template, reduced to what the Z-Image pipelines use (one user turn + generation prompt).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _tokenizer(folder: Path):
    """Byte-level BPE without merges (one token per byte) plus Qwen's special tokens, wrapped as
    the real Qwen2Tokenizer."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=list(SPECIAL[1:]), model_max_length=1024)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    return tok


def write_tiny_zimage(out: Path, seed: int = 0, edit: bool = True) -> Path:
    """Write the tiny pipeline to `out` (a ZImageOmniPipeline with `edit`, else a text-to-image
    ZImagePipeline whose transformer has no SigLIP input). Returns `out`."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImageOmniPipeline,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import (
        Qwen3Config,
        Qwen3Model,
        Siglip2ImageProcessor,
        Siglip2VisionConfig,
        Siglip2VisionModel,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = _tokenizer(out / "tokenizer")
    text_dim, sig_dim = 32, 24
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tok), hidden_size=text_dim, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=1024, pad_token_id=0, eos_token_id=0))
    # dim = heads x sum(axes_dims); 16 latent channels x patch 2^2 = 64 = the transformer's X_PAD_DIM.
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=text_dim, siglip_feat_dim=sig_dim if edit else None, axes_dims=[8, 4, 4],
        axes_lens=[1024, 64, 64])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                        latent_channels=16, norm_num_groups=4, sample_size=64, shift_factor=0.1159,
                        scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    parts = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer)
    if edit:
        siglip = Siglip2VisionModel(Siglip2VisionConfig(
            hidden_size=sig_dim, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_patches=16,
            patch_size=4))
        processor = Siglip2ImageProcessor(patch_size=4, max_num_patches=16)
        pipe = ZImageOmniPipeline(**parts, siglip=siglip, siglip_processor=processor)
    else:
        pipe = ZImagePipeline(**parts)
    pipe.save_pretrained(str(out), safe_serialization=True)
    index = json.loads((out / "model_index.json").read_text())
    if edit and index["siglip_processor"][1] != "Siglip2ImageProcessor":
        # Without torchvision transformers makes the PIL variant; record the class real folders name.
        index["siglip_processor"][1] = "Siglip2ImageProcessor"
        (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
