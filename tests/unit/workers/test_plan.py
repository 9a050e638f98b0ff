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


def test_planner_prefers_layer_split_without_communication_cost():
    from workers.plan import PlanCosts, choose_plan

    costs = PlanCosts(block_s=(1.0,) * 8, embed_s=0.1, head_s=0.1)
    plan = choose_plan(costs, devices=4, num_steps=4, mode="sequential")
    assert plan.step_groups == ((0, 1, 2, 3),) and len(plan.layer_splits[0]) == 4


def test_planner_picks_step_split_or_grid_when_hand_offs_are_expensive():
    from workers.plan import PlanCosts, choose_plan

    costs = PlanCosts(block_s=(1.0,) * 8, hop_s=20.0)
    plan = choose_plan(costs, devices=4, num_steps=4, mode="sequential")
    assert len(plan.step_groups) == 4 and plan.devices == 4  # no hand-offs at all
    moderate = PlanCosts(block_s=(1.0,) * 8, hop_s=1.2)  # 5 x 3.2 = 16, 3 x 5.2 = 15.6, 2 x 8 = 16
    grid = choose_plan(moderate, devices=4, num_steps=4, mode="sequential")
    assert [len(g) for g in grid.step_groups] == [2, 2] and len(grid.layer_splits[0]) == 2  # 2x2


def test_planner_respects_memory_and_mode():
    from workers.plan import PlanCosts, choose_plan

    costs = PlanCosts(block_s=(1.0,) * 8, hop_s=20.0, block_bytes=100, kv_bytes_per_block=10)
    tight = choose_plan(costs, devices=4, num_steps=4, mode="sequential", streams=2, device_bytes=300)
    assert len(tight.step_groups) == 1 and tight.bytes_per_device <= 300  # only a full layer split fits
    sb = choose_plan(costs, devices=4, num_steps=4, mode="stream_batch")
    assert len(sb.step_groups) == 1
    with pytest.raises(ValueError, match="no plan"):
        choose_plan(costs, devices=2, num_steps=4, mode="sequential", device_bytes=10)
