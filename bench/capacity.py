"""Writes docs/capacity.md and its plots by running ``streamgen plan`` (every figure there comes from these
commands; nothing is typed in by hand).

    python bench/capacity.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.realpath(p or os.curdir) != HERE]

from orchestrator.cli import main as streamgen  # noqa: E402
from workers.costs import load_profile  # noqa: E402
from workers.planner import SDV2_H100_480P_1STEP  # noqa: E402

H100 = "profiles/h100-sdv2.json"
H200 = "profiles/h200.json"


def run(cmd: str) -> tuple[str, list[dict]]:
    """Run a ``streamgen plan`` command line from the repository root; (its printed table, its JSON plans)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "plan.json")
        out = io.StringIO()
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            with contextlib.redirect_stdout(out):
                code = streamgen(shlex.split(cmd)[1:] + ["--json", path])
        finally:
            os.chdir(cwd)
        if code:
            raise SystemExit(f"{cmd} failed ({code})")
        with open(path) as f:
            return out.getvalue().rstrip(), json.load(f)["plans"]


def cpu_check() -> str:
    """The newest ``bench/plan_check.py --matrix`` result under bench/results/, as a table: the simulator
    against the real engine over Ray on the machine its CPU profile was measured on."""
    import glob

    found = sorted(glob.glob(os.path.join(ROOT, "bench", "results", "cpu-*", "plan_check.json")))
    if not found:
        return ""
    with open(found[-1]) as f:
        check = json.load(f)
    rel = os.path.relpath(found[-1], ROOT)
    repeats = check["cases"][0]["case"]["repeats"]
    by = {(c["case"]["stages"], c["case"]["mode"], c["case"]["streams"]): c for c in check["cases"]}
    one, two = by[(1, "sequential", 1)], by[(2, "sequential", 1)]  # the serial chain, against the whole model
    one_s, two_s = one["real"]["stage_compute_s"], two["real"]["stage_compute_s"]
    lines = [f"## The simulator against the real engine (CPU)\n\n`python bench/plan_check.py --matrix --repeats {repeats}` "
             f"(`{rel}`): model `small`, 4 steps, one decode worker, the real engine over Ray on "
             f"{check['machine'].get('cpu', 'this machine')}, the plan from `{check.get('profile')}` measured on "
             f"{check.get('profile_device', 'the same host')}. Error = plan / real - 1.\n\n",
             "| P | mode | streams | real FPS | plan FPS | FPS error | real p50 s | plan p50 s | p50 error |\n",
             "|---|---|---|---|---|---|---|---|---|\n"]
    for row in check["cases"]:
        c, r, p, e = row["case"], row["real"], row["plan"], row["error_pct"]
        lines.append(f"| {c['stages']} | {c['mode']} | {c['streams']} | {r['frames_per_s']:.2f} | "
                     f"{p['frames_per_s']:.2f} | {e['fps']:+.1f}% | {r['latency_p50_s']:.2f} | "
                     f"{p['latency_p50_s']:.2f} | {e['latency_p50']:+.1f}% |\n")
    lines.append("\nA CPU profile holds only on the host it names: the same VM ran 2x faster after a move to a CPU "
                 "with AVX-512/AMX, and `plan_check` warns when the host differs. With P = 2 the two "
                 "stages share the machine's two cores: the profile's `shared_slowdown` (a forward's time while "
                 "both cores compute, over its time alone) slows each call by how much the other stage and the "
                 "decode worker computed beside it; the driver and Ray are not counted (below). Real figures are "
                 f"medians of {repeats} runs, taken round by round over the cases (one run of each, then again), "
                 "so that the host's slow spells fall on every case: one run moved by +-25% on the noisy host of "
                 "2026-12-03 (the P = 2 sequential 1-stream case gave 3.80 and 5.08 frames/s in two runs a minute "
                 "apart).\n\n"
                 "**The P = 2 sequential 1-stream case moves most against the plan**: +16-17% in three matrices "
                 f"on the morning of 2026-12-03 (3 repeats, back to back), {two['error_pct']['fps']:+.1f}% in the "
                 "one above. One stream's "
                 "chain is serial, so its two stage processes take turns, and each then computes slower than the "
                 "same blocks in one process, by an amount that changes with the host: 88.9 + 94.9 ms of stage "
                 "compute per micro-batch against 154.7 ms for the whole model at P = 1 on a quiet host that "
                 f"morning (+19%), {' + '.join(f'{1000 * x:.1f}' for x in two_s)} against {1000 * one_s[0]:.1f} "
                 f"in the matrix above ({(sum(two_s) / one_s[0] - 1) * 100:+.0f}%). The profile holds "
                 "per-block costs from one process and `shared_slowdown` from processes computing at once, not "
                 "this. The schedule itself matches: a timeline of the real run (each micro-batch's submit, "
                 "finish and stage compute) follows the simulator's step for step, down to a chunk's commit "
                 "forward on stage 1 overlapping the next chunk's first step on stage 0. `plan_check` prints "
                 "stage compute per micro-batch, real and planned (`stage_compute_s` in its JSON), to tell such "
                 "cost errors from scheduling ones.\n\n")
    return "".join(lines)


