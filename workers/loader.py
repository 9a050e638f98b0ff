"""Checkpoint loading for Wan2.1 causal DiTs (Self-Forcing, CausVid, StreamDiffusionV2, LongLive, Reward Forcing).

Files are ``torch.save`` dicts holding ``generator`` / ``generator_ema`` (or a bare state dict), or
``.safetensors``. Keys may carry ``model.`` and ``_fsdp_wrapped_module.`` prefixes. A model slice loads
only the keys it owns; keys that belong to no part of the architecture, and owned keys the file lacks,
fail with an error that names them. Only local files are read.
"""

from __future__ import annotations

import os
import re

import torch

from workers.config import ModelConfig

PREFIXES = ("_fsdp_wrapped_module.", "model.", "diffusion_model.")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


class CheckpointError(ValueError):
    """The checkpoint does not match the model: the message names the keys."""


def clean_key(key: str) -> str:
    """Strip wrapper prefixes wherever they occur at the front (``model._fsdp_wrapped_module.blocks.0...``)."""
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
        key = key.replace("._fsdp_wrapped_module.", ".")
    return key


def read_state_dict(path: str, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint with prefixes stripped (lazily memory-mapped where the format allows)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        raw = load_file(path, device="cpu")
    else:
        raw = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a dict, got {type(raw).__name__}")
        if use_ema and "generator_ema" not in raw:
            raise CheckpointError(f"{path}: use_ema is set but the file has no 'generator_ema'")
        for name in (("generator_ema",) if use_ema else ("generator", "generator_ema")):
            if isinstance(raw.get(name), dict):
                raw = raw[name]
                break
        if "state_dict" in raw and isinstance(raw["state_dict"], dict):
            raw = raw["state_dict"]
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is not a tensor")
        out[clean_key(key)] = value
    return out


def _all_keys(cfg: ModelConfig) -> set[str]:
    from workers.model.dit import CausalWanModel

    with torch.device("meta"):
        return set(CausalWanModel(cfg).state_dict())


def _summarise(keys: set[str], limit: int = 12) -> str:
    ks = sorted(keys)
    more = f" ... and {len(ks) - limit} more" if len(ks) > limit else ""
    return ", ".join(ks[:limit]) + more


def load_weights(model, path: str, use_ema: bool = False) -> None:
    """Load the keys ``model`` (a full model or a slice) owns from a local checkpoint."""
    state = read_state_dict(path, use_ema)
    unexpected = set(state) - _all_keys(model.cfg)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys (not part of a Wan2.1 DiT of this config): "
                              f"{_summarise(unexpected)}")
    own = model.state_dict()
    missing = set(own) - set(state)
    if missing:
        raise CheckpointError(f"{path}: missing keys: {_summarise(missing)}")
    wrong = {k for k in own if tuple(state[k].shape) != tuple(own[k].shape)}
    if wrong:
        detail = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(wrong)[:6])
        raise CheckpointError(f"{path}: shape mismatch (file vs model): {detail}")
    model.load_state_dict({k: state[k] for k in own}, strict=True)
