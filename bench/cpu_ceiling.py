"""What two cores of this machine give over one, for the work a stage does: the ceiling of any 2-stage pipeline.

One single-threaded torch process runs a fixed loop of `small`-sized matmuls (the DiT block's shapes) alone, then
two identical processes run it at the same time (their timed loops start together, after both set up); both
timed in the same run. ratio = 2 x t_alone / t_concurrent
(2.0: two independent cores; less: the cores share something, e.g. hyperthreads of one host core or memory
bandwidth). Prints `two cores / one core = <x>` and writes JSON.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import host_cpu, write_json  # noqa: E402


def _work(iters: int, dim: int, ffn: int, tokens: int, ready, q) -> None:
    import torch

    torch.set_num_threads(1)
    x, w, w2 = torch.randn(tokens, dim), torch.randn(dim, ffn), torch.randn(ffn, dim)  # a block's FFN
    ready.wait()  # every process set up: the timed loops start together, so none runs part of its loop alone
    start = time.perf_counter()
    for _ in range(iters):
        x = torch.nn.functional.gelu(x @ w) @ w2 * 1e-3 + x
    q.put((start, time.perf_counter() - start))


def timed(n: int, args) -> tuple[list[float], float]:
    """``n`` processes run the loop at once: (each one's seconds, the spread of their start times)."""
    ctx = mp.get_context("spawn")
    q, ready = ctx.Queue(), ctx.Barrier(n)
    procs = [ctx.Process(target=_work, args=(args.iters, args.dim, args.ffn, args.tokens, ready, q)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [q.get() for _ in procs]
    for p in procs:
        p.join()
    starts = [start for start, _ in got]
    return [t for _, t in got], max(starts) - min(starts)


def run(n: int, args) -> float:
    """Seconds the slowest of ``n`` processes running the loop at once takes."""
    return max(timed(n, args)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/cpu_ceiling.json")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--dim", type=int, default=512, help="model width (small's)")
    parser.add_argument("--ffn", type=int, default=1536, help="FFN width (small's)")
    parser.add_argument("--tokens", type=int, default=384, help="tokens per forward")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    alone, together, spread = [], [], []
    for rep in range(args.repeats):  # interleaved
        alone.append(run(1, args))
        times, start_spread = timed(2, args)
        together.append(max(times))
        spread.append(start_spread)
        print(f"repeat {rep + 1}: one process {alone[-1]:.2f} s, two at once {together[-1]:.2f} s "
              f"(x{2 * alone[-1] / together[-1]:.2f})", flush=True)
    a, t = sorted(alone)[len(alone) // 2], sorted(together)[len(together) // 2]
    write_json(args.out, {"cpu": host_cpu(), "cpu_count": os.cpu_count(), "iters": args.iters, "dim": args.dim, "ffn": args.ffn,
                          "tokens": args.tokens, "alone_s": alone, "together_s": together,
                          "together_start_spread_s": spread, "two_over_one": 2 * a / t})
    print(f"two cores / one core = {2 * a / t:.2f}")


if __name__ == "__main__":
    main()
