"""Train the demo model on synthetic clips (``make train-demo``): CPU, resumable.

    python -m workers.demo.train --out out/train-demo/demo.pt --state out/train-demo/state.pt [--steps N ...]

Phase 1 trains the demo VAE (``train_vae.py``); its latents of every clip group are then encoded once
(``bank.py``). Phase 2 is plain flow matching of the causal DiT with per-chunk noise levels (diffusion
forcing) and clean context, through the model's own block-causal full-sequence forward, so what is trained is
what the engine's streaming forward computes chunk by chunk with a KV cache. The loss is on x0 = x_t - sigma v,
the quantity the engine's few-step sampler uses at every step; the weights start adaLN-Zero and an EMA of them
is kept. Layouts and noise patterns are described on ``TrainConfig``; every field is also a flag.

Progress: a line every ``log_every_s`` (step, loss, clips/s, elapsed, ETA), a quick evaluation every
``eval_every_s`` (EMA weights, the engine's 4-step sampler in both modes through the single-process reference,
the quality detector). The training state is saved every ``checkpoint_every_s`` and on exit; a rerun resumes
from it.
The product is a Self-Forcing-style file: ``generator`` and ``generator_ema`` (keys prefixed ``model.``), plus
the VAE under ``vae``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import signal
import sys
import time

import torch

from workers.config import GenerationConfig, SamplerConfig, get_config
from workers.demo import clips
from workers.demo.config import TrainConfig
from workers.demo.bank import GRID, LatentBank, clip_groups
from workers.demo.train_vae import colour_distances, measure_latents, psnr, reconstruct, vae_batch, vae_loss
from workers.model.demo_vae import T_UP, DemoVAE, load_demo_vae
from workers.loader import load_weights
from workers.model.dit import CausalWanModel
from workers.model.schedule import FlowMatchSchedule
from workers.model.text import build_text_encoder

PROMPTS = clips.all_prompts()
CADENCE = {"threads", "checkpoint_every_s", "log_every_s", "eval_every_s", "eval_prompts", "eval_frames"}
"""TrainConfig fields a resumed run may change: they do not change what is trained."""


STREAM_START = (clips.SIZE // 2, clips.SIZE // 2)
"""Where a stream's object is at frame 0 (``TrainConfig.centred_start``): the frame's centre."""
STEP_COUNTS = (2, 3, 3, 4, 4, 4, 4, 4)
"""Sampler step counts the noise levels are drawn for, uniformly from this list: the default 4 most often."""


@functools.lru_cache(maxsize=None)
def step_sigmas(n: int, shift: float) -> tuple[float, ...]:
    """The sigmas the engine's sampler visits with n evenly spaced steps (as ``steps`` requests ask), descending."""
    steps = tuple(1000.0 * (n - i) / n for i in range(n))
    return tuple(FlowMatchSchedule(SamplerConfig(denoising_steps=steps, shift=shift)).step_sigmas())


def step_count(gen: torch.Generator) -> int:
    """A sampler step count drawn from ``STEP_COUNTS``."""
    return STEP_COUNTS[int(torch.randint(len(STEP_COUNTS), (), generator=gen))]


def visit_sigmas(gen: torch.Generator, k: int, shift: float) -> torch.Tensor:
    """k noise levels [k], each drawn as the engine's sampler visits them: a step count, then one of its steps
    uniformly (every chunk visits each step of its list once, so sigma = 1 is about a third of the visits)."""
    levels = []
    for _ in range(k):
        sigmas = step_sigmas(step_count(gen), shift)
        levels.append(sigmas[int(torch.randint(len(sigmas), (), generator=gen))])
    return torch.tensor(levels, dtype=torch.float32)


@dataclasses.dataclass
class Batch:
    x0: torch.Tensor
    """Clean normalised latents [B, F, z, h, w]."""
    sigma: torch.Tensor
    """Per-frame noise level [B, F] (0: clean context)."""
    text: torch.Tensor
    """Prompt index [B] into PROMPTS: the text the whole clip is conditioned on."""
    loss_mask: torch.Tensor
    """[B, F] 1 where the frame's block is trained (noisy, and part of the forward it stands for)."""


