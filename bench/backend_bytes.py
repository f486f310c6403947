"""Bytes the production backends move, computed from the real models' dimensions (no weights).

1. Object-store bytes per routed row (one queried state): the condition as it would travel
   inline (the cached fields: text embeddings, source latents...) versus the cache handle the
   batch carries now. Measured on a real Arrow RoutedBatch of the project's schema.
2. Weight-sync bytes per push: full SD3.5-Medium transformer versus a LoRA student's adapters,
   counted on the real diffusers class built on the meta device from SD3.5-Medium's config.

    python bench/backend_bytes.py      # writes bench/results/backend_bytes.{json,md}
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from danceopd import cond_cache as cc
from danceopd.batch import batch_schema, make_batch
from danceopd.lora import apply_lora

OUT = Path(__file__).parent / "results"

# stabilityai/stable-diffusion-3.5-medium transformer/config.json
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                   qk_norm="rms_norm")
RES, VAE_FACTOR, LATENT_CH = 1024, 8, 16  # both families: 16-channel VAE, 8x down, 1024 px bucket

# Cached fields per row (fp32 floats), from the pipelines' encode paths at their defaults.
FAMILIES = {
    # CLIP-L (77 tokens) + CLIP-G + T5-XXL (256 tokens), all padded to T5's 4096; pooled CLIP-L ++ CLIP-G
    "SD3.5-Medium (t2i)": {"prompt_embeds": (77 + 256) * 4096, "pooled": 768 + 1280},
    # Qwen3-4B hidden states (2560) at max_sequence_length 512, plus its length (zimage backend's `cap`, `cap_len`)
    "Z-Image (t2i)": {"cap": 512 * 2560, "cap_len": 1},
    # + the Omni edit prompt's fixed segments (`frame` [3, 8, 2560]), the source image's VAE latent mean at
    # the bucket and SigLIP2 (so400m, 1152 wide) features at Siglip2ImageProcessor's default
    # max_num_patches = 256 with their grid: what the zimage backend caches for an edit row
    "Z-Image (edit)": {"cap": 512 * 2560, "cap_len": 1, "frame": 3 * 8 * 2560, "frame_len": 3,
                       "src_latents": LATENT_CH * (RES // VAE_FACTOR) ** 2, "siglip": 256 * 1152, "siglip_hw": 2,
                       "has_source": 1},
}


def routed_row_bytes(cond_dim: int, sde_columns: bool = False) -> int:
    """Bytes of one routed row of an ODE method (state, target, cond, scalars; `sde_columns`: plus
    next_state and rollout_velocity, as every row carried them before) in Arrow."""
    shape = (LATENT_CH, RES // VAE_FACTOR, RES // VAE_FACTOR)
    schema = batch_schema(shape, cond_dim, sde=sde_columns)
    rb = make_batch(schema, {"sample_id": ["r0"], "cond": np.zeros((1, cond_dim), np.float32),
                             "state": np.zeros((1, *shape), np.float32)})
    return rb.nbytes


def weight_sync(rank: int) -> dict:
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**SD35_MEDIUM)
    full = sum(p.numel() for p in model.parameters())
    spec = SimpleNamespace(enabled=True, rank=rank, alpha=float(rank), target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    model = apply_lora(model, spec)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_full": full, "params_lora": lora, "lora_rank": rank,
            "bytes_full_fp32": full * 4, "bytes_full_bf16": full * 2, "bytes_lora_fp32": lora * 4}


def main() -> dict:
    rows = {}
    after = routed_row_bytes(cc.HANDLE_DIM)
    for name, fields in FAMILIES.items():
        floats = sum(fields.values())
        before = routed_row_bytes(floats)
        old = routed_row_bytes(floats, sde_columns=True)
        rows[name] = {"cond_floats_inline": floats, "row_bytes_old_schema": old, "row_bytes_inline": before,
                      "row_bytes_handle": after, "cond_bytes_saved": before - after, "ratio": round(before / after, 2),
                      "ratio_vs_old_schema": round(old / after, 2)}
    sync = [weight_sync(r) for r in (16, 64)]
    result = {"resolution": RES, "routed_rows": rows, "weight_sync_sd35_medium": sync}
    OUT.mkdir(exist_ok=True)
    (OUT / "backend_bytes.json").write_text(json.dumps(result, indent=1) + "\n")
    mb = 1 / 2**20
    lines = ["# Bytes moved by the production backends (real dimensions, 1024 px bucket)", "",
             "Per routed row through the object store (`bench/backend_bytes.py`; one queried state of an ODE "
             "method such as danceopd: state + target latents, condition, scalars, Arrow):", "",
             "| family | condition inline | before: condition inline + 4 latent columns | condition inline, 2 latent columns | after: cache handle, 2 latent columns | before / after |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['cond_floats_inline'] * 4 * mb:.2f} MiB | {r['row_bytes_old_schema'] * mb:.2f} MiB | "
                     f"{r['row_bytes_inline'] * mb:.2f} MiB | {r['row_bytes_handle'] * mb:.2f} MiB | {r['ratio_vs_old_schema']}x |")
    lines += ["", "Weight sync per push, SD3.5-Medium transformer (to_q/to_k/to_v/to_out.0 adapters):", "",
              "| student | parameters | bytes per push |", "|---|---|---|"]
    s0 = sync[0]
    lines.append(f"| full fine-tune | {s0['params_full'] / 1e6:.1f} M | {s0['bytes_full_fp32'] * mb:.0f} MiB fp32 "
                 f"({s0['bytes_full_bf16'] * mb:.0f} MiB bf16) |")
    for s in sync:
        lines.append(f"| LoRA rank {s['lora_rank']} | {s['params_lora'] / 1e6:.2f} M | {s['bytes_lora_fp32'] * mb:.1f} MiB fp32 |")
    lines += ["", "What remains of a row is its state and target latents (1 MiB each at 16x128x128 fp32). SDE "
              "methods (flowopd) add next_state and rollout_velocity (2 MiB more); ODE methods no longer ship "
              "them as zeros."]
    (OUT / "backend_bytes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