def block(cmd: str, text: str) -> str:
    return f"```\n$ {cmd}\n{text}\n```\n"


def main() -> None:
    parts = []
    sdv2_cmd = f"streamgen plan --policy sdv2 --profile {H100} --gpus 1,2,4"
    sdv2_text, sdv2 = run(sdv2_cmd)
    cmds = {
        "1.3b": f"streamgen plan --model wan2.1-1.3b --profile {H100} --gpus 1,2,4,8,16 --fps 16 "
                f"--plot docs/capacity-wan2.1-1.3b.png",
        "14b": f"streamgen plan --model wan2.1-14b --profile {H100} --gpus 1,2,4,8,16 --fps 16 "
               f"--plot docs/capacity-wan2.1-14b.png",
        "1.3b-4": f"streamgen plan --model wan2.1-1.3b --profile {H100} --gpus 1,2,4,8,16 --fps 16 --steps 4",
        "h200": f"streamgen plan --model wan2.1-1.3b --profile {H200} --gpus 1,2,4,8,16 --fps 16",
    }
    got = {k: run(c) for k, c in cmds.items()}
    h100 = load_profile(os.path.join(ROOT, H100))
    h200 = load_profile(os.path.join(ROOT, H200))

    parts.append("""# Capacity: streams and FPS per GPU count

How many 480p, 16 fps streams N GPUs serve, with which layout, at what latency. The figures come from
`streamgen plan` (`workers/planner.py`): for each GPU count it simulates candidate layouts with the real
engine's scheduler on a fake clock (`workers/sim.py`), its costs from a profile (`profiles/*.json`), and
keeps the layout that serves the most streams. This page is written by `python bench/capacity.py`; every
figure below is the output of the command printed above it.

Columns: *FPS/pipe* video frames/s of one replica with its streams flat out, *FPS* all replicas, *eff*
FPS / (GPUs x FPS at 1 GPU), *streams@16* streams that each get 16 fps, *TTFF* worst time to a stream's first
frames, *p50/p99* chunk latency (dispatch of its first step to its frames) with the streams flat out,
*peak GiB/GPU* weights plus the streams' KV, cross-attention and decoder state on the fullest GPU,
*bottleneck* what stops one more stream (the busiest resource of the first load that misses 16 fps, or
memory). The grid is replicas x layer ranges per stage; every plan runs all denoising steps on each
pipeline (one step group).

""")
    parts.append("## The profile\n\n")
    parts.append(f"`{H100}` ({h100.device}). Derivation, as written in the file:\n\n> {h100.derivation}\n\n")
    parts.append(f"`{H200}` ({h200.device}), for 1.3B only. Derivation:\n\n> {h200.derivation}\n\n")

    parts.append("## StreamDiffusionV2 reproduced (1.3B, 480p, 1 step, decode included)\n\n")
    parts.append("The `sdv2` policy is StreamDiffusionV2's layout: one pipeline over all N GPUs (full weights on every "
                 "rank), one VAE decoder on the last rank, one stream (its ring keeps every rank busy).\n\n")
    parts.append(block(sdv2_cmd, sdv2_text))
    parts.append("\n| GPUs | published FPS | planned FPS | error | bottleneck |\n|---|---|---|---|---|\n")
    for row in sdv2:
        pub = SDV2_H100_480P_1STEP[row["gpus"]]
        parts.append(f"| {row['gpus']} | {pub} | {row['frames_per_s']:.2f} | "
                     f"{(row['frames_per_s'] - pub) / pub * 100:+.1f}% | {row['bottleneck']} |\n")
    parts.append("\nThe 1-GPU and 4-GPU 1-step figures (with the 1-GPU 4-step one) calibrate the profile; the 2-GPU "
                 "figure is the check. At 2 GPUs the engine keeps the split it calibrates at start (from a one-chunk "
                 "profile, where the blocks' fixed cost inflates their per-token cost against the decode's): the best "
                 "split is faster by less than its re-plan threshold (`EngineConfig.rebalance_threshold`), so it "
                 "does not move.\n\n")

    text13, rows13 = got["1.3b"]
    parts.append("## wan2.1-1.3b, 480p, 16 fps, 1 step (H100 profile)\n\n")
    parts.append(block(cmds["1.3b"], text13))
    parts.append("\n![streams and FPS against GPUs, wan2.1-1.3b](capacity-wan2.1-1.3b.png)\n\n")
    by = {r["gpus"]: r for r in rows13}
    parts.append("**Scaling efficiency of `--policy streamgen`** (FPS at N / (N x FPS at 1), same profile):\n\n")
    parts.append("| GPUs | efficiency | streams/GPU | bottleneck | StreamDiffusionV2 (published) |\n|---|---|---|---|---|\n")
    for n in (4, 8):
        r = by[n]
        sd = f"{SDV2_H100_480P_1STEP[4] / (4 * SDV2_H100_480P_1STEP[1]):.0%}" if n == 4 else "-"
        parts.append(f"| {n} | {r['efficiency']:.0%} | {r['streams'] / n:.2f} | {r['bottleneck']} | {sd} |\n")
    c13 = h100.costs("wan2.1-1.3b")
    tokens = 1560  # one latent frame at 480x832
    dit_ms = 30 * c13.block(2 * tokens) * 1000  # a 1-step stream-batch forward: context + one entry
    dec_ms = c13.vae_decode(tokens) * 1000
    goal = "meets" if by[4]["efficiency"] >= 0.85 else "misses"
    parts.append(f"\nAt 4 GPUs the plan {goal} the 85% goal. What limits it is **{by[4]['bottleneck']}**: with this "
                 f"profile one Wan VAE decode of a chunk ({dec_ms:.0f} ms) costs nearly as much as the 1-step DiT "
                 f"forward that made it ({dit_ms:.0f} ms), so the planner spends GPUs on decoders (dedicated "
                 "decode workers) and replicas rather than longer pipelines. More streams per GPU would take a cheaper decoder (the TAEHV tiny decoder, "
                 "`vae_decoder: taehv`; its cost is not in this profile), a decode batched over streams, or "
                 "decoding fewer frames per chunk; the DiT side then batches streams per micro-batch.\n\n")

    text14, _ = got["14b"]
    parts.append("## wan2.1-14b, 480p, 16 fps, 1 step (H100 profile)\n\n")
    parts.append(block(cmds["14b"], text14))
    parts.append("\n![streams and FPS against GPUs, wan2.1-14b](capacity-wan2.1-14b.png)\n\n")
    parts.append("## wan2.1-1.3b at 4 steps (H100 profile)\n\n")
    parts.append(block(cmds["1.3b-4"], got["1.3b-4"][0]) + "\n")
    parts.append("## wan2.1-1.3b on the H200 profile\n\n")
    parts.append(block(cmds["h200"], got["h200"][0]) + "\n")

    parts.append(cpu_check())
    parts.append("""## What the model does not simulate

* **Costs are linear in tokens.** A block's time is a + b x micro-batch tokens, plus `attention_s` x tokens x
  cached key tokens where the profile measured it (`profiles/cpu-2core.json`; the GPU profiles, derived from
  end-to-end figures, fold it into b). Kernel-shape effects (CUDA graphs, tile quantisation) and
  batch-size-dependent efficiency beyond the linear fit are not modelled.
* **No contention inside a GPU.** A shared decoder runs strictly after the forwards queued before it on the
  last stage's GPU (the real one overlaps on its own CUDA stream, so it may do a little better); two stages
  never share a device. On a CPU host (a profile with `cores`) the stages and decode workers slow each
  other by the measured `shared_slowdown`, in proportion to how much of a call's recent past overlapped
  the others' (mean field over a trailing window); the driver's and Ray's own CPU time, and a noisy
  neighbour's, are not counted, so a CPU plan with as many stages as cores is still somewhat optimistic.
* **Transfers are latency + bytes / bandwidth**, never contended; NCCL/gloo setup, the driver's own time
  (Python scheduling, Ray task submission beyond `call_overhead_s`) and the network between nodes are not
  modelled. Replicas are independent (no cross-replica traffic).
* **Text-to-video only.** VAE encode of video-to-video input, prompt switches (re-cache), recovery and stream
  churn are not exercised; text encode is charged once per stream.
* **Derived profiles inherit their sources.** `h100-sdv2` assumes StreamDiffusionV2's single-GPU runs are DiT
  then decode in series and that its 4-GPU run is exactly decode-bound; the 14B line is a fit through zero
  that under-predicts its 1-GPU figure (see the derivation). `h200` comes from one in-process P=1 run.
* **Memory** is `workers/devicemap.py`'s estimate (weights, KV and cross-attention caches, decoder state);
  activations and allocator fragmentation are covered only by `gpu_memory_utilization`.
* **Streams run flat out** (each consumes its outputs at once, at most stages + decode workers + 1 chunks
  ahead); latency figures are therefore under full load, not at 16 fps pacing.
""")
    with open(os.path.join(ROOT, "docs", "capacity.md"), "w") as f:
        f.write("".join(parts))
    print("wrote docs/capacity.md")


if __name__ == "__main__":
    main()