def place(gen: torch.Generator, cfg: TrainConfig, chunks: int) -> tuple[list[int], bool]:
    """Global latent indices [chunks * chunk_frames] of one clip: contiguous from the stream's start or later
    (cache policy none), or [first chunk | a window after the first eviction] (the sink); and whether it is
    the sink layout."""
    f, n = cfg.chunk_frames, chunks * cfg.chunk_frames
    wrap = clips.frames_per_wrap() // 4 + 1  # latent frames per crossing of the frame
    if float(torch.rand((), generator=gen)) < cfg.sink_layout:
        w0 = int(torch.randint(2 * f, 2 * f + 2 * wrap, (), generator=gen))
        return list(range(f)) + list(range(w0, w0 + n - f)), True
    g0 = 0 if float(torch.rand((), generator=gen)) < cfg.stream_start else \
        int(torch.randint(1, 1 + 4 * wrap, (), generator=gen))
    return list(range(g0, g0 + n)), False


def layout(gen: torch.Generator, cfg: TrainConfig) -> tuple[list[int], list[int], int, int]:
    """One clip: its global latent indices [F], the prompt of each, the text prompt and the first noisy block."""
    n = cfg.chunks * cfg.chunk_frames
    if float(torch.rand((), generator=gen)) < cfg.first_chunk:  # the stream's first chunk: text is all it has
        a = int(torch.randint(len(PROMPTS), (), generator=gen))
        return list(range(n)), [a] * n, a, 0
    latents, sink = place(gen, cfg, cfg.chunks)
    a = int(torch.randint(len(PROMPTS), (), generator=gen))
    first = int(torch.randint(1 if sink else 0, cfg.chunks, (), generator=gen))
    if float(torch.rand((), generator=gen)) < cfg.switch:
        b = (a + int(torch.randint(1, len(PROMPTS), (), generator=gen))) % len(PROMPTS)
        m = int(torch.randint(1, cfg.chunks, (), generator=gen))  # first block under the new prompt
        first = max(first, m)  # blocks before the switch show the old prompt: context only
        return latents, [a] * (m * cfg.chunk_frames) + [b] * (n - m * cfg.chunk_frames), b, first
    return latents, [a] * n, a, first


def staircase_levels(gen: torch.Generator, shift: float) -> torch.Tensor:
    """The noise levels of the n chunks a stream_batch forward carries, oldest first: [sigma_{n-1} .. sigma_0]
    of an evenly spaced n-step list (ascending; the newest chunk is pure noise)."""
    return torch.tensor(step_sigmas(step_count(gen), shift)[::-1], dtype=torch.float32)


def start_levels(gen: torch.Generator, cfg: TrainConfig) -> tuple[torch.Tensor, int]:
    """A stream's start without context, per block [chunks], and how many blocks are trained. Sequential: every
    block at its own visited level (block 0, alone in its causal view, is chunk 0 at any of its steps).
    Stream_batch's first ticks (``start_staircase``): tick t of an n-step list holds chunks 0..t, chunk j at
    step t - j; the blocks after t are not part of that forward (noise, untrained)."""
    if float(torch.rand((), generator=gen)) >= cfg.start_staircase:
        return visit_sigmas(gen, cfg.chunks, cfg.shift), cfg.chunks
    sigmas = step_sigmas(step_count(gen), cfg.shift)
    t = int(torch.randint(min(len(sigmas), cfg.chunks), (), generator=gen))
    levels = torch.ones(cfg.chunks)
    levels[:t + 1] = torch.tensor([sigmas[t - j] for j in range(t + 1)])
    return levels, t + 1


