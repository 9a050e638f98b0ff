"""The demo trainer: deterministic data, the layouts the engine's cache produces, exact resume."""

import dataclasses
from collections import Counter

import pytest
import torch

from workers.demo import train
from workers.demo.config import TrainConfig
from workers.demo.train import STEP_COUNTS, Trainer, layout, lr_at, make_batch, step_sigmas, visit_sigmas
from workers.demo.bank import LatentBank, clip_groups
from workers.demo.train_vae import PROMPTS, cell_colour, colour_distances, render_groups, vae_batch, vae_loss
from workers.config import SamplerConfig
from workers.model.demo_vae import DemoVAE
from workers.model.schedule import FlowMatchSchedule

SMALL = TrainConfig(vae_steps=2, vae_batch=2, vae_width=16, steps=3, batch=2, warmup_steps=1, eval_every_s=0,
                    checkpoint_every_s=3600, log_every_s=3600)


def test_noise_levels_are_drawn_as_the_sampler_visits_them():
    """Every chunk visits each step of its list once, so sigma = 1 (a chunk from noise) is drawn about a third of
    the time, not a sixth as a uniform pick of the distinct levels gave."""
    assert step_sigmas(4, 5.0) == pytest.approx((1.0, 0.9375, 0.833333, 0.625), abs=1e-5)
    drawn = visit_sigmas(torch.Generator().manual_seed(0), 4000, 5.0).tolist()
    engine = {round(s, 5) for n in (2, 3, 4) for s in step_sigmas(n, 5.0)}
    assert {round(s, 5) for s in drawn} == engine and len(engine) == 6
    want = sum(1 / n for n in STEP_COUNTS) / len(STEP_COUNTS)  # P(sigma = 1) = 0.30
    assert abs(drawn.count(1.0) / len(drawn) - want) < 0.03


def test_a_streams_start_is_one_clip_per_prompt():
    """Clips that hold a stream's first frame start the object at the frame's centre, so the first chunk's target
    is one clip per prompt (the few-step sampler reaches it from noise); ``centred_start=0`` puts it anywhere."""
    def starts(centred: float) -> dict[int, set[bytes]]:
        cfg = dataclasses.replace(SMALL, batch=8, first_chunk=1.0, staircase=0.0, centred_start=centred)
        trainer = Trainer(cfg, "/nonexistent/state.pt")
        bank = LatentBank.build(trainer.vae.eval())
        seen: dict[int, set[bytes]] = {}
        for step in range(6):
            b = make_batch(cfg, step, bank)
            for text, x0 in zip(b.text.tolist(), b.x0):
                seen.setdefault(text, set()).add(x0.numpy().tobytes())
        return seen

    centred, anywhere = starts(1.0), starts(0.0)
    assert any(len(v) > 0 for v in centred.values()) and all(len(v) == 1 for v in centred.values())
    assert sum(len(v) for v in anywhere.values()) > len(anywhere)  # several starts of one prompt differ


def test_layouts_mirror_the_cache():
    gen = torch.Generator().manual_seed(0)
    cfg = TrainConfig(switch=0.5)
    seen = {"sink": 0, "start": 0, "switch": 0}
    for _ in range(300):
        latents, per_latent, text, first = layout(gen, cfg)
        assert len(latents) == len(per_latent) == 12 and 0 <= first < 4
        if latents[3] != latents[2] + 1:  # [first chunk | a window after the first eviction]
            seen["sink"] += 1
            assert latents[:3] == [0, 1, 2] and latents[3] >= 6 and first >= 1
        elif latents[0] == 0:
            seen["start"] += 1
        if len(set(per_latent)) == 2:  # a switch at a chunk boundary: only blocks after it are trained
            seen["switch"] += 1
            m = per_latent.index(per_latent[-1])
            assert m % 3 == 0 and first * 3 >= m and text == per_latent[-1]
    assert min(seen.values()) > 30, seen


