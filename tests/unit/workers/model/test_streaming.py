"""Streaming forward with the KV cache equals the block-causal full-sequence forward (no eviction)."""

import pytest
import torch

from workers.config import CacheConfig
from workers.model import CausalWanModel, Segment, get_config
from workers.model.dit import TIME_ROWS_KEPT

CFG = get_config("tiny")
F_CHUNK, N_CHUNKS, H, W = 2, 3, 4, 6  # latent 4x6 -> 2x3 tokens per frame
GRID = (H // 2, W // 2)
BIG_CACHE = CacheConfig(policy="sink", sink_frames=2, window_frames=16)  # nothing is evicted


@pytest.fixture(scope="module")
def model():
    return CausalWanModel(CFG).eval()


def full_flow(model, latents, t, ctx):
    """Block-causal full-sequence forward. latents [F, C, h, w], t [F] -> flow [F, C, h, w]."""
    out = model(latents.transpose(0, 1)[None], t[None], ctx[None], frames_per_block=F_CHUNK)
    return out[0].transpose(0, 1)


@torch.no_grad()
def test_steps_and_context_pass_match_full_sequence(model):
    ctx = torch.randn(5, CFG.text_dim)
    clean = torch.randn(N_CHUNKS * F_CHUNK, CFG.in_channels, H, W)
    cache = model.new_stream_cache(BIG_CACHE)
    cache.set_context(model.embed_text(ctx))
    for c in range(N_CHUNKS):
        lo, hi = c * F_CHUNK, (c + 1) * F_CHUNK
        for t_step in (1000.0, 937.5, 625.0):  # denoising steps of chunk c against the clean cache
            noisy = torch.randn(F_CHUNK, CFG.in_channels, H, W)
            got = model.stream_forward(noisy, [Segment(F_CHUNK, cache)], GRID, torch.full((F_CHUNK,), t_step))
            lat = torch.cat((clean[:lo], noisy))
            t = torch.cat((torch.zeros(lo), torch.full((F_CHUNK,), t_step)))
            want = full_flow(model, lat, t, ctx)[lo:hi]
            assert (got - want).abs().max() <= 1e-4
            assert cache.frames == lo  # steps do not commit
        # context pass: clean chunk at t=0 commits its K/V
        got = model.stream_forward(clean[lo:hi], [Segment(F_CHUNK, cache, commit_frames=F_CHUNK)], GRID,
                                   torch.zeros(F_CHUNK))
        want = full_flow(model, clean[:hi], torch.zeros(hi), ctx)[lo:hi]
        assert (got - want).abs().max() <= 1e-4
        assert cache.frames == hi


@torch.no_grad()
def test_multi_chunk_segment_is_block_causal(model):
    """A stream-batch segment [context chunk | in-flight chunks] equals the full block-causal forward."""
    ctx = torch.randn(5, CFG.text_dim)
    clean = torch.randn(2 * F_CHUNK, CFG.in_channels, H, W)
    cache = model.new_stream_cache(BIG_CACHE)
    cache.set_context(model.embed_text(ctx))
    model.stream_forward(clean[:F_CHUNK], [Segment(F_CHUNK, cache, commit_frames=F_CHUNK)], GRID,
                         torch.zeros(F_CHUNK))
    inflight = torch.randn(2 * F_CHUNK, CFG.in_channels, H, W)
    seq = torch.cat((clean[F_CHUNK:], inflight))  # [ctx chunk 1 | chunk 2 @ 625 | chunk 3 @ 1000]
    t = torch.cat((torch.zeros(F_CHUNK), torch.full((F_CHUNK,), 625.0), torch.full((F_CHUNK,), 1000.0)))
    got = model.stream_forward(seq, [Segment(3 * F_CHUNK, cache, block_frames=F_CHUNK, commit_frames=F_CHUNK)],
                               GRID, t)
    want = full_flow(model, torch.cat((clean[:F_CHUNK], seq)), torch.cat((torch.zeros(F_CHUNK), t)), ctx)
    assert (got - want[F_CHUNK:]).abs().max() <= 1e-4
    assert cache.frames == 2 * F_CHUNK  # only the context chunk was committed


@torch.no_grad()
def test_segments_of_different_streams_batch_without_mixing(model):
    """Two streams in one forward give each stream's own single-stream result."""
    caches, singles, inputs = [], [], []
    for s in range(2):
        ctx = torch.randn(5, CFG.text_dim)
        cache_a, cache_b = model.new_stream_cache(BIG_CACHE), model.new_stream_cache(BIG_CACHE)
        for c in (cache_a, cache_b):
            c.set_context(model.embed_text(ctx))
        warm = torch.randn((s + 1) * F_CHUNK, CFG.in_channels, H, W)  # different cache fill per stream
        for c in (cache_a, cache_b):
            model.stream_forward(warm, [Segment(warm.shape[0], c, block_frames=F_CHUNK,
                                                commit_frames=warm.shape[0])], GRID, torch.zeros(warm.shape[0]))
        x = torch.randn(F_CHUNK, CFG.in_channels, H, W)
        singles.append(model.stream_forward(x, [Segment(F_CHUNK, cache_a)], GRID, torch.full((F_CHUNK,), 750.0)))
        caches.append(cache_b)
        inputs.append(x)
    both = model.stream_forward(torch.cat(inputs), [Segment(F_CHUNK, c) for c in caches], GRID,
                                torch.full((2 * F_CHUNK,), 750.0))
    assert (both[:F_CHUNK] - singles[0]).abs().max() <= 1e-5
    assert (both[F_CHUNK:] - singles[1]).abs().max() <= 1e-5
    assert (singles[0] - singles[1]).abs().max() > 1e-2


@torch.no_grad()
def test_slices_chained_equal_the_whole_model(model):
    """Blocks [0, 1) + [1, 3) + [3, 4) with activations handed on equal the whole model (caches per slice)."""
    slices = [CausalWanModel(CFG, (0, 1), with_embed=True, with_head=False),
              CausalWanModel(CFG, (1, 3), with_embed=False, with_head=False),
              CausalWanModel(CFG, (3, 4), with_embed=False, with_head=True)]
    ctx = torch.randn(5, CFG.text_dim)
    whole_cache = model.new_stream_cache(BIG_CACHE)
    whole_cache.set_context(model.embed_text(ctx))
    caches = [s.new_stream_cache(BIG_CACHE) for s in slices]
    for c in caches:
        c.set_context(slices[0].embed_text(ctx))
    for chunk in range(3):
        for t_step, commit in ((1000.0, 0), (0.0, F_CHUNK)):
            x = torch.randn(F_CHUNK, CFG.in_channels, H, W)
            t = torch.full((F_CHUNK,), t_step)
            want = model.stream_forward(x, [Segment(F_CHUNK, whole_cache, commit_frames=commit)], GRID, t)
            act = x
            for s, c in zip(slices, caches):
                act = s.stream_forward(act, [Segment(F_CHUNK, c, commit_frames=commit)], GRID, t)
            assert (act - want).abs().max() <= 1e-5
    assert sum(c.nbytes() for c in caches) == whole_cache.nbytes()


@torch.no_grad()
def test_independent_segment_blocks_see_only_the_cache_and_themselves(model):
    ctx = torch.randn(5, CFG.text_dim)
    cache_a, cache_b = model.new_stream_cache(BIG_CACHE), model.new_stream_cache(BIG_CACHE)
    for c in (cache_a, cache_b):
        c.set_context(model.embed_text(ctx))
        warm = torch.randn(F_CHUNK, CFG.in_channels, H, W, generator=torch.Generator().manual_seed(1))
        model.stream_forward(warm, [Segment(F_CHUNK, c, commit_frames=F_CHUNK)], GRID, torch.zeros(F_CHUNK))
    seq = torch.randn(3 * F_CHUNK, CFG.in_channels, H, W)
    t = torch.cat((torch.zeros(F_CHUNK), torch.full((F_CHUNK,), 625.0), torch.full((F_CHUNK,), 1000.0)))
    whole = model.stream_forward(seq, [Segment(3 * F_CHUNK, cache_a, block_frames=F_CHUNK, commit_frames=F_CHUNK,
                                               independent=True)], GRID, t)
    # the context block and the last block, at their original offsets, give the same flow: the middle
    # block is invisible to the last one
    keep = torch.cat((torch.arange(F_CHUNK), torch.arange(2 * F_CHUNK, 3 * F_CHUNK)))
    pair = model.stream_forward(seq[keep], [Segment(2 * F_CHUNK, cache_b, block_frames=F_CHUNK,
                                                    commit_frames=F_CHUNK, independent=True,
                                                    offsets=(0, 2 * F_CHUNK))], GRID, t[keep])
    assert (whole[2 * F_CHUNK:] - pair[F_CHUNK:]).abs().max() <= 1e-5
    assert (whole[:F_CHUNK] - pair[:F_CHUNK]).abs().max() <= 1e-5
    # and it differs from the in-flight variant, where it also sees the middle block
    cache_c = model.new_stream_cache(BIG_CACHE)
    cache_c.set_context(model.embed_text(ctx))
    warm = torch.randn(F_CHUNK, CFG.in_channels, H, W, generator=torch.Generator().manual_seed(1))
    model.stream_forward(warm, [Segment(F_CHUNK, cache_c, commit_frames=F_CHUNK)], GRID, torch.zeros(F_CHUNK))
    inflight = model.stream_forward(seq, [Segment(3 * F_CHUNK, cache_c, block_frames=F_CHUNK, commit_frames=F_CHUNK)],
                                    GRID, t)
    assert (inflight[2 * F_CHUNK:] - whole[2 * F_CHUNK:]).abs().max() > 1e-3


@torch.no_grad()
def test_first_slice_hands_on_a_contiguous_residual_stream():
    """The patch embedding's [F, T, dim] comes out of a conv as a permuted view; elementwise ops keep their input's
    strides, so without a copy every block of the first slice (and its Activation) would run in that layout
    (about 3 % slower on CPU: each norm copies it, each residual add strides by F*T)."""
    first = CausalWanModel(CFG, (0, 2), with_embed=True, with_head=False).eval()
    cache = first.new_stream_cache(BIG_CACHE)
    cache.set_context(first.embed_text(torch.randn(5, CFG.text_dim)))
    x = torch.randn(F_CHUNK, CFG.in_channels, H, W)
    assert first.embed_latents(x).is_contiguous()
    act = first.stream_forward(x, [Segment(F_CHUNK, cache)], GRID, torch.full((F_CHUNK,), 500.0))
    assert act.hidden.shape == (F_CHUNK, GRID[0] * GRID[1], CFG.dim) and act.hidden.is_contiguous()


def test_time_embedding_rows_are_kept_per_timestep_and_dropped_with_the_weights():
    model = CausalWanModel(CFG, (0, 0), with_head=False).eval()
    t = torch.tensor([1000.0, 250.0, 1000.0, 0.0])
    with torch.enable_grad():  # autograd (training): computed as a batch, nothing kept
        want_time, want_e0 = model.embed_time(t)
    assert want_e0.requires_grad and model._time_rows == {}
    with torch.no_grad():
        e_time, e0 = model.embed_time(t)
        assert sorted(model._time_rows) == [0.0, 250.0, 1000.0]  # one entry per distinct step
        torch.testing.assert_close(e_time, want_time.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(e0, want_e0.detach(), rtol=1e-6, atol=1e-6)
        # a row does not depend on the batch it comes in: each step's rows are computed alone
        alone = model.embed_time(torch.tensor([250.0]))
        assert torch.equal(alone[1][0], e0[1]) and torch.equal(alone[0][0], e_time[1])
        model.time_projection[1].weight.mul_(2)  # new weights (a checkpoint loaded in place): rows recomputed
        got = model.embed_time(t)[1]
        assert torch.equal(got, torch.stack([model._embed_time(t[i:i + 1])[1][0] for i in range(4)]))
        torch.testing.assert_close(got, model._embed_time(t)[1], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got, e0)
        many = torch.arange(TIME_ROWS_KEPT + 10, dtype=torch.float32)  # bounded: a continuous noise controller
        model.embed_time(many[:TIME_ROWS_KEPT])
        model.embed_time(many[TIME_ROWS_KEPT:])
        assert len(model._time_rows) <= TIME_ROWS_KEPT
