"""StageWorker: one pipeline stage, a plain class (the Ray actor wraps it; tests use it directly).

It owns blocks [a, b) of one model (and loads only those weights), the embeddings when it is the first
stage and the head when it is the last, plus every stream's caches for its blocks. The first stage also
holds the text encoder (prompts are encoded on its device, cached per prompt) and the ring's inbox
(latents waiting for their next step); the last stage computes x0 and the re-noise (``workers.denoise``),
so latents never go back to the driver between steps.
"""

from __future__ import annotations

import time

import torch

from workers.config import CacheConfig, GenerationConfig
from workers import denoise
from workers.batch import CONTEXT, MicroBatch, StageStats, Work
from workers.cache import BlockKVCache, StreamCache
from workers.graphs import ForwardGraphs, graph_key
from workers.loader import load_weights
from workers.model.dit import Activation, Block, CausalWanModel, Segment
from workers.model.text import TextEncoder, build_text_encoder
from workers.model.vae import StreamingEncoder, build_vae
from workers.v2v import to_unit

PROFILE_PROMPT = "a probe forward"


class StageWorker:
    """Runs its slice over micro-batches, one at a time, against per-stream caches."""

    def __init__(self, gen: GenerationConfig, block_range: tuple[int, int], stage: int, num_stages: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, cuda_graphs: bool = True):
        self.stage = stage
        self.num_stages = num_stages
        self.device = torch.device(device)
        self.model = CausalWanModel(gen.model, block_range, with_embed=stage == 0,
                                    with_head=stage == num_stages - 1).to(self.device, dtype).eval()
        weights_path, use_ema = gen.checkpoint()  # model_path, or the model's shipped weights
        if weights_path:
            load_weights(self.model, weights_path, use_ema)
        self.text_encoder: TextEncoder | None = None
        if stage == 0:
            self.text_encoder = build_text_encoder(gen.model, gen.text_encoder_path, self.device, dtype)
        self._gen, self._dtype = gen, dtype
        self.encoder: StreamingEncoder | None = None  # stage 0, built with the first video-to-video stream
        self._encode_states: dict[str, object] = {}
        self._encode_s = 0.0  # encoding time since the last forward (counted as this stage's work)
        self.streams: dict[str, StreamCache] = {}
        self.store = denoise.LatentStore() if stage == 0 else None
        self.timesteps = denoise.TimestepTable(self.device) if stage == 0 else None
        self.graphs = ForwardGraphs(self.device, cuda_graphs)
        self.sync = True  # CUDA: wait for each forward to time it; else time it with events (``last_events``)
        self.last_events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._last_end: float | None = None

    @property
    def block_range(self) -> tuple[int, int]:
        return self.model.block_range

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def owned_parameter_names(self) -> list[str]:
        return list(self.model.state_dict())

    # streams ---------------------------------------------------------------------------------------

    def open_stream(self, stream_id: str, cache_cfg: CacheConfig, video: bool = False) -> None:
        """The stream's caches on this stage; stage 0 also its ring inbox and (video) its VAE encoder state."""
        if stream_id in self.streams:
            raise ValueError(f"stream {stream_id!r} is already open on stage {self.stage}")
        self.streams[stream_id] = self.model.new_stream_cache(cache_cfg)
        if self.store is not None:
            self.store.open(stream_id)
        if video and self.stage == 0:
            if self.encoder is None:
                self.encoder = build_vae(self._gen.model, self._gen.vae_checkpoint(), self.device, self._dtype)
            self._encode_states[stream_id] = self.encoder.new_state()

    @torch.no_grad()
    def encode(self, stream_id: str, frames: torch.Tensor) -> torch.Tensor:
        """Stage 0: a video chunk's uint8 frames [N, H, W, 3] -> z [f, C, h, w] float32 with the stream's causal
        encoder. An encoder that starts mid-stream (a rebuilt or restored stream, 4f frames) encodes the
        chunk's last 1 + 4 (f - 1) frames, so it still gets f latent frames."""
        cuda = self.device.type == "cuda"
        if cuda:  # CUDA runs ahead of the host: time this encode alone (once per chunk, not per step)
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        state = self._encode_states[stream_id]
        t = self.model.cfg.vae_stride[0]
        if state["enc_first"] and frames.shape[0] % t == 0:
            frames = frames[t - 1:]
        pixels = to_unit(frames.to(self.device)).to(self._dtype)  # [N, 3, H, W] in [-1, 1]
        z = self.encoder.encode_chunk(pixels, state).float()
        if cuda:
            torch.cuda.synchronize(self.device)
        self._encode_s += time.perf_counter() - start
        return z

    def close_stream(self, stream_id: str) -> int:
        """Drop the stream's caches (and ring latents, encoder state); returns the bytes released."""
        self.graphs.drop_stream(stream_id)
        self._encode_states.pop(stream_id, None)
        if self.store is not None:
            self.store.close(stream_id)
        cache = self.streams.pop(stream_id, None)
        return 0 if cache is None else cache.nbytes()

    def cache_bytes(self) -> int:
        return sum(c.nbytes() for c in self.streams.values())

    # the forward ------------------------------------------------------------------------------------

    def latent_shape(self, grid: tuple[int, int]) -> tuple[int, int, int]:
        cfg = self.model.cfg
        return cfg.in_channels, grid[0] * cfg.patch_size[1], grid[1] * cfg.patch_size[2]

    def first_inputs(self, mb: MicroBatch, wait=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Stage 0: (latents [F, C, h, w] float32, t [F], encoded) of ``mb``, on this stage's device; ``encoded``:
        stream -> (chunk, z) of video chunks encoded here. ``wait`` unpacks one more ring message into the
        store (see ``denoise.inputs``)."""
        encoded: dict = {}
        latents, t = denoise.inputs(mb, self.store, self.latent_shape(mb.grid), self.device, wait, self.timesteps,
                                    self.encode, encoded)
        return latents, t, encoded

    @torch.no_grad()
    def forward(self, mb: MicroBatch, inputs: torch.Tensor | Activation, contexts: dict[str, torch.Tensor] | None,
                t: torch.Tensor | None = None) -> tuple[torch.Tensor | Activation, dict, StageStats]:
        """Run this slice over ``mb``.

        inputs: the latents [F, C, h, w] with timesteps ``t`` [F] on the first stage, else the previous
        stage's Activation. contexts: embedded text per stream whose prompt changes (the first stage
        encodes and embeds ``mb.prompts``). Returns (flow [F, C, h, w] on the last stage or the
        Activation for the next, contexts, stats).
        """
        start = time.perf_counter()
        idle = 0.0 if self._last_end is None else start - self._last_end
        events = self.device.type == "cuda" and not self.sync and not mb.profile
        if events:  # no host sync: the caller reads the time once the events have passed
            self.last_events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.last_events[0].record()
        if self.stage == 0:
            contexts = {sid: self.model.embed_text(self.text_encoder(prompt)) for sid, prompt in mb.prompts.items()}
        for sid, ctx in (contexts or {}).items():
            self.streams[sid].set_context(ctx)
        segments = []
        for work in mb.segments:
            cache = self.streams[work.stream_id]
            if work.reset_cache:
                cache.reset()
            segments.append(Segment(work.frames, cache, block_frames=work.chunk_frames,
                                    commit_frames=work.commit_frames, independent=work.independent,
                                    offsets=work.offsets))
        block_s = {} if mb.profile else None
        eager = mb.profile or mb.prompts or any(w.reset_cache for w in mb.segments)
        key = None if eager else graph_key(segments, [w.stream_id for w in mb.segments], inputs, self.block_range)
        out = self.graphs.run(key, lambda x, t_: self.model.stream_forward(x, segments, mb.grid, t_, block_s),
                              inputs, t)
        if events:
            self.last_events[1].record()
        elif self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        end = time.perf_counter()
        self._last_end = end
        sent = 0
        if not isinstance(out, torch.Tensor):  # the Activation, the forward's latents, new contexts
            sent = sum(x.nbytes for x in out) + 4 * mb.frames * int(torch.Size(self.latent_shape(mb.grid)).numel()) \
                + sum(c.nbytes for c in (contexts or {}).values())
        # stage 0's encoding of video chunks is this stage's work too (the block split sees it; the latency model
        # fits it apart, per chunk)
        stats = StageStats(self.stage, end - start + self._encode_s, idle, sent, self.cache_bytes(), mb.tokens,
                           block_s or {}, *self.memory(), encode_s=self._encode_s)
        self._encode_s = 0.0
        return out, contexts or {}, stats

    def memory(self) -> tuple[int, int]:
        """(allocated, reserved) CUDA bytes of this stage's device; (0, 0) on CPU."""
        if self.device.type != "cuda":
            return 0, 0
        return torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)

    @torch.no_grad()
    def profile(self, grid: tuple[int, int], frames: int, cache_cfg: CacheConfig, repeats: int = 1,
                streams: int = 1) -> StageStats:
        """Time this slice's blocks on ``streams`` throwaway streams (``open_probe``) in one micro-batch. Returns
        the fastest of ``repeats`` timed forwards after a warm-up: interference from other processes only adds."""
        sids = [f"__profile__{i}" for i in range(streams)]
        try:
            mb, x, t = self.open_probe(sids, grid, frames, cache_cfg)
            self.forward(mb, x, None, t)  # warm-up
            runs = [self.forward(mb, x, None, t)[2] for _ in range(max(1, repeats))]
            return min(runs, key=lambda s: s.compute_s)
        finally:
            for sid in sids:
                if sid in self.streams:
                    self.close_stream(sid)
            self._last_end = None

    def open_probe(self, sids: list[str], grid: tuple[int, int], frames: int, cache_cfg: CacheConfig,
                   steps: int = 1, seed: int = 0) -> tuple[MicroBatch, torch.Tensor | Activation, torch.Tensor]:
        """Open ``sids`` as throwaway streams, each attending to a full cache (its capacity committed first, as a
        stream does once past its first chunks), and make one micro-batch over them of ``frames`` latent frames
        each, with random inputs of a chunk's shape: (mb, inputs, t [F]). ``steps`` > 1: each entry is a chunk's
        first of that many denoising steps, so its next-step latents go around the ring. The caller closes the
        streams."""
        cfg = self.model.cfg
        gen = torch.Generator().manual_seed(seed)
        tokens = grid[0] * grid[1]
        ctx = torch.randn(cfg.text_len, cfg.dim, generator=gen).to(self.device, self.model.dtype)

        def inputs(f: int) -> torch.Tensor | Activation:
            if self.stage == 0:  # latents [f, C, h, w]
                return torch.randn(f, cfg.in_channels, grid[0] * cfg.patch_size[1], grid[1] * cfg.patch_size[2],
                                   generator=gen).to(self.device)
            return Activation(*(torch.randn(s, generator=gen).to(self.device, self.model.dtype)
                                for s in ((f, tokens, cfg.dim), (f, cfg.dim), (f, 6, cfg.dim))))

        full = cache_cfg.capacity_frames  # >= 1: context entries at t=0 whose K/V join the cache, as finished
        for sid in sids:  # chunks' do
            self.open_stream(sid, cache_cfg)
            fill = Work(sid, 0, 0, tuple((c, CONTEXT) for c in range(full)), (0.0,) * full,
                        ((0.0, 0.0),) * full, 1, 1, commit_frames=full)
            self.forward(MicroBatch(-1, [fill], grid, {sid: PROFILE_PROMPT} if self.stage == 0 else {},
                                    profile=True),
                         inputs(full), None if self.stage == 0 else {sid: ctx}, torch.zeros(full, device=self.device))
        works = [Work(sid, 0, 0, ((full, 0),), (500.0,), ((0.5, 0.0 if steps == 1 else 0.375),), steps, frames)
                 for sid in sids]
        n = frames * len(sids)
        return MicroBatch(-1, works, grid, {}, profile=True), inputs(n), torch.full((n,), 500.0, device=self.device)

    # rebalance --------------------------------------------------------------------------------------

    def release_blocks(self, ids: list[int]) -> tuple[dict[int, Block], dict[str, dict[int, BlockKVCache]]]:
        """Hand over blocks at either end of this slice, with every stream's KV cache of those blocks."""
        self.graphs.clear()
        blocks = self.model.release_blocks(ids)
        caches = {}
        for sid, cache in self.streams.items():
            caches[sid] = {i: cache.kv.pop(i) for i in ids}
            for i in ids:
                cache.xattn.pop(i, None)  # cross-attention K/V are recomputed from the context
        return blocks, caches

    def adopt_blocks(self, blocks: dict[int, Block], caches: dict[str, dict[int, BlockKVCache]]) -> None:
        self.graphs.clear()
        self.model.adopt_blocks({i: b.to(self.device) for i, b in blocks.items()})
        for sid, per_block in caches.items():
            for i, kv in per_block.items():
                if kv.k is not None:
                    kv.k, kv.v = kv.k.to(self.device), kv.v.to(self.device)
                self.streams[sid].kv[i] = kv
