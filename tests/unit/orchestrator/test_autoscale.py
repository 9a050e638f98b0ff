"""Autoscaling policy with a fake clock."""

from orchestrator.clock import FakeClock
from orchestrator.config import AutoscalingConfig
from orchestrator.autoscale import AutoscalePolicy

CFG = AutoscalingConfig(min_replicas=1, max_replicas=2, target_utilisation=0.5, upscale_delay_s=2,
                        downscale_delay_s=10)


def test_scales_up_after_sustained_load_or_a_refusal():
    clock, policy = FakeClock(), AutoscalePolicy(CFG)
    assert policy.decide(clock.now(), [0.3]).delta == 0
    assert policy.decide(clock.now(), [0.75]).delta == 0  # above target, not for long enough yet
    clock.advance(1.0)
    assert policy.decide(clock.now(), [0.75]).delta == 0
    clock.advance(1.5)
    assert policy.decide(clock.now(), [0.75]).delta == +1
    assert policy.decide(clock.now(), [0.75], starting=1).delta == 0  # one is being built
    fresh = AutoscalePolicy(CFG)
    assert fresh.decide(clock.now(), [0.4], refused=True).delta == +1  # a capacity refusal: at once
    assert fresh.decide(clock.now(), [0.9, 0.9], refused=True).delta == 0  # at max


def test_scales_down_after_sustained_low_load_draining_the_least_loaded():
    clock, policy = FakeClock(), AutoscalePolicy(CFG)
    assert policy.decide(clock.now(), [0.25, 0.0]).delta == 0
    clock.advance(9.0)
    assert policy.decide(clock.now(), [0.25, 0.0]).delta == 0
    clock.advance(1.5)
    d = policy.decide(clock.now(), [0.25, 0.0])
    assert d.delta == -1 and d.drain == 1
    assert policy.decide(clock.now(), [0.25]).delta == 0  # never below min


def test_load_spike_resets_the_downscale_timer_and_min_is_restored():
    clock, policy = FakeClock(), AutoscalePolicy(CFG)
    policy.decide(clock.now(), [0.1, 0.1])
    clock.advance(8)
    policy.decide(clock.now(), [0.5, 0.4])  # busy again
    clock.advance(3)
    assert policy.decide(clock.now(), [0.1, 0.1]).delta == 0  # the timer restarted
    assert AutoscalePolicy(CFG).decide(clock.now(), []).delta == +1
