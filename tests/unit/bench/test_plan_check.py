"""bench/plan_check.py takes a matrix's real runs round by round, so the host's slow spells fall on every case."""

import argparse

import bench.plan_check as plan_check


def test_a_matrix_takes_its_repeats_round_by_round(monkeypatch):
    order = []

    def fake_run(gen, parallel, engine_cfg, streams, chunks, warmup):
        order.append((parallel.stages, gen.sampler.mode, streams))
        return {"frames_per_s": float(len(order))}

    monkeypatch.setattr(plan_check, "run_real", fake_run)
    base = dict(model="tiny", steps=2, lanes=0, decode_workers=0, chunks=1, warmup=0)
    cases = [argparse.Namespace(**base, stages=p, mode=m, streams=1) for p, m in ((1, "sequential"), (2, "stream_batch"))]
    runs = plan_check.real_runs(cases, repeats=3)
    first, second = (1, "sequential", 1), (2, "stream_batch", 1)
    assert order == [first, second] * 3
    assert [[r["frames_per_s"] for r in case] for case in runs] == [[1.0, 3.0, 5.0], [2.0, 4.0, 6.0]]
