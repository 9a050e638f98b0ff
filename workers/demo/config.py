"""The demo trainer's configuration (``make train-demo``): torch-free, pydantic, every field defaulted,
documented and range-checked like ``workers/config.py``, whose shared ``CONFIG`` it uses."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from workers.config import CONFIG, MODEL_CONFIGS

Prob = Annotated[float, Field(ge=0, le=1)]


@dataclass(frozen=True, config=CONFIG)
class TrainConfig:
    """Two phases: the demo VAE as an autoencoder of the clips, then flow matching of the causal DiT on its
    latents, with per-chunk noise levels and clean context.

    Each DiT sample is ``chunks`` blocks of ``chunk_frames`` latent frames, run through the model's block-causal
    full-sequence forward (the same attention the streaming forward with a KV cache computes). Blocks before
    a random first noisy block are clean (t = 0, as a context pass writes them); later blocks carry noise.
    Layouts mirror what the engine's cache holds: a stream's start from the text alone, a contiguous clip
    (cache policy none), the stream's first chunk as a sink followed by a later window (sink / ema_sink at
    steady state), and a prompt switch (context of one prompt, continuation under another, as after a
    re-cache). A ``staircase`` share of the steps trains what a stream_batch forward holds: [clean context |
    n chunks in flight at the sampler's sigmas, the oldest the cleanest].
    """

    model: str = "demo"
    """Named model config to train (workers/config.py MODEL_CONFIGS; its vae must be 'demo')."""
    init: str = ""
    """A demo checkpoint to fine-tune (its generator_ema starts the DiT and its VAE is kept: no VAE phase, and
    ``steps`` count from 0 again); empty: from scratch."""
    vae_steps: Annotated[int, Field(ge=1, le=10_000_000)] = 900
    """Phase 1: VAE optimizer steps."""
    vae_batch: Annotated[int, Field(ge=1, le=4096)] = 8
    """Phase 1: clips (4 latent groups each) per step."""
    vae_lr: Annotated[float, Field(gt=0, le=1)] = 1e-3
    """Phase 1: peak AdamW learning rate (cosine decay to a tenth; 2e-3 diverged at step ~50 from seed 0)."""
    vae_width: Annotated[int, Field(ge=8, le=1024, multiple_of=2)] = 64
    """Phase 1: the VAE's conv width (its latent channels are the model's in_channels)."""
    vae_noise: Annotated[float, Field(ge=0, le=10)] = 0.1
    """Phase 1: noise on the latents while training, relative to their std (the decoder tolerates the DiT)."""
    vae_colour_anchor: Annotated[float, Field(ge=0, le=100)] = 1.0
    """Phase 1: weight of the colour anchor (latent channels 0..2 regress each cell's mean colour). Without it red
    and yellow encoded closest (RMS 0.51 against up to 2.11, ``colour_distances``) and the DiT learnt yellow last."""
    steps: Annotated[int, Field(ge=1, le=10_000_000)] = 2600
    """Phase 2: DiT optimizer steps (the run is fixed by steps, so it reproduces on any machine)."""
    batch: Annotated[int, Field(ge=1, le=4096)] = 8
    """Phase 2: clips per step."""
    chunk_frames: Annotated[int, Field(ge=1, le=64)] = 3
    """Latent frames per causal block: the sampler's chunk_frames the model serves with."""
    chunks: Annotated[int, Field(ge=2, le=64)] = 4
    """Blocks per training clip: (sink + window) / chunk_frames + 1 covers the default cache."""
    lr: Annotated[float, Field(gt=0, le=1)] = 1.5e-3
    """Peak AdamW learning rate."""
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.05
    """Cosine decay ends at lr * this."""
    warmup_steps: Annotated[int, Field(ge=0, le=1_000_000)] = 200
    """Linear learning-rate warm-up."""
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.01
    """AdamW weight decay."""
    grad_clip: Annotated[float, Field(gt=0, le=1e6)] = 1.0
    """Gradient norm clip."""
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.999
    """EMA of the weights (shipped as generator_ema); warmed up as min(decay, (1 + step) / (10 + step))."""
    first_chunk: Prob = 0.25
    """Share of clips that are a stream's start, all blocks noisy: the first chunk comes from the text alone."""
    start_staircase: Prob = 0.5
    """Share of a stream's starts laid out as stream_batch's first ticks (chunk j at step t - j, no context);
    the rest put each block at its own visited level (sequential's chunk 0 at any step)."""
    stream_start: Prob = 0.3
    """Share of the other contiguous clips that begin at the stream's first latent (frame 0 alone)."""
    sink_layout: Prob = 0.4
    """Share of clips laid out as [first chunk | a later window]: the sink cache at steady state."""
    centred_start: Prob = 1.0
    """Share of clips holding a stream's first frame whose object starts at the frame's centre. A stream's start
    is then one clip per prompt, which the few-step sampler reaches from noise; with the start anywhere the
    first chunk's x0 at sigma ~ 1 is a colourless mean, the next steps read the object from the noise, and
    its colour is left to chance (measured: right for 6 of 30 prompts)."""
    switch: Prob = 0.2
    """Share of clips whose prompt changes at a chunk boundary (text is the new prompt throughout)."""
    sampler_sigmas: Prob = 0.7
    """Share of clips whose noise levels are drawn as the engine's 2-4 step sampler visits them (sigma = 1 about a
    third of the time), else continuous (shift 5). Stream starts always are."""
    sorted_noise: Prob = 0.5
    """Share of clips whose noisy blocks get ascending noise (older blocks cleaner: stream_batch in flight)."""
    staircase: Prob = 0.3
    """Share of steps whose clips are stream_batch forwards: clean context, then the n in-flight blocks at the
    sampler's n sigmas, oldest (cleanest) first (n = 2, 3 or 4 steps)."""
    staircase_chunks: Annotated[int, Field(ge=3, le=64)] = 6
    """Blocks per staircase clip: at least one clean block before the 2-4 in flight."""
    shift: Annotated[float, Field(gt=0, le=100)] = 5.0
    """Timestep shift of the continuous noise-level distribution (the sampler's shift)."""
    seed: Annotated[int, Field(ge=0, le=2**62)] = 0
    """Seed of the data stream, the noise and the weights' initialisation."""
    threads: Annotated[int, Field(ge=0, le=256)] = 0
    """Torch CPU threads (0: the faster here per phase: one for the VAE's small convolutions, every core for the
    DiT; 1: the run costs one core)."""
    checkpoint_every_s: Annotated[float, Field(gt=0, le=86400)] = 180.0
    """Seconds between resumable training-state saves."""
    log_every_s: Annotated[float, Field(gt=0, le=86400)] = 30.0
    """Seconds between progress lines (loss, rate, ETA)."""
    eval_every_s: Annotated[float, Field(ge=0, le=86400)] = 900.0
    """Seconds between quick evaluations (EMA weights, the engine's sampler, the detector); 0: only at the end."""
    eval_prompts: Annotated[int, Field(ge=1, le=32)] = 8
    """Prompts in a quick evaluation (spread over colours, shapes and directions)."""
    eval_frames: Annotated[int, Field(ge=3, le=4096)] = 48
    """Frames per prompt in a quick evaluation."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.model not in MODEL_CONFIGS:
            raise ValueError(f"TrainConfig.model {self.model!r} is not a named model config")
        if self.staircase and self.staircase_chunks < 5:
            raise ValueError("TrainConfig.staircase_chunks must be >= 5 (a clean block before 4 in flight)")
        if MODEL_CONFIGS[self.model].vae != "demo":
            raise ValueError("TrainConfig.model must use the demo VAE (vae 'demo'): it is trained here too")
        return self
