"""Block scheduler (exact, vs brute force), block hand-overs, latency model."""

import itertools
import random

import pytest

from workers.executor import moves
from workers.plan import LatencyModel, balanced_split, even_split, stage_costs


def brute_force(costs, stages, first, last):
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0,) + cuts + (n,)
        split = list(zip(bounds[:-1], bounds[1:]))
        best = min(best, max(stage_costs(split, costs, first, last)))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_split_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 10)
    stages = rng.randint(1, min(4, n))
    costs = [rng.choice([rng.uniform(0.1, 5.0), float(rng.randint(1, 4))]) for _ in range(n)]
    first, last = rng.uniform(0, 4), rng.uniform(0, 6)
    split = balanced_split(costs, stages, first, last)
    assert len(split) == stages and split[0][0] == 0 and split[-1][1] == n
    assert all(a < b for a, b in split) and all(split[i][1] == split[i + 1][0] for i in range(stages - 1))
    assert max(stage_costs(split, costs, first, last)) == pytest.approx(brute_force(costs, stages, first, last))


def test_hand_made_cost_vectors():
    # A heavy decode on the last stage pushes blocks to the first stage.
    assert balanced_split([1.0] * 8, 2, 0.0, 4.0) == [(0, 6), (6, 8)]
    # Uniform blocks, no extras: even.
    assert balanced_split([1.0] * 30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert even_split(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    # One expensive block sits alone.
    assert max(stage_costs(balanced_split([1, 1, 9, 1, 1], 3), [1, 1, 9, 1, 1])) == 9
    with pytest.raises(ValueError):
        balanced_split([1.0, 1.0], 3)


def apply(split, hops):
    owner = {b: s for s, (a, e) in enumerate(split) for b in range(a, e)}
    for src, dst, blocks in hops:
        for b in blocks:
            assert owner[b] == src
            owner[b] = dst
        for s in range(len(split)):  # every slice contiguous after every hop
            mine = sorted(b for b, o in owner.items() if o == s)
            assert mine == list(range(mine[0], mine[-1] + 1)) if mine else True
    return owner


@pytest.mark.parametrize("seed", range(30))
def test_moves_reach_the_new_split_through_contiguous_slices(seed):
    rng = random.Random(seed)
    n, p = rng.randint(3, 12), rng.randint(2, 4)
    if p > n:
        p = n

    def rand_split():
        cuts = sorted(rng.sample(range(1, n), p - 1))
        b = [0] + cuts + [n]
        return list(zip(b[:-1], b[1:]))

    old, new = rand_split(), rand_split()
    owner = apply(old, moves(old, new))
    assert owner == {b: s for s, (a, e) in enumerate(new) for b in range(a, e)}


def test_latency_model_fits_and_predicts():
    m = LatencyModel(num_stages=2)
    for tokens in (100, 200, 400, 100, 300):
        m.observe(0, tokens, 0.002 + 1e-5 * tokens)
        m.observe(1, tokens, 0.001 + 2e-5 * tokens)
    assert m.stage_times(500) == pytest.approx([0.007, 0.011], rel=1e-3)
    assert m.tick(500) == pytest.approx(0.011, rel=1e-3)
    assert m.forward_latency(500) == pytest.approx(0.018, rel=1e-3)
    assert m.chunk_latency(5, 500) == pytest.approx(0.09, rel=1e-3)
    # 1 / (5 forwards x 11 ms) = 18.2 chunks/s x 12 frames = 218 frames/s -> 13 streams at 16 fps
    assert m.max_streams(16.0, 12, 5, 500) == 13
    assert not LatencyModel(num_stages=1).calibrated


def _fed(decode_workers: int, shared: bool) -> LatencyModel:
    m = LatencyModel(num_stages=2, decode_workers=decode_workers, decode_shared=shared)
    for tokens in (100, 200, 400):
        m.observe(0, tokens, 0.002 + 1e-5 * tokens)
        m.observe(1, tokens, 0.001 + 2e-5 * tokens)
    m.observe_decode(0.02)
    return m


def test_latency_model_counts_decode_shared_and_dedicated():
    none = _fed(0, True)
    assert none.decode_time() == 0 and none.max_streams(16.0, 12, 5, 500) == 13  # as above: DiT only
    shared = _fed(1, True)
    # 20 ms of decode per chunk on the last stage's device: 4 ms per forward (5 forwards a chunk)
    assert shared.stage_times(500, 5) == pytest.approx([0.007, 0.015], rel=1e-3)
    assert shared.chunk_latency(5, 500) == pytest.approx(0.09 + 0.02, rel=1e-3)
    # 1 / (5 x 15 ms) = 13.3 chunks/s x 12 = 160 frames/s -> 10 streams at 16 fps
    assert shared.max_streams(16.0, 12, 5, 500) == 10
    dedicated = _fed(1, False)
    assert dedicated.tick(500, 5) == pytest.approx(0.011, rel=1e-3)  # the stages do not decode
    # DiT 18.2 chunks/s, but one worker decodes 50 chunks/s: not the bound here; at 1 forward a chunk it is
    assert dedicated.max_streams(16.0, 12, 5, 500) == 13
    assert dedicated.frame_rate(12, 1, 500) == pytest.approx(50 * 12, rel=1e-3)  # 1 worker x 1 / 20 ms
    assert _fed(2, False).frame_rate(12, 1, 500) == pytest.approx(1 / 0.011 * 12, rel=1e-3)  # 2 workers: DiT bound


def test_latency_model_charges_video_encode_to_video_streams_only():
    m = _fed(0, True)  # 7 / 11 ms per 500-token forward: 13 streams at 16 fps (above)
    assert m.encode_time() == 0 and m.max_streams(16.0, 12, 5, 500, video=True) == 13  # no encode seen yet
    for _ in range(3):
        m.observe_encode(0.03)  # 30 ms per chunk on stage 0: 6 ms per forward (5 forwards a chunk)
    assert m.stage_times(500, 5, video=True) == pytest.approx([0.013, 0.011], rel=1e-3)
    assert m.chunk_latency(5, 500, video=True) == pytest.approx(0.03 + 0.09, rel=1e-3)
    # 1 / (5 x 13 ms) = 15.4 chunks/s x 12 = 185 frames/s -> 11 video streams at 16 fps
    assert m.max_streams(16.0, 12, 5, 500, video=True) == 11
    # text-to-video capacity is what the forwards alone give: the encodes seen do not lower it
    assert m.max_streams(16.0, 12, 5, 500) == 13 and m.chunk_latency(5, 500) == pytest.approx(0.09, rel=1e-3)
    # micro-batches of 2 streams carry 2 encodes: 2 x 30 ms over 5 forwards on stage 0
    assert m.frame_rate(12, 5, 500, 2, video=True) == pytest.approx(2 / (5 * (0.002 + 1e-5 * 1000 + 0.012)) * 12,
                                                                    rel=1e-3)
