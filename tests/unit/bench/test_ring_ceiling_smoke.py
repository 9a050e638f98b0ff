"""bench/ring_ceiling.py runs end to end (tiny model, a few micro-batches, one repeat): both stages forward every
micro-batch, the ring carries each one's next-step latents back, and the ratio is taken from the measured rates.
Not a speed threshold: the real run is `python bench/ring_ceiling.py` on `small`."""

import os

import pytest

from tests.unit.bench.runner import run_bench


def test_ring_ceiling_bench_smoke(tmp_path):
    out = tmp_path / "ring_ceiling.json"
    proc, result = run_bench("ring_ceiling.py", "--model", "tiny", "--ticks", "16", "--warmup", "4", "--repeats", "1",
                             out=out, timeout=300)
    [run] = result["runs"]
    assert run["P2_ticks"] == 16
    # stage 1 received every micro-batch stage 0 forwarded; stage 0 every ring message but the last two's
    assert run["P2_messages"] == {"activations": 16, "ring": 14}
    assert run["P1_stream_steps_per_s"] > 0 and run["P2_stream_steps_per_s"] > 0
    assert run["P1_forward_cpu_ms"] > 0 and len(run["P2_forward_cpu_ms"]) == 2 and min(run["P2_forward_cpu_ms"]) > 0
    assert run["ratio"] == pytest.approx(run["P2_stream_steps_per_s"] / run["P1_stream_steps_per_s"])
    assert result["ratio"] == run["ratio"]
    if len(os.sched_getaffinity(0)) >= 2:  # each stage a core of its own, as stage actors claim them
        assert sorted(core for claim in run["cores"]["P2"] for core in claim) == sorted(os.sched_getaffinity(0))[:2]
    assert proc.stdout.strip().splitlines()[-1] == f"ring P2/P1 = {result['ratio']:.3f}"
