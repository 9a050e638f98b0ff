"""Rolling KV cache: slot contents, bounded positions, eviction, EMA sink, fixed memory."""

import pytest
import torch

from streamgen_kernels.reference import rope
from workers.config import CacheConfig, get_config
from workers.cache import BlockKVCache, kv_bytes_per_frame
from workers.model.rope import rope_tables

HEAD_DIM, HEADS, T = 16, 2, 3
GRID = (1, 3)


def rotated(u, positions):
    """Keys u [F, T, C] rotated at the given frame positions."""
    cos, sin = rope_tables(torch.tensor(positions), GRID, HEAD_DIM)
    return rope(u, cos, sin)


def push(cache, u, v):
    """Stage frames (rotated at the positions the model would give them) and commit them all."""
    n = cache.frames
    cache.stage(rotated(u, list(range(n, n + u.shape[0]))), v)
    cache.commit(u.shape[0])


@pytest.mark.parametrize("policy,sink", [("sink", 2), ("none", 0)])
def test_slots_hold_the_most_recent_frames_at_their_slot_positions(policy, sink):
    cfg = CacheConfig(policy=policy, sink_frames=max(sink, 1) if policy != "none" else 0, window_frames=4)
    cache = BlockKVCache(cfg, HEAD_DIM)
    history_u, history_v = [], []
    for step in range(9):  # 9 chunks of 2 frames: evicts many times
        u = torch.randn(2, T, HEADS * HEAD_DIM)
        v = torch.randn(2, T, HEADS * HEAD_DIM)
        push(cache, u, v)
        history_u += list(u)
        history_v += list(v)
        kept = list(range(min(sink, len(history_u)))) + \
            list(range(max(sink, len(history_u) - cfg.window_frames), len(history_u)))
        assert cache.frames == len(kept) <= cfg.capacity_frames
        want_k = rotated(torch.stack([history_u[i] for i in kept]), list(range(len(kept))))
        want_v = torch.stack([history_v[i] for i in kept])
        assert (cache.k[:cache.frames] - want_k).abs().max() <= 1e-5
        assert torch.equal(cache.v[:cache.frames], want_v)


def test_ema_sink_blends_evicted_frames_into_the_sink():
    cfg = CacheConfig(policy="ema_sink", sink_frames=2, window_frames=2, ema_alpha=0.75)
    cache = BlockKVCache(cfg, HEAD_DIM)
    frames_u = [torch.randn(1, T, HEADS * HEAD_DIM) for _ in range(6)]
    frames_v = [torch.randn(1, T, HEADS * HEAD_DIM) for _ in range(6)]
    for u, v in zip(frames_u[:4], frames_v[:4]):
        push(cache, u, v)  # fills sink (0, 1) and window (2, 3): no eviction yet
    push(cache, torch.cat(frames_u[4:6]), torch.cat(frames_v[4:6]))  # evicts frames 2 and 3
    sink_u = [0.75 * frames_u[0] + 0.25 * frames_u[2], 0.75 * frames_u[1] + 0.25 * frames_u[3]]
    sink_v = [0.75 * frames_v[0] + 0.25 * frames_v[2], 0.75 * frames_v[1] + 0.25 * frames_v[3]]
    want_k = rotated(torch.cat(sink_u + frames_u[4:6]), [0, 1, 2, 3])
    want_v = torch.cat(sink_v + frames_v[4:6])
    assert (cache.k[:4] - want_k).abs().max() <= 1e-5
    assert (cache.v[:4] - want_v).abs().max() <= 1e-6


def test_staging_does_not_commit_and_reset_keeps_buffers():
    cache = BlockKVCache(CacheConfig(sink_frames=1, window_frames=2), HEAD_DIM)
    keys, _ = cache.stage(torch.randn(2, T, 32), torch.randn(2, T, 32))
    assert keys.shape[0] == 2 and cache.frames == 0
    cache.commit(1)
    assert cache.frames == 1
    nbytes = cache.nbytes()
    cache.reset()
    assert cache.frames == 0 and cache.nbytes() == nbytes


def test_kv_bytes_per_frame_matches_reference():
    # REFERENCE §2: 287.5 MB per latent frame for Wan2.1-1.3B at 480x832, bf16, 30 layers, K+V.
    cfg = get_config("wan2.1-1.3b")
    assert cfg.tokens_per_frame(480, 832) == 1560
    assert kv_bytes_per_frame(cfg, 480, 832, 2) == 287_539_200


def test_cache_config_validation():
    with pytest.raises(ValueError, match="policy"):
        CacheConfig(policy="lru")
    with pytest.raises(ValueError, match="sink_frames"):
        CacheConfig(policy="sink", sink_frames=0)
    with pytest.raises(ValueError, match="window_frames"):
        CacheConfig(window_frames=0)
    assert CacheConfig(policy="none", sink_frames=3, window_frames=5).capacity_frames == 5
