"""The denoising ring's two ends, shared by every executor and the single-process reference.

* ``inputs`` (stage 0): a micro-batch's latents from their sources: fresh noise for a chunk's first step,
  the ring for later steps and context passes, or the driver's inline latents (re-cache).
* ``advance`` (the last stage): x0 = x_t - sigma v, re-noise to the next step, or finish the chunk.
  What goes on denoising, and every finished x0 (the next context pass), goes back to stage 0.

So no latent returns to the driver between steps: it receives each chunk's clean latents once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from workers.batch import CONTEXT, MicroBatch, Work
from workers.model.schedule import chunk_noise, renoise, to_x0

Key = tuple[str, int, int, int]  # (stream, epoch, chunk, step or CONTEXT)


class LatentStore:
    """Stage 0's ring inbox: chunk latents [f, C, h, w] waiting for the forward that needs them."""

    def __init__(self):
        self._items: dict[Key, torch.Tensor] = {}
        self._epoch: dict[str, int] = {}  # newest epoch seen per open stream

    def open(self, stream_id: str) -> None:
        self._epoch[stream_id] = 0

    def close(self, stream_id: str) -> None:
        self._epoch.pop(stream_id, None)
        self._purge(stream_id, None)

    def see(self, work: Work) -> None:
        """A forward of ``work.epoch``: latents of older epochs of that stream are stale."""
        if work.epoch > self._epoch.get(work.stream_id, -1):
            self._epoch[work.stream_id] = work.epoch
            self._purge(work.stream_id, work.epoch)

    def put(self, mb: MicroBatch, latents: torch.Tensor) -> None:
        """Unpack the ring latents [sum of ring entries * f, C, h, w] the last stage produced for ``mb``."""
        i = 0
        for work in mb.segments:
            f = work.chunk_frames
            for chunk, step in work.ring_entries():
                if self._epoch.get(work.stream_id, -1) == work.epoch:  # else: closed or restarted meanwhile
                    self._items[(work.stream_id, work.epoch, chunk, step)] = latents[i:i + f]
                i += f

    def take(self, key: Key) -> torch.Tensor | None:
        return self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)

    def _purge(self, stream_id: str, keep_epoch: int | None) -> None:
        for key in [k for k in self._items if k[0] == stream_id and k[1] != keep_epoch]:
            del self._items[key]


class TimestepTable:
    """Per-frame timesteps [F] of a micro-batch's layout, made on the device once per layout and reused, so a
    steady stream of forwards copies nothing from the host (a CUDA graph's inputs stay put, too)."""

    def __init__(self, device: torch.device, size: int = 256):
        self.device, self.size = device, size
        self._tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def __call__(self, mb: MicroBatch) -> torch.Tensor:
        key = tuple((w.timesteps, w.chunk_frames) for w in mb.segments)
        t = self._tables.get(key)
        if t is None:
            t = torch.cat([w.t() for w in mb.segments]).to(self.device)
            self._tables[key] = t
            if len(self._tables) > self.size:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return t


Encode = Callable[[str, torch.Tensor], torch.Tensor]
"""Stage 0's VAE encoder: (stream, uint8 frames [N, H, W, 3]) -> z [f, C, h, w] (the stream's causal state)."""


def inputs(mb: MicroBatch, store: LatentStore, latent_shape: tuple[int, int, int], device: torch.device,
           wait: Callable[[], bool] | None = None, timesteps: TimestepTable | None = None,
           encode: Encode | None = None, encoded: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 0: (latents [F, C, h, w] float32, t [F]) of ``mb``, both on ``device``.

    ``wait`` blocks until one more ring message has been unpacked into ``store`` and returns False when none
    is pending (then a missing entry is a bug: it was never going to come). A video-to-video chunk enters
    step 0 as eps s + z (1 - s), z its frames encoded by ``encode`` (recorded in ``encoded``: stream ->
    (chunk, z)) or its latents from an earlier encode."""
    parts = []
    for work in mb.segments:
        store.see(work)
        if work.inline is not None:
            parts.append(work.inline.to(device))
            continue
        f = work.chunk_frames
        for chunk, step in work.entries:
            if step == 0:
                noise = chunk_noise(work.seed, chunk, 0, (f,) + latent_shape, device=device)
                if work.input is not None and work.input.chunk == chunk:
                    parts.append(_noisy_input(work, noise, encode, encoded))
                else:
                    parts.append(noise)
                continue
            key = (work.stream_id, work.epoch, chunk, step)
            x = store.take(key)
            while x is None:
                if wait is None or not wait():
                    raise RuntimeError(f"ring latents of stream {work.stream_id!r} chunk {chunk} step {step} "
                                       "were never produced")
                x = store.take(key)
            parts.append(x)
    t = timesteps(mb) if timesteps is not None else torch.cat([w.t() for w in mb.segments]).to(device)
    return torch.cat(parts), t


def _noisy_input(work: Work, noise: torch.Tensor, encode: Encode | None, encoded: dict | None) -> torch.Tensor:
    """A video-to-video chunk at step 0: eps s + z (1 - s) [f, C, h, w]."""
    inp = work.input
    z = inp.latents
    if z is None:
        if encode is None:
            raise RuntimeError(f"stream {work.stream_id!r} chunk {inp.chunk} has frames but this stage has no encoder")
        z = encode(work.stream_id, inp.pixels)
        if encoded is not None:
            encoded[work.stream_id] = (inp.chunk, z)
    z = z.to(noise.device, noise.dtype)
    return noise * inp.noise_scale + z * (1 - inp.noise_scale)


def advance(mb: MicroBatch, latents: torch.Tensor, flow: torch.Tensor
            ) -> tuple[torch.Tensor | None, list[list[tuple[int, torch.Tensor]]]]:
    """The last stage: latents [F, C, h, w] (the forward's input) and flow [F, C, h, w] ->
    (ring latents for stage 0 in ``ring_entries`` order, or None; finished (chunk, x0) per segment)."""
    ring, finished, f0 = [], [], 0
    for work in mb.segments:
        f, done = work.chunk_frames, []
        for i, (chunk, step) in enumerate(work.entries):
            if step == CONTEXT:
                continue
            rows = slice(f0 + i * f, f0 + (i + 1) * f)
            sigma, next_sigma = work.entry_sigmas[i]
            x0 = to_x0(latents[rows].float(), flow[rows].float(), sigma)
            if step + 1 == work.steps:
                done.append((chunk, x0))
                ring.append(x0)  # the next forward's context entry
            else:
                noise = chunk_noise(work.seed, chunk, step + 1, tuple(x0.shape), device=x0.device)
                ring.append(renoise(x0, noise, next_sigma))
        finished.append(done)
        f0 += work.frames
    return (torch.cat(ring) if ring else None), finished
