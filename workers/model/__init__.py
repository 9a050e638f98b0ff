"""Wan2.1 causal DiT runtime: model, scheduler math, text encoders and VAEs."""

from workers.config import ModelConfig, get_config
from workers.model.dit import Activation, CausalWanModel, Segment

__all__ = ["ModelConfig", "get_config", "CausalWanModel", "Segment", "Activation"]
