"""LoRA students through peft, for any nn.Module (diffusers transformers and the toy MLP alike).

Adapters are injected in place (`peft.inject_adapter_in_model`), so the model keeps its own
class and forward signature and backends call it unchanged. The trainable state is exactly the
parameters with requires_grad: the adapters when LoRA is on, every parameter otherwise; that is
what the learner exports to rollout workers and writes to checkpoints.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

# peft is imported only where adapters are made or met: it pulls in transformers (seconds of
# start-up in every actor process, LoRA or not).


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of target names: the full module name or its dotted suffix.
    return name == target or name.endswith("." + target)


def apply_lora(model: nn.Module, lora_cfg) -> nn.Module:
    """Inject LoRA adapters (danceopd.config.LoraConfig) and freeze the base weights.
    A disabled config returns the model untouched."""
    if not lora_cfg.enabled:
        return model
    names = [n for n, _ in model.named_modules()]
    for t in lora_cfg.target_modules:
        if not any(_matches(n, t) for n in names):
            raise ValueError(f"student.lora.target_modules: {t!r} matches no module of {type(model).__name__}")
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    peft_cfg = PeftLoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, target_modules=list(lora_cfg.target_modules),
                              lora_dropout=0.0, bias="none")
    model = inject_adapter_in_model(peft_cfg, model)
    # peft already marks only adapters trainable; do it explicitly so the contract does not
    # depend on a peft default.
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def has_lora(model: nn.Module) -> bool:
    if "peft" not in sys.modules:  # no adapter can exist before peft was imported
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters (adapters only for a LoRA student)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy a `trainable_state_dict` back in; unknown, missing or mis-shaped keys are errors."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    unknown = sorted(set(sd) - set(params))
    if unknown:
        raise ValueError(f"trainable state: unknown key {unknown[0]!r} ({len(unknown)} unknown)")
    missing = sorted(set(params) - set(sd))
    if missing:
        raise ValueError(f"trainable state: missing key {missing[0]!r} ({len(missing)} missing)")
    with torch.no_grad():
        for n, p in params.items():
            if tuple(sd[n].shape) != tuple(p.shape):
                raise ValueError(f"trainable state: {n!r} has shape {list(sd[n].shape)}, expected {list(p.shape)}")
            p.copy_(sd[n].to(device=p.device, dtype=p.dtype))


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy with every adapter merged into its base layer and the peft wrappers removed: a
    plain model whose predictions equal the LoRA model's (so it saves as a normal folder)."""
    return merge_in_place(copy.deepcopy(model))


def merge_in_place(model: nn.Module) -> nn.Module:
    """`merged_copy` without the copy (`danceopd export`: one model in memory, not two); returns
    the model, which no longer holds its adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer) or not name:
            continue
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):  # no adapters left: a later injection starts clean
        del model.peft_config
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---- PEFT LoRA folders (adapter_config.json + adapter_model.safetensors) -------------------------

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def check_lora_folder(folder) -> None:
    """A PEFT LoRA folder, checked without reading a weight (one-line ValueError)."""
    from pathlib import Path

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"LoRA folder {folder} does not exist")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: no {name} (expected a PEFT LoRA folder; pickle weights are refused)")


def load_lora_folder(model: nn.Module, folder, adapter_name: str = "default", merge: bool = False) -> nn.Module:
    """Inject the adapter saved in a PEFT LoRA folder under `adapter_name` and load its weights
    (safetensors only). `merge`: fold it into the base weights and drop the wrappers (a plain
    model: a LoRA teacher or a LoRA-initialised student at no inference cost)."""
    from pathlib import Path

    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    check_lora_folder(folder)
    peft_cfg = PeftLoraConfig.from_pretrained(str(folder))
    names = [n for n, _ in model.named_modules()]
    targets = peft_cfg.target_modules if isinstance(peft_cfg.target_modules, (list, set, tuple)) else [peft_cfg.target_modules]
    if not any(_matches(n, t) for t in targets for n in names):
        raise ValueError(f"{folder}: its target_modules {sorted(targets)} match no module of {type(model).__name__}")
    import warnings

    with warnings.catch_warnings():  # a second named adapter on one backbone is what we want here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        model = inject_adapter_in_model(peft_cfg, model, adapter_name=adapter_name)
    result = set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_WEIGHTS)), adapter_name=adapter_name)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and f".{adapter_name}." in k]
    if missing:
        raise ValueError(f"{folder}: adapter weights miss {missing[0]!r} ({len(missing)} missing): made for another model?")
    if merge:
        model = merged_copy(model)
    return model


def save_lora_folder(model: nn.Module, folder, lora_cfg, adapter_name: str = "default") -> None:
    """Write a LoRA model's adapter as a PEFT LoRA folder that `load_lora_folder` reads back."""
    from peft import get_peft_model_state_dict

    write_lora_folder(get_peft_model_state_dict(model, adapter_name=adapter_name), folder, lora_cfg)


def write_lora_folder(state: dict[str, torch.Tensor], folder, lora_cfg, adapter_name: str = "default") -> None:
    """A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) from adapter tensors,
    named as `trainable_state_dict` names them (`...lora_A.default.weight`) or as peft saves them."""
    from pathlib import Path

    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    PeftLoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, target_modules=list(lora_cfg.target_modules),
                   lora_dropout=0.0, bias="none").save_pretrained(str(folder))
    tag = f".{adapter_name}."
    save_file({k.replace(tag, "."): v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS))


def set_active_adapter(model: nn.Module, adapter_name: str) -> None:
    """Switch every LoRA layer of `model` to one of its named adapters (shared-backbone teachers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers or adapter_name not in layers[0].lora_A:
        raise ValueError(f"no adapter {adapter_name!r} on this model")
    for m in layers:
        m.set_adapter(adapter_name)


def write_random_lora(model: nn.Module, folder, lora_cfg, seed: int, std: float = 0.3) -> None:
    """A PEFT LoRA folder with random (non-zero) A and B for `model`'s class: a stand-in for a
    trained adapter in smoke tests (peft initialises B to zero, which would be a no-op field)."""
    model = apply_lora(copy.deepcopy(model), lora_cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    save_lora_folder(model, folder, lora_cfg)
