"""What a CPU stage's forward costs per stream at the micro-batch sizes pipeline_scaling's sequential case gives
P=2 and P=1, and what the GEMM backend leaves on the table. One core, one torch thread, both parts in one run.

1. Micro-batch size. ``small``'s first half (blocks [0, 4) with the embeddings, ``StageWorker.profile``: one
   forward of n streams x 1 latent frame against full caches, fastest of the repeats), n = 2 and n = 4,
   interleaved. Four streams in the sequential case are two micro-batches of 2 on a P=2 pipeline and one of 4 at
   P=1 (``workers.plan.batch_streams``), so ``per-stream cost 2 streams / 4 streams`` is what the smaller
   micro-batches cost the P=2 side of that ratio before any pipelining loss.
2. GEMM backend. The same slice's block linears, chained as a block runs them, at 2 streams' tokens: torch's
   default CPU GEMM (MKL sgemm) against oneDNN with each weight packed once
   (``torch.ops.mkldnn._linear_pointwise``, the op inductor's CPU path emits). ``oneDNN / default GEMM speed`` and
   the largest difference from a float64 chain. Not used by the model; a measurement for a future choice.

Writes JSON (``--out``); the last line reads ``per-stream 2/4 = <x> onednn/default = <y>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import host_cpu, write_json  # noqa: E402
from workers.config import CacheConfig, GenerationConfig, get_config  # noqa: E402
from workers.host import keep_heap  # noqa: E402
from workers.stage import StageWorker  # noqa: E402

LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o", "ffn.0", "ffn.2")


def batch_costs(worker: StageWorker, grid: tuple[int, int], cache_cfg: CacheConfig, rounds: int,
                repeats: int) -> dict[int, float]:
    """Fastest forward per stream (s) at 2 and 4 streams, the sizes interleaved round by round."""
    best = {2: float("inf"), 4: float("inf")}
    for r in range(rounds):
        for n in best:
            stats = worker.profile(grid, 1, cache_cfg, repeats=repeats, streams=n)
            best[n] = min(best[n], stats.compute_s / n)
        print(f"round {r + 1}/{rounds}: per stream {best[2] * 1e3:.2f} ms at 2 streams, "
              f"{best[4] * 1e3:.2f} ms at 4", flush=True)
    return best


def _chain(blocks, x: torch.Tensor, linear) -> torch.Tensor:
    """A block's linears in the order it runs them (attention and norms left out): [M, dim] -> [M, dim]."""
    for layers in blocks:
        q, k, v = (linear(layers[i], x) for i in range(3))
        o = linear(layers[3], q * 1e-2 + k * 1e-2 + v)
        x = linear(layers[5], linear(layers[4], o))
        x = linear(layers[7], F.gelu(linear(layers[6], x), approximate="tanh")) * 1e-2 + x
    return x


def gemm_backends(worker: StageWorker, rows: int, rounds: int) -> dict:
    """Chain time (thread CPU s, min over rounds) through the default GEMM and through packed oneDNN."""
    blocks = [[blk.get_submodule(name) for name in LINEARS] for blk in worker.model.blocks.values()]
    out = {"rows": rows, "gemm_flops": sum(2 * rows * m.in_features * m.out_features for b in blocks for m in b)}
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise") or not torch.backends.mkldnn.is_available():
        return dict(out, onednn_s=None, note="oneDNN linear not available in this torch build")
    packed = {id(m): torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows) for b in blocks for m in b}
    chains = {
        "default": lambda m, x: F.linear(x, m.weight, m.bias),
        "onednn": lambda m, x: torch.ops.mkldnn._linear_pointwise(x, packed[id(m)], m.bias, "none", [], ""),
    }
    x = torch.randn(rows, worker.model.cfg.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _chain(blocks, x.double(),
                     lambda m, t: F.linear(t, m.weight.double(), m.bias.double()))
        best = {name: float("inf") for name in chains}
        results = {}
        for _ in range(rounds):
            for name, linear in chains.items():
                start = time.thread_time()
                results[name] = _chain(blocks, x, linear)
                best[name] = min(best[name], time.thread_time() - start)
    for name in chains:
        out[f"{name}_s"] = best[name]
        out[f"{name}_gflops"] = out["gemm_flops"] / best[name] / 1e9
        out[f"{name}_max_abs_diff_vs_float64"] = (results[name].double() - ref).abs().max().item()
    out["ref_max_abs"] = ref.abs().max().item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/cpu_forward_costs.json")
    parser.add_argument("--model", default="small")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds of each measurement")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per profile call (the fastest counts)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as a pinned stage has
    kept = keep_heap()  # as a CPU stage process does
    gen = GenerationConfig(model=get_config(args.model))
    cfg = gen.model
    grid = cfg.token_grid(gen.height, gen.width)
    half = (0, cfg.num_layers // 2)
    worker = StageWorker(gen, half, 0, 2)  # the first stage of a P=2 pipeline
    cache_cfg = CacheConfig(sink_frames=1, window_frames=3, recache_frames=3)  # pipeline_scaling's
    costs = batch_costs(worker, grid, cache_cfg, args.rounds, args.repeats)
    gemm = gemm_backends(worker, 2 * grid[0] * grid[1], args.rounds)
    per_stream_ratio = costs[2] / costs[4]
    speed = gemm["default_s"] / gemm["onednn_s"] if gemm.get("onednn_s") else None
    write_json(args.out, {"cpu": host_cpu(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                          "model": args.model, "slice": half, "grid": grid, "kept_heap": kept,
                          "per_stream_s": {str(n): v for n, v in costs.items()},
                          "per_stream_2_over_4": per_stream_ratio, "gemm": gemm, "onednn_over_default": speed})
    if speed is not None:
        print(f"GEMM chain at {gemm['rows']} rows: default {gemm['default_gflops']:.0f} GFLOP/s, oneDNN packed "
              f"{gemm['onednn_gflops']:.0f} GFLOP/s; largest difference from float64 "
              f"{gemm['default_max_abs_diff_vs_float64']:.1e} / {gemm['onednn_max_abs_diff_vs_float64']:.1e} "
              f"(values up to {gemm['ref_max_abs']:.1f})")
    print(f"per-stream cost 2 streams / 4 streams = {per_stream_ratio:.3f}")
    print(f"per-stream 2/4 = {per_stream_ratio:.3f} onednn/default = " + (f"{speed:.2f}" if speed else "n/a"))


if __name__ == "__main__":
    main()
