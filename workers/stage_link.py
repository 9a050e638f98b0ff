"""StageLink: one pipeline stage's messages over torch.distributed (gloo on CPU, NCCL on CUDA), within a replica.

Stage s sends stage s+1 one message per micro-batch (its latents and Activation, as bytes); the last stage sends
stage 0 the next step's latents (the ring) and each finished chunk's x0 to its decode worker. A stage's receives
are posted before their sends can arrive: the ring's at its exact size, stage to stage (gloo) into a buffer of
the largest message so far, because a gloo receive posted after its send waits for a round of notifications
between the two peers' I/O threads, which wait for a core while both stages compute (5-15 ms a micro-batch on
2 CPUs). Sends do not wait for their receiver; their buffers are held until the send is done (``settle``).
"""

from __future__ import annotations

from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

from workers.batch import MicroBatch
from workers.config import ModelConfig
from workers.model.dit import Activation

RING_TAG = 1
"""Tag of the last stage -> stage 0 messages; stage to stage activations use tag 0."""
DECODE_TAG = 2
"""Tag of the last stage -> decode worker messages (a finished chunk's clean latents)."""
CLOSE_WAIT = timedelta(seconds=5)


def payload_shapes(mb: MicroBatch, cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Shapes of what stage s sends to s+1: hidden [F, T, C], e_time [F, C], e0 [F, 6, C], contexts [L, C]."""
    f, t, c = mb.frames, mb.grid[0] * mb.grid[1], cfg.dim
    return [(f, t, c), (f, c), (f, 6, c)] + [(cfg.text_len, c)] * len(mb.prompts)


class StageLink:
    """Stage ``stage`` of ``num_stages``'s sends and receives. ``settled_after``: a micro-batch that many older than
    the one a stage runs went through every stage (the executor's bound on micro-batches in flight)."""

    def __init__(self, stage: int, num_stages: int, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                 settled_after: int):
        self.stage, self.num_stages, self.cfg = stage, num_stages, cfg
        self.device, self.dtype, self.settled_after = device, dtype, settled_after
        self._sends: deque = deque()  # (micro-batch seq, isend work, buffer): a buffer lives until its send is done
        self._ring: deque = deque()  # stage 0: (micro-batch, irecv work, buffer) posted, oldest first
        # Stage to stage on gloo, the next message's receive is posted into a buffer of the largest message so far;
        # both ends track that size over the same micro-batches. NCCL: exact receives only (counts must match).
        self._ahead = device.type != "cuda"
        self._in_cap = self._out_cap = 0  # bytes: the buffer posted on the receiving end (0: none)
        self._inbox: tuple | None = None  # stage > 0: (irecv work, uint8 buffer) of the next message
        self._larger = 0  # messages larger than the buffer posted for them (each came after a marker)

    def send(self, buf: torch.Tensor, dst: int, seq: int, tag: int = 0) -> None:
        """Send ``buf`` (of micro-batch ``seq``) without waiting; it is released once ``settle`` sees it done."""
        self._sends.append((seq, dist.isend(buf, dst=dst, tag=tag), buf))

    def settle(self, seq: int) -> None:
        """Release the buffers of finished sends, before running micro-batch ``seq``. A gloo send reports
        ``is_completed()`` only after ``wait()`` (NCCL's polls its event), so sends ``settled_after`` micro-batches
        older than ``seq`` are waited on: their stage and ring sends are done and the wait returns at once; a send
        to a decode worker that lags that far waits for it (backpressure, not a growing queue)."""
        while self._sends and (self._sends[0][1].is_completed() or self._sends[0][0] <= seq - self.settled_after):
            self._sends.popleft()[1].wait()

    def send_activation(self, mb: MicroBatch, act: Activation, latents: torch.Tensor, contexts: dict) -> None:
        """To stage s+1, one message of bytes: the float32 latents [F, C, h, w] first (so every later part starts at
        a multiple of its item size), then the Activation and the new contexts in the replica's dtype. Larger than
        the receive posted for it: a 1-byte marker fills that first, and the message follows."""
        tensors = [latents.float()] + [t.to(self.dtype) for t in list(act) + [contexts[sid] for sid in mb.prompts]]
        msg = torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])
        if 0 < self._out_cap < msg.numel():
            self.send(torch.zeros(1, dtype=torch.uint8, device=self.device), self.stage + 1, mb.seq)
        self.send(msg, self.stage + 1, mb.seq)
        self._out_cap = max(self._out_cap, msg.numel()) if self._ahead else 0

    def recv_activation(self, mb: MicroBatch, latent_shape: tuple[int, int, int]) -> tuple[Activation, torch.Tensor,
                                                                                            dict]:
        """From stage s-1 (``send_activation``): (Activation, latents float32, contexts by stream); then the next
        message's receive is posted, before this stage's forward runs."""
        shapes = [(mb.frames,) + latent_shape] + payload_shapes(mb, self.cfg)
        dtypes = [torch.float32] + [self.dtype] * (len(shapes) - 1)
        sizes = [torch.Size(s).numel() * d.itemsize for s, d in zip(shapes, dtypes)]
        size, buf = sum(sizes), None
        if self._inbox is not None:
            work, posted = self._inbox
            work.wait()
            if size <= posted.numel():
                buf = posted
            else:  # it holds the sender's marker: the message is larger than any before and follows exactly
                self._larger += 1
        if buf is None:
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            dist.recv(buf, src=self.stage - 1)
        self._in_cap = max(self._in_cap, size) if self._ahead else 0
        self._inbox = None
        if self._in_cap:
            posted = torch.empty(self._in_cap, dtype=torch.uint8, device=self.device)
            self._inbox = (dist.irecv(posted, src=self.stage - 1), posted)
        parts = [b.view(d).view(s) for b, d, s in zip(buf[:size].split(sizes), dtypes, shapes)]
        return Activation(*parts[1:4]), parts[0], dict(zip(mb.prompts, parts[4:]))

    def post_ring(self, mb: MicroBatch, latent_shape: tuple[int, int, int]) -> None:
        """Stage 0: post the receive of ``mb``'s ring latents now, so the last stage never waits on it. Call it
        before ``send_activation``: at P=2 the ring comes back over the pair that carries the activation, and a
        receive posted while that send was still being written waited for it: in ``bench/ring_ceiling.py``
        (``small``, 2 CPUs, timed per tick) stage 0's time outside its forward fell from 2.3-2.7 to 0.8-1.0 ms."""
        buf = torch.empty((mb.ring_frames(),) + latent_shape, device=self.device)
        self._ring.append((mb, dist.irecv(buf, src=self.num_stages - 1, tag=RING_TAG), buf))

    def next_ring(self) -> tuple[MicroBatch, torch.Tensor] | None:
        """Stage 0: the oldest posted ring message once it is in, (micro-batch, latents); None when none is posted."""
        if not self._ring:
            return None
        mb, work, buf = self._ring.popleft()
        work.wait()
        return mb, buf

    def stats(self) -> dict[str, int]:
        """Sends whose buffers are still held (bounded by ``settle``), the bytes of the receive posted ahead, and
        how many messages outgrew it."""
        return {"pending_sends": len(self._sends), "posted_bytes": self._in_cap, "larger_messages": self._larger}

    def close(self) -> None:
        for _, work, _ in self._sends:
            work.wait(CLOSE_WAIT)
        self._sends.clear()
