"""Text encoders: each returns [text_len, text_dim] per prompt, rows after the prompt's length zeroed
(Wan pads with zeros and cross-attends to all rows without a mask). Results are cached per prompt."""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections import OrderedDict

import torch

from workers.config import ModelConfig


class TextEncoder(ABC):
    """Prompt -> context [text_len, text_dim], cached per prompt (LRU)."""

    def __init__(self, text_len: int, text_dim: int, cache_size: int = 64, device: torch.device | str = "cpu"):
        self.text_len = text_len
        self.text_dim = text_dim
        self.device = torch.device(device)  # where the results live (and the encoder runs)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self.encode_calls = 0  # real encodes (cache misses)

    def __call__(self, prompt: str) -> torch.Tensor:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        hit = self._cache.get(prompt)
        if hit is not None:
            self._cache.move_to_end(prompt)
            return hit
        out = self._encode(prompt)
        self.encode_calls += 1
        self._cache[prompt] = out
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    @abstractmethod
    def _encode(self, prompt: str) -> torch.Tensor:
        """Encode one prompt to [text_len, text_dim] (float32 on ``self.device``, zero rows after its length)."""


class HashTextEncoder(TextEncoder):
    """Small deterministic encoder for the tiny / small configs: each word maps (by SHA-256) to a
    fixed random vector, plus a fixed per-position vector. Different prompts give different contexts."""

    def __init__(self, text_len: int, text_dim: int, seed: int = 0, device: torch.device | str = "cpu"):
        super().__init__(text_len, text_dim, device=device)
        gen = torch.Generator().manual_seed(seed + 7919)
        self._positions = 0.5 * torch.randn(text_len, text_dim, generator=gen)

    def _encode(self, prompt: str) -> torch.Tensor:
        words = prompt.lower().split()[: self.text_len] or [""]
        out = torch.zeros(self.text_len, self.text_dim)
        for i, word in enumerate(words):
            digest = hashlib.sha256(word.encode("utf-8")).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % (2**63 - 1))
            out[i] = torch.randn(self.text_dim, generator=gen) + self._positions[i]
        return out.to(self.device)  # once per prompt (cached)


class UMT5TextEncoder(TextEncoder):
    """The real encoder: umT5 (``UMT5EncoderModel``) and its tokenizer from a local directory.
    Nothing is downloaded: a missing directory is an error."""

    def __init__(self, path: str, text_len: int, text_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        super().__init__(text_len, text_dim, device=device)
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"text encoder directory not found: {path!r}")
        from transformers import AutoTokenizer, UMT5EncoderModel  # heavy import, real path only

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = UMT5EncoderModel.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()
        if self.model.config.d_model != text_dim:
            raise ValueError(f"text encoder at {path!r} has width {self.model.config.d_model}, "
                             f"the DiT expects text_dim={text_dim}")

    @torch.no_grad()
    def _encode(self, prompt: str) -> torch.Tensor:
        tok = self.tokenizer(prompt, padding="max_length", truncation=True, max_length=self.text_len,
                             return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state[0]  # [L, text_dim]
        return hidden.float() * mask[0, :, None].float()


def build_text_encoder(cfg: ModelConfig, path: str = "", device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> TextEncoder:
    if cfg.text_encoder == "hash":
        return HashTextEncoder(cfg.text_len, cfg.text_dim, seed=cfg.init_seed, device=device)
    return UMT5TextEncoder(path, cfg.text_len, cfg.text_dim, dtype=dtype, device=device)