def test_batches_are_a_function_of_seed_and_step():
    cfg = dataclasses.replace(SMALL, batch=3)
    trainer = Trainer(cfg, "/nonexistent/state.pt")
    bank = LatentBank.build(trainer.vae.eval())
    a = make_batch(cfg, 5, bank)
    b = make_batch(cfg, 5, bank)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.sigma, b.sigma) and torch.equal(a.text, b.text)
    assert a.x0.shape == (3, 12, 8, 8, 8)
    assert not torch.equal(a.x0, make_batch(cfg, 6, bank).x0)
    assert torch.equal(a.loss_mask * (a.sigma > 0), a.loss_mask)  # only noisy frames are trained


def test_stream_starts_train_chunk_zero_from_noise_and_stream_batchs_first_ticks():
    """A stream's start has only the text: sequential's chunk 0 at each of its steps (sigma = 1 included, where
    the colour comes from the text alone), and stream_batch's tick t holding chunks 0..t at steps t..0 with the
    later blocks outside the forward (untrained)."""
    cfg = dataclasses.replace(SMALL, batch=8, first_chunk=1.0, staircase=0.0)
    trainer = Trainer(cfg, "/nonexistent/state.pt")
    bank = LatentBank.build(trainer.vae.eval())
    lists = {n: step_sigmas(n, cfg.shift) for n in (2, 3, 4)}
    ticks, block0 = Counter(), Counter()
    for step in range(30):
        b = make_batch(cfg, step, bank)
        for sigma, mask in zip(b.sigma, b.loss_mask):
            blocks, trained = sigma[::3].tolist(), int(mask[::3].sum())
            assert mask[::3].tolist() == [1.0] * trained + [0.0] * (4 - trained) and min(blocks) > 0
            block0[blocks[0]] += 1
            if trained < 4 or blocks == pytest.approx(lists[4][::-1]):
                t = trained - 1  # chunk j at step t - j of one list, the newest entering at sigma 1
                assert blocks[t] == 1.0 and any(blocks[:t + 1] == pytest.approx([lst[t - j] for j in range(t + 1)])
                                                for lst in lists.values() if len(lst) > t)
                ticks[t] += 1
    assert set(ticks) == {0, 1, 2, 3}, ticks
    assert block0[1.0] / sum(block0.values()) > 0.2  # chunk 0 from noise (was 0.06: sorted, a sixth of draws)


def test_staircase_steps_hold_what_a_stream_batch_forward_holds():
    """[clean context | n chunks in flight at the n-step sampler's sigmas, oldest cleanest]: the forward the
    engine's stream_batch mode runs at steady state (workers/stream.py), which the other layouts never give."""
    cfg = dataclasses.replace(SMALL, batch=4, staircase=0.5)
    trainer = Trainer(cfg, "/nonexistent/state.pt")
    bank = LatentBank.build(trainer.vae.eval())
    lists = {n: FlowMatchSchedule(SamplerConfig(denoising_steps=tuple(1000.0 * (n - i) / n for i in range(n)),
                                                shift=cfg.shift)).step_sigmas()[::-1] for n in (2, 3, 4)}
    stairs = 0
    seen = set()
    for step in range(40):
        b = make_batch(cfg, step, bank)
        if b.x0.shape[1] == 3 * cfg.chunks:
            continue
        stairs += 1
        assert b.x0.shape[1] == 3 * cfg.staircase_chunks
        for row in b.sigma:
            blocks = row[::3].tolist()
            assert torch.equal(row, row[::3].repeat_interleave(3))
            noisy = [s for s in blocks if s > 0]
            assert noisy == pytest.approx(lists[len(noisy)]) and blocks[-1] == 1.0  # the newest enters as noise
            assert blocks[:len(blocks) - len(noisy)] == [0.0] * (len(blocks) - len(noisy)) and len(noisy) < len(blocks)
            seen.add(len(noisy))
    assert 8 < stairs < 32 and seen == set(STEP_COUNTS)


