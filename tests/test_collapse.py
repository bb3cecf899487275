"""The collapse alarm fires on a collapsed layer after warm-up, stays quiet on a healthy one, and clears."""

from __future__ import annotations

import logging

import pytest

from pipeline.telemetry.collapse import CollapseAlarm


def test_alarm_fires_after_warmup_and_clears(caplog: pytest.LogCaptureFixture) -> None:
    alarm = CollapseAlarm(threshold=0.35, warmup=10)
    with caplog.at_level(logging.WARNING):
        for _ in range(9):
            assert not alarm.update(0, 0.1)  # a fresh layer: quiet during warm-up
            assert not alarm.update(1, 0.95)
        assert alarm.update(0, 0.1) and not alarm.update(1, 0.95)
        assert alarm.status() == "COLLAPSE L1"
        assert "layer 1 is collapsing" in caplog.text and "layer 2" not in caplog.text
        for _ in range(100):
            alarm.update(0, 0.9)
    assert not alarm.collapsed and alarm.status() == ""
    assert "layer 1 recovered" in caplog.text
    assert caplog.text.count("collapsing") == 1  # warned once, not on every micro-batch


def test_a_layer_that_climbs_from_its_random_init_is_not_collapsing(caplog: pytest.LogCaptureFixture) -> None:
    """Spread starts low from a random init and rises while the layer learns (the main job's layers pass
    0.35 after 100-150 micro-batches): no alarm while it climbs; one when it stalls below the threshold."""
    alarm = CollapseAlarm(threshold=0.35, warmup=100)
    with caplog.at_level(logging.WARNING):
        for m in range(150):
            assert not alarm.update(0, 0.2 + 0.15 * m / 150), m  # 0.20 -> 0.35 over 150 micro-batches
        for _ in range(150):
            alarm.update(1, 0.3)  # flat below the threshold: collapsed (slowness + variance ended so)
    assert "layer 1" not in caplog.text and alarm.collapsed == {1}
