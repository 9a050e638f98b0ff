"""Single-process reference generator: the oracle every distributed executor is compared against.

(prompt, seed, config, mode, n_chunks) -> uint8 frames [N, H, W, 3], deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator

import torch

from workers.config import GenerationConfig
from workers import denoise
from workers.batch import MicroBatch
from workers.loader import load_weights
from workers.model.dit import CausalWanModel, Segment
from workers.model.text import build_text_encoder
from workers.model.vae import build_decoder, build_vae, to_uint8
from workers.stream import StreamProgram
from workers.v2v import VideoInput, VideoParams, to_unit


class ReferenceGenerator:
    """Runs the whole model in one process over one stream at a time."""

    def __init__(self, cfg: GenerationConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = CausalWanModel(cfg.model).to(self.device, dtype).eval()
        weights_path, use_ema = cfg.checkpoint()
        if weights_path:
            load_weights(self.model, weights_path, use_ema)
        self.text_encoder = build_text_encoder(cfg.model, cfg.text_encoder_path, self.device, dtype)
        self.vae = build_decoder(cfg, self.device, dtype)
        lh, lw = cfg.model.latent_grid(cfg.height, cfg.width)
        self.latent_shape = (cfg.model.in_channels, lh, lw)
        self.grid = cfg.model.token_grid(cfg.height, cfg.width)

    def _mode_cfg(self, mode: str | None) -> GenerationConfig:
        return self.cfg if mode is None else replace(self.cfg, sampler=replace(self.cfg.sampler, mode=mode))

    @torch.no_grad()
    def stream_latents(self, prompt: str, seed: int, mode: str | None = None,
                       prompt_schedule: dict[int, str] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (chunk index, clean latents [f, C, h, w]) in chunk order, without end.

        ``prompt_schedule`` maps a chunk index to the prompt that chunks from there on use; the switch
        re-caches the recent clean latents under the new prompt and restarts unfinished chunks.
        """
        cfg = self._mode_cfg(mode)
        switches = dict(sorted((prompt_schedule or {}).items()))
        program = StreamProgram(cfg.sampler, cfg.cache, seed, self.latent_shape)
        cache = self.model.new_stream_cache(cfg.cache)
        cache.set_context(self.model.embed_text(self.text_encoder(prompt).to(self.device)))
        store = self.new_store()
        done = 0
        while True:
            if switches and done >= min(switches):  # every chunk before the switch has finished
                cache.set_context(self.model.embed_text(self.text_encoder(switches.pop(min(switches))).to(self.device)))
                program.restart_unfinished()
            for chunk, x0 in self.step(program, cache, store):
                done = chunk + 1  # one chunk finishes per forward, so a switch lands before chunk `done` does
                yield chunk, x0

    def new_store(self) -> denoise.LatentStore:
        """The latents in flight of the streams this reference runs (one stream: ``stream_latents``)."""
        store = denoise.LatentStore()
        store.open("")
        return store

    def step(self, program: StreamProgram, cache, store: denoise.LatentStore,
             encode: denoise.Encode | None = None) -> list[tuple[int, torch.Tensor]]:
        """One forward of one stream on its caches: both ends of the ring in this process. Returns the
        chunks it finished, (chunk, x0 [f, C, h, w])."""
        work = program.next_work()
        mb = MicroBatch(0, [work], self.grid)
        encoded: dict = {}
        latents, t = denoise.inputs(mb, store, self.latent_shape, self.device, encode=encode, encoded=encoded)
        for chunk, z in encoded.values():
            program.encoded(chunk, z)
        if work.reset_cache:
            cache.reset()
        seg = Segment(frames=work.frames, cache=cache, block_frames=work.chunk_frames,
                      commit_frames=work.commit_frames, independent=work.independent, offsets=work.offsets)
        flow = self.model.stream_forward(latents, [seg], self.grid, t)
        ring, finished = denoise.advance(mb, latents, flow)
        if ring is not None:
            store.put(mb, ring)
        return program.complete(work, [(c, x0.cpu()) for c, x0 in finished[0]])

    def latents(self, prompt: str, seed: int, n_chunks: int, mode: str | None = None,
                prompt_schedule: dict[int, str] | None = None) -> torch.Tensor:
        """Clean latents of the first n_chunks chunks, [n_chunks * f, C, h, w]."""
        out = []
        for chunk, x0 in self.stream_latents(prompt, seed, mode, prompt_schedule):
            out.append(x0)
            if chunk + 1 >= n_chunks:
                break
        return torch.cat(out)

    @torch.no_grad()
    def generate(self, prompt: str, seed: int, n_chunks: int, mode: str | None = None,
                 prompt_schedule: dict[int, str] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """uint8 frames [N, H, W, 3]; N = 1 + 4 (n_chunks * f - 1) with the 4x temporal VAE."""
        if n_chunks < 1:
            raise ValueError(f"n_chunks must be at least 1, got {n_chunks}")
        state = self.vae.new_state()
        frames = []
        for chunk, x0 in self.stream_latents(prompt, seed, mode, prompt_schedule):
            frames.append(to_uint8(self.vae.decode_chunk(x0.to(self.device), state)).cpu())
            if progress is not None:
                progress(chunk + 1, n_chunks)
            if chunk + 1 >= n_chunks:
                break
        return torch.cat(frames)

    @torch.no_grad()
    def transform(self, chunks, prompt: str, seed: int, video: VideoParams, mode: str | None = None,
                  sampler=None) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """Video-to-video: input chunks (uint8 frames [N, H, W, 3] each, sized as ``VideoInput.frames_needed``)
        -> per input chunk, in order: (its index, its output frames uint8 [N, H, W, 3], the clean latents it
        was denoised to, or None when the similarity filter skipped it and the previous output shows again)."""
        cfg = self._mode_cfg(mode)
        sampler = sampler or cfg.sampler
        if mode is not None:
            sampler = replace(sampler, mode=mode)
        program = StreamProgram(sampler, cfg.cache, seed, self.latent_shape, video=True)
        side = VideoInput(video, seed, sampler.chunk_frames, cfg.model.vae_stride[0])
        for i, frames in enumerate(chunks):
            side.push(frames, i, program)
        program.end_input()
        encoder = build_vae(cfg.model, cfg.vae_checkpoint(), self.device, self.model.dtype)
        state = encoder.new_state()

        def encode(_sid, frames):
            return encoder.encode_chunk(to_unit(frames.to(self.device)).to(self.model.dtype), state).float()

        cache = self.model.new_stream_cache(cfg.cache)
        cache.set_context(self.model.embed_text(self.text_encoder(prompt).to(self.device)))
        store, decoder, done = self.new_store(), self.vae.new_state(), {}
        while program.ready():
            for chunk, x0 in self.step(program, cache, store, encode):
                done[chunk] = (to_uint8(self.vae.decode_chunk(x0.to(self.device), decoder)).cpu(), x0)
        out = []
        for index, (frames, x0), repeated, n in side.release(done):
            if repeated:
                frames = frames if frames.shape[0] == n else frames[-1:].expand(n, -1, -1, -1)
            out.append((index, frames, None if repeated else x0))
        return out
