"""Decode workers: VAE decode of finished chunks and JPEG encode next to it, off the DiT's critical stage.

A replica has ``ParallelConfig.decode_workers`` of them; each stream is assigned to one (its decoder state,
the causal convolutions' caches, lives there). The last DiT stage hands a finished chunk's clean latents to
the stream's decode worker (in process: the worker's thread; over Ray: torch.distributed), which decodes,
encodes and returns bytes only. ``decode: shared`` puts the workers on the last stage's GPU (their own
CUDA stream), ``dedicated`` on GPUs of their own (``workers/devicemap.py``).

* ``DecodeWorker``: the plain class (per-stream state, decode, encode); the Ray actor wraps it.
* ``DecodePool``: in-process workers, each on its own thread (and CUDA stream), results collected in order.
* ``DecodeRouter``: which worker each stream's chunks go to (the least loaded at open).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from workers.batch import DecodedChunk, DecodeJob, OutputFormat
from workers.config import GenerationConfig
from workers.encode import encode_frames
from workers.model.vae import StreamingDecoder, build_decoder, to_uint8


class DecodeWorker:
    """Decodes the finished chunks of its streams and encodes their frames for the wire."""

    def __init__(self, gen: GenerationConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 index: int = 0):
        self.index = index
        self.device = torch.device(device)
        self.decoder: StreamingDecoder = build_decoder(gen, self.device, dtype)
        self._states: dict[str, object] = {}
        self._formats: dict[str, OutputFormat] = {}

    def open_stream(self, stream_id: str, output: OutputFormat, warm: list[torch.Tensor] = ()) -> None:
        """New decoder state for the stream, its caches warmed on ``warm`` (recent clean latents
        [f, C, h, w] each, oldest first: a stream restored from a checkpoint or after a rebuild)."""
        state = self.decoder.new_state()
        with torch.no_grad():
            for x0 in warm:
                self.decoder.decode_chunk(x0.to(self.device), state)
        self._states[stream_id], self._formats[stream_id] = state, output

    def close_stream(self, stream_id: str) -> None:
        self._states.pop(stream_id, None)
        self._formats.pop(stream_id, None)

    @property
    def streams(self) -> int:
        return len(self._states)

    @torch.no_grad()
    def decode(self, job: DecodeJob, latents: torch.Tensor) -> DecodedChunk | None:
        """latents [f, C, h, w] -> the chunk's frames, encoded; None when the stream closed meanwhile."""
        state = self._states.get(job.stream_id)
        if state is None:
            return None
        start = time.perf_counter()
        pixels = self.decoder.decode_chunk(latents.to(self.device), state)  # [N, 3, H, W] in [-1, 1]
        frames = to_uint8(pixels)  # [N, H, W, 3] uint8, on this worker's device
        fmt = self._formats[job.stream_id]
        data = encode_frames(frames, fmt.encoding, fmt.jpeg_quality)
        return DecodedChunk(job.stream_id, job.chunk, data, int(frames.shape[2]), int(frames.shape[1]),
                            time.perf_counter() - start)

    @torch.no_grad()
    def profile(self, latent_shape: tuple[int, int, int], frames: int, repeats: int = 1) -> float:
        """Seconds to decode and encode one chunk of ``frames`` latent frames: the fastest of ``repeats`` runs
        after a warm-up one."""
        sid = "__profile__"
        self.open_stream(sid, OutputFormat("jpeg", 90))
        try:
            latents = torch.randn((frames,) + tuple(latent_shape), generator=torch.Generator().manual_seed(0))
            seconds = []
            for chunk in range(1 + max(1, repeats)):
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                seconds.append(self.decode(DecodeJob(sid, chunk, frames), latents).decode_s)
            return min(seconds[1:])  # [0] is the warm-up
        finally:
            self.close_stream(sid)


class DecodeRouter:
    """Stream -> decode worker index: a new stream goes to the worker with the fewest streams."""

    def __init__(self, workers: int):
        self.workers = workers
        self._of: dict[str, int] = {}

    def assign(self, stream_id: str) -> int:
        if stream_id not in self._of:
            counts = [0] * self.workers
            for w in self._of.values():
                counts[w] += 1
            self._of[stream_id] = counts.index(min(counts))
        return self._of[stream_id]

    def release(self, stream_id: str) -> None:
        self._of.pop(stream_id, None)

    def routes(self, stream_ids) -> dict[str, int]:
        return {sid: self._of[sid] for sid in stream_ids if sid in self._of}


class DecodePool:
    """In-process decode workers, each on its own thread (and CUDA stream), so decode overlaps the DiT.

    Work for one worker runs in submission order (a one-thread executor each), so per-stream order holds
    and a stream's open, decodes and close never race. ``collect`` returns finished chunks in order."""

    def __init__(self, workers: list[DecodeWorker]):
        self.workers = workers
        self._threads = [ThreadPoolExecutor(1, thread_name_prefix=f"decode-{w.index}") for w in workers]
        self._cuda_streams = [torch.cuda.Stream(w.device) if w.device.type == "cuda" else None for w in workers]
        self._pending: list[deque[Future]] = [deque() for _ in workers]  # per worker, submission order
        self._done = threading.Condition()

    def _run(self, index: int, fn, *args) -> Future:
        stream = self._cuda_streams[index]
        if stream is None:
            return self._threads[index].submit(fn, *args)
        ready = torch.cuda.current_stream().record_event()  # the latents' producer, on the DiT's stream

        def on_stream():
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                return fn(*args)
        return self._threads[index].submit(on_stream)

    def open_stream(self, index: int, stream_id: str, output: OutputFormat, warm: list[torch.Tensor]) -> None:
        self._run(index, self.workers[index].open_stream, stream_id, output, warm).result()

    def close_stream(self, index: int, stream_id: str) -> None:
        self._run(index, self.workers[index].close_stream, stream_id)

    def submit(self, index: int, job: DecodeJob, latents: torch.Tensor) -> None:
        future = self._run(index, self.workers[index].decode, job, latents)
        future.add_done_callback(self._notify)
        self._pending[index].append(future)

    def _notify(self, _future: Future) -> None:
        with self._done:
            self._done.notify_all()

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._pending)

    def collect(self, wait: bool) -> list[DecodedChunk]:
        """Decoded chunks ready now, in submission order per worker (so per stream); with ``wait`` block
        until one is (if any is pending). A decode that raised re-raises here."""
        if wait and self.pending:
            with self._done:
                self._done.wait_for(lambda: any(q and q[0].done() for q in self._pending))
        out = []
        for queue in self._pending:
            while queue and queue[0].done():
                result = queue.popleft().result()
                if result is not None:
                    out.append(result)
        return out

    def profile(self, latent_shape: tuple[int, int, int], frames: int, repeats: int = 1) -> float:
        return self._run(0, self.workers[0].profile, latent_shape, frames, repeats).result()

    def shutdown(self) -> None:
        for t in self._threads:
            t.shutdown(wait=True, cancel_futures=True)
        for queue in self._pending:
            queue.clear()