@pytest.mark.parametrize("prompt,start", [(0, (10, 20)), (13, (62, 2)), (30, (0, 36))])
def test_the_bank_equals_rendering_and_encoding(prompt, start):
    """Circular padding: a whole-cell shift of the frames is a one-cell roll of the latents, so the 4x4 sub-cell
    positions of the bank give every group of every clip (here through an edge and across a sink gap)."""
    torch.manual_seed(prompt)
    vae = DemoVAE(z_dim=8, width=16).eval()
    bank = LatentBank.build(vae)
    latents = list(range(0, 6)) + list(range(20, 23))
    got = bank.lookup([prompt] * 9, *clip_groups(latents, [prompt] * 9, start))
    groups = render_groups(latents, [PROMPTS[prompt]] * 9, tuple(float(v) for v in start))
    with torch.no_grad():
        want = vae.normalise(vae.encode_raw(groups.flatten(1, 2)))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (got[3] - got[4]).abs().max() > 1e-3  # the object moved
    groups, start = vae_batch(0, 1, 4)
    assert groups.shape == (4, 4, 4, 3, 64, 64) and start.dtype == torch.bool


def test_the_colour_anchor_pulls_three_latent_channels_to_each_cells_mean_colour():
    groups, start = vae_batch(0, 3, 2)  # [2, 4, 4, 3, 64, 64]
    flat = groups.reshape(8, 12, 64, 64)
    cells = cell_colour(flat, 8)  # [8, 3, 8, 8]
    by_hand = groups.reshape(8, 4, 3, 8, 8, 8, 8).mean(dim=(1, 4, 6))
    assert torch.allclose(cells, by_hand, atol=1e-6)
    torch.manual_seed(0)
    vae = DemoVAE(z_dim=8, width=16)
    gen = torch.Generator()
    with torch.no_grad():
        plain = vae_loss(vae, groups, start, 0.0, gen)
        anchored = vae_loss(vae, groups, start, 0.0, gen, colour_anchor=2.0)
        want = torch.nn.functional.mse_loss(vae.encode_raw(flat)[:, :3], cells)
    assert float(anchored - plain) == pytest.approx(2.0 * float(want), rel=1e-4)
    # a VAE whose channels 0..2 are each cell's colour keeps colour pairs apart by their pixel difference
    distances = colour_distances(_ColourCells())
    assert set(distances) == {"red-green", "red-blue", "red-yellow", "green-blue", "green-yellow", "blue-yellow"}
    assert min(distances.values()) > 0.05


class _ColourCells:
    """encode: frames -> latents whose 3 channels are each 8x8 cell's colour (the anchor's target)."""

    def encode(self, frames):
        return cell_colour(DemoVAE.groups(frames), 8)


def test_lr_warms_up_then_decays_to_the_floor():
    assert lr_at(1.0, 0, 100, 10, 0.1) == pytest.approx(0.1)  # step 1 of 10 of the warm-up
    curve = [lr_at(1.0, s, 100, 10, 0.1) for s in range(9, 101)]
    assert 0.95 < curve[0] <= 1.0 and all(a >= b for a, b in zip(curve, curve[1:]))
    assert curve[-1] == pytest.approx(0.1)


def test_resume_continues_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "measure_latents", lambda vae, seed: None)  # 64 clips: not needed to compare
    straight = Trainer(SMALL, str(tmp_path / "a.pt"), log=lambda line: None)
    straight.run(str(tmp_path / "a_eval.pt"))
    assert (straight.vae_step, straight.step) == (2, 3)

    first = Trainer(SMALL, str(tmp_path / "b.pt"), log=lambda line: None)
    first.vae_train_step(), first.vae_train_step(), first.train_step()
    first.save()
    resumed = Trainer(SMALL, str(tmp_path / "b.pt"), log=lambda line: None)
    assert resumed.load() and (resumed.vae_step, resumed.step) == (2, 1)
    resumed.run(str(tmp_path / "b_eval.pt"))
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.vae.state_dict().values(), resumed.vae.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="other settings"):
        Trainer(dataclasses.replace(SMALL, steps=4), str(tmp_path / "b.pt")).load()
    assert Trainer(dataclasses.replace(SMALL, log_every_s=1.0), str(tmp_path / "b.pt")).load()  # cadence only


