"""CUDA graph keys: a forward is graphed only where a replay (which runs no Python) is exact, and its key
changes whenever something a captured forward baked in changes."""

import torch

from workers.cache import StreamCache
from workers.config import CacheConfig
from workers.graphs import ForwardGraphs, graph_key
from workers.model.dit import Segment

T, C, HD = 6, 8, 4


def cache(policy="sink", frames=0):
    c = StreamCache(CacheConfig(policy=policy, sink_frames=1, window_frames=2, recache_frames=2), [0, 1], HD)
    c.set_context(torch.zeros(3, C))
    for kv in c.kv.values():
        kv.stage(torch.zeros(4, T, C), torch.zeros(4, T, C))  # buffers for capacity + 4 staged frames
        kv.commit(frames)
    return c


def key(c, frames=1, commit=0):
    return graph_key([Segment(frames, c, block_frames=1, commit_frames=commit)], ["s"], torch.zeros(frames, 16, 4, 4),
                     (0, 2))


def test_steady_forwards_get_a_key_moving_ones_do_not():
    full = cache(frames=3)
    assert key(full) is not None and key(full, commit=1) is not None  # a full cache evicts: frames stay at 3
    filling = cache(frames=1)
    assert key(filling) is not None  # no commit: nothing moves
    assert key(filling, commit=1) is None  # the commit raises the frame count
    assert key(cache("ema_sink", frames=3), commit=1) is None  # ema_sink's slot counter moves each commit
    assert key(cache(frames=3), frames=8) is None  # the staging rows would grow (reallocate) the buffers


def test_the_key_follows_the_cache_state_the_context_and_the_buffers():
    c = cache(frames=3)
    before = key(c)
    assert key(c) == before
    c.set_context(torch.ones(3, C))  # new cross-attention K/V tensors
    assert key(c) != before
    other = cache(frames=3)  # same layout, another stream's buffers
    assert key(other)[0][0][7] != key(c)[0][0][7]
    assert graph_key([Segment(1, c, block_frames=1)], ["s"], torch.zeros(1, 16, 4, 4), (0, 3)) != key(c)


def test_on_cpu_every_forward_runs_eagerly_and_stream_bookkeeping_holds():
    graphs = ForwardGraphs(torch.device("cpu"), enabled=True)
    calls = []
    for _ in range(3):
        out = graphs.run(("k",), lambda x, t: calls.append(1) or x + 1, torch.zeros(2), None)
    assert len(calls) == 3 and torch.equal(out, torch.ones(2)) and graphs.captures == graphs.replays == 0
    graphs._graphs.update({((("a", 1),), (), (0, 1)): None, ((("b", 1),), (), (0, 1)): None})
    graphs.drop_stream("a")
    assert [k[0][0][0] for k in graphs._graphs] == ["b"]
    graphs.clear()
    assert not graphs._graphs