def make_batch(cfg: TrainConfig, step: int, bank: LatentBank) -> Batch:
    """The batch of ``step``: a pure function of (seed, step) and the bank, so a resumed run sees the same data.
    A ``staircase`` share of the steps are stream_batch forwards (``staircase_chunks`` blocks each), the rest
    ``chunks``-block clips with per-block noise levels."""
    gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) % (2**63 - 1))
    f = cfg.chunk_frames
    stair = float(torch.rand((), generator=gen)) < cfg.staircase
    chunks = cfg.staircase_chunks if stair else cfg.chunks
    x0, sig, texts, masks = [], [], [], []
    for _ in range(cfg.batch):
        if stair:  # [clean context | in flight, oldest first]; one prompt (a switch re-caches first)
            latents, _ = place(gen, cfg, chunks)
            text = int(torch.randint(len(PROMPTS), (), generator=gen))
            per_latent = [text] * len(latents)
            levels = staircase_levels(gen, cfg.shift)
            first = chunks - len(levels)
        else:
            latents, per_latent, text, first = layout(gen, cfg)
        start = tuple((torch.randint(clips.SIZE // GRID, (2,), generator=gen) * GRID).tolist())
        if latents[0] == 0 and float(torch.rand((), generator=gen)) < cfg.centred_start:
            start = STREAM_START
        x0.append(bank.lookup(per_latent, *clip_groups(latents, per_latent, start)))  # [F, z, h, w]
        trained = chunks - first  # blocks in the loss (a stream_batch start tick leaves its later ones out)
        if not stair and first == 0 and latents[0] == 0:  # the stream's start: text is all it has
            levels, trained = start_levels(gen, cfg)
        elif not stair:
            noisy = chunks - first
            if float(torch.rand((), generator=gen)) < cfg.sampler_sigmas:
                levels = visit_sigmas(gen, noisy, cfg.shift)
            else:
                u = torch.rand(noisy, generator=gen)
                levels = cfg.shift * u / (1 + (cfg.shift - 1) * u)
            if float(torch.rand((), generator=gen)) < cfg.sorted_noise:
                levels = levels.sort().values
        block_sigma = torch.cat((torch.zeros(first), levels))  # [chunks]
        mask = torch.zeros(chunks)
        mask[first:first + trained] = 1.0
        sig.append(block_sigma.repeat_interleave(f))
        masks.append(mask.repeat_interleave(f))
        texts.append(text)
    return Batch(torch.stack(x0), torch.stack(sig), torch.tensor(texts), torch.stack(masks))


def lr_at(peak: float, step: int, steps: int, warmup: int, floor: float) -> float:
    """Linear warm-up, then cosine decay from ``peak`` to ``peak * floor`` at ``steps``."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    cos = 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    return peak * warm * (floor + (1 - floor) * cos)


def loss_fn(model: CausalWanModel, batch: Batch, context: torch.Tensor, noise: torch.Tensor,
            chunk_frames: int) -> torch.Tensor:
    """Mean x0 error of the noisy blocks. context [32, L, text_dim]; noise like batch.x0."""
    s = batch.sigma[:, :, None, None, None]  # [B, F, 1, 1, 1]
    x_t = (1 - s) * batch.x0 + s * noise  # [B, F, z, h, w]
    flow = model(x_t.transpose(1, 2), 1000.0 * batch.sigma, context[batch.text], frames_per_block=chunk_frames)
    x0 = x_t - s * flow.transpose(1, 2)  # [B, F, z, h, w]
    per_frame = (x0 - batch.x0).pow(2).mean(dim=(2, 3, 4))  # [B, F]
    return (per_frame * batch.loss_mask).sum() / batch.loss_mask.sum()


def export(path: str, model: CausalWanModel, ema: CausalWanModel, vae: DemoVAE) -> int:
    """The shipped file: Self-Forcing layout (``generator``, ``generator_ema``; keys ``model.``-prefixed, float16:
    the loader casts them to the model's dtype) plus the VAE (``vae``, float32, and ``vae_config``)."""
    def half(m: CausalWanModel) -> dict[str, torch.Tensor]:
        return {f"model.{k}": v.detach().to(torch.float16).clone() for k, v in m.state_dict().items()}

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"generator": half(model), "generator_ema": half(ema),
                "vae": {k: v.detach().clone() for k, v in vae.state_dict().items()},
                "vae_config": {"z_dim": vae.z_dim, "width": vae.width}}, tmp)
    os.replace(tmp, path)
    return os.path.getsize(path)


def spread_prompts(n: int) -> list[clips.Prompt]:
    """``n`` prompts spread over colours, shapes and directions: for 8, each colour twice, each shape four
    times, each direction twice, no colour always with one direction; for 32, every prompt once."""
    colours, shapes, directions = list(clips.COLOURS), clips.SHAPES, list(clips.DIRECTIONS)
    rounds = len(shapes) * len(directions)  # k: which round of one prompt per colour
    chosen = []
    for i in range(n):
        c, k = i % len(colours), (i // len(colours)) % rounds
        d = (c + k // len(shapes) + k) % len(directions)  # each (colour, shape) meets every direction once
        chosen.append(clips.Prompt(colours[c], shapes[k % len(shapes)], directions[d]))
    return chosen


@torch.no_grad()
def evaluate(path: str, model_name: str, chunk_frames: int, prompts: int, frames: int,
             mode: str = "sequential") -> dict:
    """The checkpoint at ``path`` (EMA weights, through the real loader) with the engine's default 4-step sampler
    in ``mode`` in the single-process reference, on ``prompts`` prompts spread over colours, shapes and
    directions, one seed each, judged by the quality detector."""
    from workers.demo.detect import assess
    from workers.reference import ReferenceGenerator

    gen_cfg = GenerationConfig(model=get_config(model_name), model_path=path, use_ema=True,
                               sampler=SamplerConfig(chunk_frames=chunk_frames, mode=mode))
    ref = ReferenceGenerator(gen_cfg)
    chosen = spread_prompts(prompts)
    n_chunks = math.ceil((frames - 1) / (T_UP * chunk_frames)) + 1
    colour = direction = visible = 0.0
    for i, p in enumerate(chosen):
        q = assess(ref.generate(p.text, seed=10_000 + i, n_chunks=n_chunks)[:frames])
        colour += q.colour == p.colour
        direction += q.direction == p.direction
        visible += q.visibility
    return {"colour": colour / prompts, "direction": direction / prompts, "visibility": visible / prompts}


@torch.no_grad()
def adaln_zero(model: CausalWanModel) -> None:
    """DiT's adaLN-Zero start: every block's modulation (shift, scale, gate) and the head's output begin at zero,
    so each block starts as the identity and the model as v = 0; it trains faster than the seeded init."""
    model.time_projection[1].weight.zero_()
    model.time_projection[1].bias.zero_()
    for block in model.blocks.values():
        block.modulation.zero_()
    model.head.modulation.zero_()
    model.head.head.weight.zero_()
    model.head.head.bias.zero_()


class Trainer:
    """Both phases with one resumable state file; ``run`` continues wherever the state left off."""

    def __init__(self, cfg: TrainConfig, state_path: str, log=print, set_threads: bool = False):
        """``set_threads``: ``run`` sets torch's (process-wide) thread count per phase from ``cfg.threads``."""
        self.cfg, self.state_path, self.log, self.set_threads = cfg, state_path, log, set_threads
        torch.manual_seed(cfg.seed)
        model_cfg = dataclasses.replace(get_config(cfg.model), weights="", init_seed=cfg.seed)
        self.vae = DemoVAE(z_dim=model_cfg.in_channels, width=cfg.vae_width)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        self.model = CausalWanModel(model_cfg).train()
        adaln_zero(self.model)
        self.ema = CausalWanModel(model_cfg).eval().requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(0.9, 0.99))
        encoder = build_text_encoder(get_config(cfg.model))  # as served: its hash seed is the config's
        self.context = torch.stack([encoder(p.text) for p in PROMPTS])  # [32, L, text_dim]
        self.bank: LatentBank | None = None  # built once the VAE is trained
        self.vae_step = self.step = 0
        if cfg.init:
            self._start_from(cfg.init)
        self.elapsed = 0.0  # seconds of training over all runs (resumes included)
        self.loss_avg: float | None = None
        self.history: list[dict] = []

    def _start_from(self, path: str) -> None:
        """Fine-tuning: the DiT (and its EMA) from ``path``'s EMA weights through the real loader, its VAE as
        it is; the VAE phase counts as done."""
        load_weights(self.model, path, use_ema=True)
        self.ema.load_state_dict(self.model.state_dict())
        vae = load_demo_vae(path, self.vae.z_dim)
        if vae.width != self.vae.width:
            raise ValueError(f"{path}: its VAE has width {vae.width}, the config {self.vae.width} (--vae-width)")
        self.vae.load_state_dict(vae.state_dict())
        self.vae_step = self.cfg.vae_steps

    # state ------------------------------------------------------------------------------------------

    def load(self) -> bool:
        if not os.path.isfile(self.state_path):
            return False
        state = torch.load(self.state_path, map_location="cpu", weights_only=False)
        changed = {k for k, v in dataclasses.asdict(self.cfg).items() if state["config"].get(k) != v} - CADENCE
        if changed:
            raise ValueError(f"{self.state_path} was trained with other settings ({sorted(changed)}): "
                             "pass --fresh to start over")
        for name in ("vae", "vae_opt", "model", "ema", "opt"):
            getattr(self, name).load_state_dict(state[name])
        for name in ("vae_step", "step", "elapsed", "loss_avg", "history"):
            setattr(self, name, state[name])
        return True

    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.state_path)), exist_ok=True)
        state = {name: getattr(self, name).state_dict() for name in ("vae", "vae_opt", "model", "ema", "opt")}
        state.update({name: getattr(self, name) for name in ("vae_step", "step", "elapsed", "loss_avg", "history")})
        state["config"] = dataclasses.asdict(self.cfg)
        tmp = self.state_path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.state_path)

    # phases -----------------------------------------------------------------------------------------

    def vae_train_step(self) -> float:
        cfg = self.cfg
        groups, start = vae_batch(cfg.seed, self.vae_step, cfg.vae_batch)
        gen = torch.Generator().manual_seed((cfg.seed * 31 + self.vae_step) % (2**63 - 1))
        for group in self.vae_opt.param_groups:
            group["lr"] = lr_at(cfg.vae_lr, self.vae_step, cfg.vae_steps, 50, 0.1)
        loss = vae_loss(self.vae, groups, start, cfg.vae_noise, gen, cfg.vae_colour_anchor)
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), cfg.grad_clip)
        self.vae_opt.step()
        self.vae_step += 1
        if self.vae_step == cfg.vae_steps:  # the DiT trains on normalised latents of the final VAE
            measure_latents(self.vae, cfg.seed)
        return loss.item()

    def train_step(self) -> float:
        cfg = self.cfg
        if self.bank is None:
            self.bank = LatentBank.build(self.vae.eval())
        batch = make_batch(cfg, self.step, self.bank)
        gen = torch.Generator().manual_seed((cfg.seed * 7_919 + self.step * 104_729 + 1) % (2**63 - 1))
        noise = torch.randn(batch.x0.shape, generator=gen)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(cfg.lr, self.step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        loss = loss_fn(self.model, batch, self.context, noise, cfg.chunk_frames)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1 - decay)
        self.step += 1
        return loss.item()

    def run(self, eval_path: str) -> None:
        """Phase 1 up to ``vae_steps``, then phase 2 up to ``steps``; progress lines, periodic saves and evals."""
        cfg = self.cfg
        if self.vae_step < cfg.vae_steps:
            if self.set_threads:
                torch.set_num_threads(cfg.threads or 1)  # more threads slow its small convolutions down here
            self.vae.train()
            self._loop("vae", lambda: self.vae_step, cfg.vae_steps, cfg.vae_batch, self.vae_train_step, None)
            self.vae.eval()
            self.report_vae()
            self.loss_avg = None
        self.vae.eval().requires_grad_(False)
        if self.set_threads:
            torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
        self._loop("dit", lambda: self.step, cfg.steps, cfg.batch, self.train_step,
                   (lambda: self.report_eval(eval_path)) if cfg.eval_every_s else None)

    def _loop(self, phase: str, done, total: int, batch: int, step_fn, evaluate_fn) -> None:
        cfg = self.cfg
        first, t0 = done(), time.monotonic()
        last_log = last_ckpt = last_eval = t0
        base_elapsed = self.elapsed
        try:
            while done() < total:
                loss = step_fn()
                self.loss_avg = loss if self.loss_avg is None else 0.98 * self.loss_avg + 0.02 * loss
                now = time.monotonic()
                self.elapsed = base_elapsed + (now - t0)
                if now - last_log >= cfg.log_every_s or done() == total:
                    last_log = now
                    rate = (done() - first) / max(now - t0, 1e-9)
                    self.log(f"[{phase}] step {done()}/{total}  loss {loss:.4f} (avg {self.loss_avg:.4f})  "
                             f"{rate * batch:.1f} clips/s  elapsed {_hms(self.elapsed)}  "
                             f"phase eta {_hms((total - done()) / max(rate, 1e-9))}")
                if now - last_ckpt >= cfg.checkpoint_every_s:
                    last_ckpt = now
                    self.save()
                    self.log(f"[{phase}] saved training state at step {done()} to {self.state_path}")
                if evaluate_fn and now - last_eval >= cfg.eval_every_s and done() < total:
                    evaluate_fn()
                    last_eval = time.monotonic()
        finally:
            self.save()

    def report_vae(self) -> dict:
        """The VAE alone on the 32 prompts: the detector on encode -> streaming decode of each clip."""
        from workers.demo.detect import assess

        colour = direction = score = 0.0
        for i, p in enumerate(PROMPTS):
            video = clips.clip(p, 20_000 + i, 49)
            recon = reconstruct(self.vae, video)
            q = assess(clips.to_uint8(recon))
            colour, direction = colour + (q.colour == p.colour), direction + (q.direction == p.direction)
            score += psnr(recon, video)
        distances = colour_distances(self.vae)
        closest = min(distances, key=distances.get)
        result = {"phase": "vae", "colour": colour / 32, "direction": direction / 32, "psnr_db": score / 32,
                  "colour_distances": distances}
        self.history.append(result)
        self.log(f"[vae] reconstructions of 32 clips x 49 frames: colour {result['colour']:.0%}  direction "
                 f"{result['direction']:.0%}  PSNR {result['psnr_db']:.1f} dB; latent distance between colours "
                 f"(RMS) {min(distances.values()):.2f} ({closest}) .. {max(distances.values()):.2f}")
        return result

    def report_eval(self, path: str, prompts: int | None = None) -> dict:
        started = time.monotonic()
        export(path, self.model, self.ema, self.vae)
        cfg = self.cfg
        prompts = prompts or cfg.eval_prompts
        result = {"step": self.step}
        for mode in ("sequential", "stream_batch"):
            result[mode] = got = evaluate(path, cfg.model, cfg.chunk_frames, prompts, cfg.eval_frames, mode)
            self.log(f"[dit] eval at step {self.step} (EMA, 4-step {mode}, {prompts} prompts x {cfg.eval_frames} "
                     f"frames): colour {got['colour']:.0%}  direction {got['direction']:.0%}  "
                     f"visibility {got['visibility']:.0%}  ({time.monotonic() - started:.0f} s)")
        self.history.append(result)
        return result


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/train-demo/demo.pt", help="the exported checkpoint")
    parser.add_argument("--state", default="out/train-demo/state.pt", help="resumable training state")
    parser.add_argument("--fresh", action="store_true", help="ignore a saved state and start over")
    for field in dataclasses.fields(TrainConfig):
        kind = type(field.default)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None,
                            help=f"{TrainConfig.__pydantic_fields__[field.name].description} (default {field.default})")
    args = parser.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    cfg = TrainConfig(**given)
    log = lambda line: print(line, flush=True)  # noqa: E731
    # kill (SIGTERM) saves the state like Ctrl-C does (a background job ignores SIGINT): the loops save in finally
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    trainer = Trainer(cfg, args.state, log, set_threads=True)
    if args.fresh and os.path.exists(args.state):
        os.remove(args.state)
    resumed = trainer.load()
    params = sum(p.numel() for p in trainer.model.parameters())
    start = f"fine-tuning {cfg.init}" if cfg.init else "from scratch"
    log(f"{'resuming (VAE step %d, DiT step %d)' % (trainer.vae_step, trainer.step) if resumed else start}: "
        f"model {cfg.model} ({params / 1e6:.2f} M parameters), VAE {cfg.vae_steps} steps x {cfg.vae_batch} clips, "
        f"DiT {cfg.steps} steps x {cfg.batch} clips of {cfg.chunks} x {cfg.chunk_frames} latent frames "
        f"({cfg.staircase:.0%} stream_batch staircases of {cfg.staircase_chunks}), "
        f"threads {cfg.threads or 'VAE 1, DiT all cores'}")
    trainer.run(args.out)
    final = trainer.report_eval(args.out, prompts=len(PROMPTS))
    figures = "; ".join(f"{mode} colour {r['colour']:.0%} direction {r['direction']:.0%} visibility "
                        f"{r['visibility']:.0%}" for mode, r in final.items() if mode != "step")
    log(f"done: {_hms(trainer.elapsed)} of training; final DiT loss (avg) {trainer.loss_avg:.4f}; EMA eval "
        f"{figures}; wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
