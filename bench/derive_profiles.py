"""Writes the derived profiles: ``profiles/h100-sdv2.json`` from StreamDiffusionV2's published FPS
(REFERENCE §1.8) and ``profiles/h200.json`` from the recorded H200 engine run
(bench/results/h200-2026-11-26/gpu_engine.json). Each file's ``derivation`` holds the arithmetic.

    python bench/derive_profiles.py

Shapes: 480x832 -> 30x52 latent patches = 1560 tokens per latent frame; one latent frame (4 video frames) per
chunk; a stream-batch forward with s steps holds s + 1 frames (the context entry and one per step).
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.realpath(p or os.curdir) != HERE]

from workers.costs import Linear, ModelCosts, Profile, dump_profile  # noqa: E402

TOKENS = 1560  # per latent frame at 480x832
VIDEO_FRAMES_PER_CHUNK = 4
SDV2 = {  # REFERENCE §1.8 Tables A and B: model -> {(gpus, steps): FPS}, H100, 480p
    "wan2.1-1.3b": {(1, 1): 20.47, (1, 4): 13.95, (2, 1): 39.77, (4, 1): 44.38},
    "wan2.1-14b": {(1, 1): 12.68, (1, 4): 5.28},
}


def forward_tokens(steps: int) -> int:
    return (steps + 1) * TOKENS


def chunk_s(fps: float) -> float:
    return VIDEO_FRAMES_PER_CHUNK / fps


def two_point(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
    b = (y2 - y1) / (x2 - x1)
    return y1 - b * x1, b


def h100_sdv2() -> Profile:
    p13 = SDV2["wan2.1-1.3b"]
    decode = chunk_s(p13[(4, 1)])  # 4 GPUs, 1 step: capped by the one decoder on the last rank
    dit1 = chunk_s(p13[(1, 1)]) - decode  # 1 GPU: one forward then the chunk's decode, serial
    dit4 = chunk_s(p13[(1, 4)]) - decode
    a, b = two_point(forward_tokens(1), dit1, forward_tokens(4), dit4)
    p14 = SDV2["wan2.1-14b"]
    y1, y2 = chunk_s(p14[(1, 1)]) - decode, chunk_s(p14[(1, 4)]) - decode
    x1, x2 = forward_tokens(1), forward_tokens(4)
    a14, b14 = two_point(x1, y1, x2, y2)
    b14_origin = (x1 * y1 + x2 * y2) / (x1 * x1 + x2 * x2)  # the two-point intercept is negative: fit through 0
    derivation = (
        f"StreamDiffusionV2 (REFERENCE 1.8), H100, 480p, stream batch, 1 latent frame (4 video frames) per chunk. "
        f"Decode: the 4-GPU 1-step run is capped by one VAE decoder on the last rank, so decode = 4/{p13[(4, 1)]} = "
        f"{decode * 1000:.2f} ms per chunk = b x {TOKENS} tokens. 1.3B DiT per forward: 1 GPU runs forward then "
        f"decode serially, so DiT(1 step, {forward_tokens(1)} tokens) = 4/{p13[(1, 1)]} - decode = {dit1 * 1000:.2f} ms "
        f"and DiT(4 steps, {forward_tokens(4)} tokens) = 4/{p13[(1, 4)]} - decode = {dit4 * 1000:.2f} ms; the line "
        f"through them is {a * 1000:.3f} ms + {b * 1e6:.4f} us/token, split evenly over 30 blocks (embed and head "
        f"folded in). 2-GPU {p13[(2, 1)]} FPS is not used: it is the check. 14B: the same from Table B 1 GPU "
        f"({p14[(1, 1)]} and {p14[(1, 4)]} FPS) gives a negative intercept ({a14 * 1000:.1f} ms), so the fit is "
        f"through 0: {b14_origin * 1e6:.4f} us/token over 40 blocks (1 GPU 1 step predicted "
        f"{VIDEO_FRAMES_PER_CHUNK / (b14_origin * x1 + decode):.2f} FPS vs {p14[(1, 1)]}). Transfer: the paper's "
        f"2-6 ms per forward -> 2 ms + NVLink-class 100 GB/s. Text encode: not published, 0. Memory: H100 80 GB.")
    return Profile(
        name="h100-sdv2", device="NVIDIA H100 80GB (derived from published figures)", derivation=derivation,
        command="python bench/derive_profiles.py", dtype="bfloat16", gpu_memory_gib=80.0,
        transfer_bytes_per_s=100e9, transfer_latency_s=0.002, call_overhead_s=0.0,
        models={
            "wan2.1-1.3b": ModelCosts(block=Linear(a / 30, b / 30), vae_decode=Linear(0.0, decode / TOKENS)),
            "wan2.1-14b": ModelCosts(block=Linear(0.0, b14_origin / 40), vae_decode=Linear(0.0, decode / TOKENS)),
        })


def h200(path: str) -> Profile:
    with open(path) as f:
        rows = json.load(f)

    def fps(steps: int, decode: bool) -> float:
        got = [r["fps"] for r in rows if r["steps"] == steps and r["decode"] == decode and r["kernels"] == "auto"]
        if not got:
            raise ValueError(f"{path} has no auto-kernel row for steps={steps} decode={decode}")
        return got[0]

    dit1, dit4 = chunk_s(fps(1, False)), chunk_s(fps(4, False))
    a, b = two_point(forward_tokens(1), dit1, forward_tokens(4), dit4)
    dec1, dec4 = chunk_s(fps(1, True)) - dit1, chunk_s(fps(4, True)) - dit4
    decode = (dec1 + dec4) / 2
    derivation = (
        f"bench/results/h200-2026-11-26/gpu_engine.json (bench/gpu_engine.py at commit 56452ec): one H200, "
        f"wan2.1-1.3b 480x832, bf16, random weights, in-process engine, P=1, stream batch, 1 latent frame per chunk, "
        f"Triton kernels (auto). DiT only: {fps(1, False):.2f} FPS at 1 step ({forward_tokens(1)} tokens per forward) "
        f"and {fps(4, False):.2f} at 4 steps ({forward_tokens(4)} tokens) -> {dit1 * 1000:.2f} and {dit4 * 1000:.2f} ms "
        f"per forward; the line through them, {a * 1000:.3f} ms + {b * 1e6:.4f} us/token, split evenly over 30 blocks "
        f"(embed and head folded in). Wan VAE decode: FPS with decode minus DiT only gives {dec1 * 1000:.1f} ms (1 "
        f"step) and {dec4 * 1000:.1f} ms (4 steps) per chunk; their mean, {decode * 1000:.1f} ms, is used (+-"
        f"{abs(dec1 - dec4) / 2 * 1000:.0f} ms). No 14B run, no multi-GPU run: transfer assumed NVLink-class (2 ms + "
        f"100 GB/s, as h100-sdv2). Text encode not measured: 0. Memory: 143771 MiB.")
    return Profile(
        name="h200", device="NVIDIA H200 (143771 MiB), torch 2.11.0+cu130", derivation=derivation,
        command="python bench/derive_profiles.py", dtype="bfloat16", gpu_memory_gib=143771 / 1024,
        transfer_bytes_per_s=100e9, transfer_latency_s=0.002,
        models={"wan2.1-1.3b": ModelCosts(block=Linear(a / 30, b / 30), vae_decode=Linear(0.0, decode / TOKENS))})


def main() -> None:
    out = os.path.join(ROOT, "profiles")
    os.makedirs(out, exist_ok=True)
    for profile in (h100_sdv2(), h200(os.path.join(HERE, "results", "h200-2026-11-26", "gpu_engine.json"))):
        path = os.path.join(out, f"{profile.name}.json")
        with open(path, "w") as f:
            json.dump(dump_profile(profile), f, indent=1)
            f.write("\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
