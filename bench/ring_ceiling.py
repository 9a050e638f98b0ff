"""The ceiling of pipeline_scaling's sequential case on this host: the same P=2 pipeline with no Ray, no driver
and no engine, against the same P=1 forward, in one run.

P=2: two processes, one per stage, each claiming a core (``workers.host.claim_cores``, as a stage actor does)
with one torch thread, each a ``StageWorker`` over its half of the blocks (``workers.plan.even_split``). They
run two micro-batches of ``--streams-per-mb`` streams (1 latent frame each, against full caches:
``StageWorker.open_probe``) in a ring: stage 0 forwards A and sends stage 1 its activation through the
engine's own ``StageLink`` (gloo), then B; stage 1 receives, forwards, takes x0 and the re-noise
(``denoise.advance``) and sends the next step's latents back on the ring. Fixed inputs: the messages are real
(their sizes and copies), their contents are not used. P=1: one process, every block, one micro-batch of
both groups' streams, forward then ``advance``. Rate: stream-steps per second over the steady window (after
``--warmup`` micro-batches) on the last stage.

``ring P2/P1`` is what a two-stage pipeline of this model reaches on these cores, where only the engine's work
around the forwards (a Ray call per stage and micro-batch, the driver, Ray's daemons, the engine's bookkeeping)
is missing; pipeline_scaling's sequential ratio over it is the share of the pipeline the engine keeps
(``pipeline_scaling.py --ring-ceiling`` measures both, interleaved). Writes JSON (``--out``); the last line
reads ``ring P2/P1 = <x>``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(HERE)] + [p for p in sys.path if os.path.realpath(p or os.curdir) != HERE]

from bench.common import host_cpu, outputs_rate, write_json  # noqa: E402

def _worker(model: str, stage: int, stages: int, streams: int, groups: int):
    """This process's StageWorker (one torch thread, a core of its own when one is free) and ``groups``
    micro-batches of ``streams`` probe streams each: (worker, [(mb, inputs, t)], cores)."""
    import torch

    from bench.pipeline_scaling import generation_config
    from workers.host import claim_cores, keep_heap
    from workers.plan import even_split
    from workers.stage import StageWorker

    torch.set_num_threads(1)
    claim = claim_cores(1)  # before the model is built, as a stage actor does
    keep_heap()
    gen = generation_config(model, "sequential")
    cfg = gen.model
    worker = StageWorker(gen, even_split(cfg.num_layers, stages)[stage], stage, stages, "cpu", torch.float32, False)
    grid = cfg.token_grid(gen.height, gen.width)
    steps = len(gen.sampler.denoising_steps)  # each forward a chunk's first step: its latents go around the ring
    batches = [worker.open_probe([f"g{g}s{i}" for i in range(streams)], grid, 1, gen.cache, steps=steps, seed=g)
               for g in range(groups)]
    return worker, batches, None if claim is None else claim.cores


def _stage(model: str, stage: int, streams: int, ticks: int, rendezvous: str, q) -> None:
    """One stage of the P=2 ring; puts (stage, stamps after each micro-batch, forward CPU seconds, cores, messages
    received)."""
    from dataclasses import replace

    import torch
    import torch.distributed as dist

    from workers import denoise
    from workers.ray_executor import max_inflight
    from workers.stage_link import RING_TAG, StageLink

    worker, batches, cores = _worker(model, stage, 2, streams, 2)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=stage, world_size=2)
    link = StageLink(stage, 2, worker.model.cfg, worker.device, torch.float32, max_inflight(2))
    stamps, cpu, received = [], [], 0  # received: ring messages (stage 0) or activations (stage 1)
    try:
        for i in range(ticks):
            mb, x, t = batches[i % 2]
            mb = replace(mb, seq=i, profile=False)
            shape = worker.latent_shape(mb.grid)
            link.settle(i)
            if stage == 0:
                if i >= 2:  # the ring latents of this group's previous step
                    received += link.next_ring() is not None
                start = time.thread_time()
                out, _, _ = worker.forward(mb, x, None, t)
                cpu.append(time.thread_time() - start)
                if i + 2 < ticks:  # before the send, as a stage actor does (StageLink.post_ring)
                    link.post_ring(mb, shape)
                link.send_activation(mb, out, x, {})
            else:
                act, latents, _ = link.recv_activation(mb, shape)
                received += 1
                start = time.thread_time()
                flow, _, _ = worker.forward(mb, act, None)
                ring, _ = denoise.advance(mb, latents, flow)
                cpu.append(time.thread_time() - start)
                if i + 2 < ticks:  # stage 0 takes it two micro-batches on (it posted the receive)
                    link.send(ring.contiguous(), 0, i, RING_TAG)
            stamps.append(time.perf_counter())
        link.close()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    q.put((stage, stamps, cpu, cores, received))


def _single(model: str, streams: int, ticks: int, q) -> None:
    """P=1: every block, one micro-batch of ``streams`` streams; puts (0, stamps, forward CPU seconds, cores, 0)."""
    from dataclasses import replace

    from workers import denoise

    worker, [(mb, x, t)], cores = _worker(model, 0, 1, streams, 1)
    mb = replace(mb, profile=False)
    stamps, cpu = [], []
    for _ in range(ticks):
        start = time.thread_time()
        flow, _, _ = worker.forward(mb, x, None, t)
        denoise.advance(mb, x, flow)
        cpu.append(time.thread_time() - start)
        stamps.append(time.perf_counter())
    q.put((0, stamps, cpu, cores, 0))


def _run(target, arg_sets: list[tuple], timeout_s: float) -> list[tuple]:
    """``target(*args, q)`` in a spawned process per argument set, at once; their results sorted by stage."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, q)) for args in arg_sets]
    for p in procs:
        p.start()
    try:
        return sorted(q.get(timeout=timeout_s) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def measure(model: str = "small", streams_per_mb: int = 2, ticks: int = 240, warmup: int = 40,
            timeout_s: float = 600) -> dict:
    """One P=1 and one P=2 measurement, in that order: stream-steps per second and the forwards' CPU."""
    single_ticks = max(6, ticks // 4)  # a P=1 micro-batch holds both groups' streams: ~4x a stage's forward
    [(_, s1, c1, cores1, _)] = _run(_single, [(model, 2 * streams_per_mb, single_ticks)], timeout_s)
    with tempfile.TemporaryDirectory() as tmp:
        rendezvous = os.path.join(tmp, "pg")
        (_, _, c_first, cores_a, rings), (_, s_last, c_last, cores_b, acts) = _run(
            _stage, [(model, stage, streams_per_mb, ticks, rendezvous) for stage in (0, 1)], timeout_s)
    p1 = outputs_rate(s1, max(1, single_ticks * warmup // ticks))[1] * 2 * streams_per_mb
    p2 = outputs_rate(s_last, warmup)[1] * streams_per_mb
    return {"P1_stream_steps_per_s": p1, "P2_stream_steps_per_s": p2, "ratio": p2 / p1,
            "P1_forward_cpu_ms": statistics.median(c1) * 1e3,
            "P2_forward_cpu_ms": [statistics.median(c[warmup:]) * 1e3 for c in (c_first, c_last)],
            "cores": {"P1": cores1, "P2": [cores_a, cores_b]}, "P2_messages": {"activations": acts, "ring": rings},
            "P2_ticks": ticks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/ring_ceiling.json")
    parser.add_argument("--model", default="small")
    parser.add_argument("--streams-per-mb", type=int, default=2, help="streams per P=2 micro-batch (P=1: twice)")
    parser.add_argument("--ticks", type=int, default=240, help="micro-batches per P=2 stage (P=1 runs a quarter)")
    parser.add_argument("--warmup", type=int, default=40, help="P=2 micro-batches left out of the rate")
    parser.add_argument("--repeats", type=int, default=3, help="P=1/P=2 pairs; the median ratio counts")
    args = parser.parse_args()
    if not 1 <= args.warmup <= args.ticks - 2:
        parser.error("--warmup must be at least 1 and leave at least 2 of --ticks (a rate is measured between ticks "
                     "after it)")
    runs = []
    for rep in range(args.repeats):
        runs.append(measure(args.model, args.streams_per_mb, args.ticks, args.warmup))
        r = runs[-1]
        print(f"repeat {rep + 1}/{args.repeats}: P=1 {r['P1_stream_steps_per_s']:.2f} stream-steps/s "
              f"(forward {r['P1_forward_cpu_ms']:.1f} ms CPU), P=2 {r['P2_stream_steps_per_s']:.2f} (forwards "
              f"{r['P2_forward_cpu_ms'][0]:.1f} / {r['P2_forward_cpu_ms'][1]:.1f} ms), ratio {r['ratio']:.3f}",
              flush=True)
    ratio = statistics.median(r["ratio"] for r in runs)
    write_json(args.out, {"machine": {"cpu": host_cpu(), "cpu_count": os.cpu_count()},
                          "model": args.model, "streams_per_mb": args.streams_per_mb, "runs": runs, "ratio": ratio})
    print(f"ring P2/P1 = {ratio:.3f}")


if __name__ == "__main__":
    main()