def test_fine_tuning_starts_from_a_checkpoints_ema_and_keeps_its_vae(tmp_path):
    base = Trainer(SMALL, str(tmp_path / "base.pt"), log=lambda line: None)
    base.vae_train_step(), base.vae_train_step(), base.train_step(), base.train_step()
    ckpt = str(tmp_path / "demo.pt")
    train.export(ckpt, base.model, base.ema, base.vae)
    tuned = Trainer(dataclasses.replace(SMALL, init=ckpt), str(tmp_path / "tuned.pt"), log=lambda line: None)
    assert (tuned.vae_step, tuned.step) == (SMALL.vae_steps, 0)  # no VAE phase; the DiT steps count afresh
    for name, value in base.ema.state_dict().items():  # the EMA as shipped (float16), not the raw weights
        assert torch.equal(tuned.model.state_dict()[name], value.half().float()), name
        assert torch.equal(tuned.ema.state_dict()[name], value.half().float()), name
    for name, value in base.vae.state_dict().items():
        assert torch.equal(tuned.vae.state_dict()[name], value), name
    vae_before = {k: v.clone() for k, v in tuned.vae.state_dict().items()}
    tuned.run(str(tmp_path / "tuned_eval.pt"))
    assert (tuned.vae_step, tuned.step) == (SMALL.vae_steps, SMALL.steps)
    assert all(torch.equal(vae_before[k], v) for k, v in tuned.vae.state_dict().items())  # the VAE is kept
    with pytest.raises(FileNotFoundError):
        Trainer(dataclasses.replace(SMALL, init=str(tmp_path / "missing.pt")), str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="width 16"):
        Trainer(dataclasses.replace(SMALL, init=ckpt, vae_width=32), str(tmp_path / "y.pt"))


def test_evaluation_prompts_spread_and_32_are_all_of_them():
    assert sorted(p.text for p in train.spread_prompts(32)) == sorted(p.text for p in train.PROMPTS)
    eight = train.spread_prompts(8)
    for attr, each in (("colour", 2), ("shape", 4), ("direction", 2)):
        counts = Counter(getattr(p, attr) for p in eight)
        assert set(counts.values()) == {each}, (attr, counts)
    assert all(len({p.direction for p in eight if p.colour == c}) == 2 for c in {p.colour for p in eight})


def test_config_is_validated():
    with pytest.raises(ValueError):
        TrainConfig(model="tiny")  # not a demo-VAE model
    with pytest.raises(ValueError):
        TrainConfig(switch=1.5)
    with pytest.raises(ValueError, match="staircase_chunks"):
        TrainConfig(staircase_chunks=4)
    assert TrainConfig(staircase=0, staircase_chunks=4).staircase_chunks == 4


def test_kill_saves_the_training_state(tmp_path):
    """SIGTERM (kill, or a job ignoring Ctrl-C in the background) leaves a resumable state, as Ctrl-C does."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    state = tmp_path / "state.pt"
    proc = subprocess.Popen([sys.executable, "-m", "workers.demo.train", "--out", str(tmp_path / "demo.pt"),
                             "--state", str(state), "--vae-width", "16", "--vae-batch", "1", "--log-every-s", "0.01",
                             "--checkpoint-every-s", "3600"], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[4])
    try:
        for line in proc.stdout:
            if line.startswith("[vae] step"):
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert state.is_file()
    resumed = Trainer(TrainConfig(vae_width=16, vae_batch=1), str(state))
    assert resumed.load() and resumed.vae_step >= 1
