"""The collapse alarm: warn when a layer's feature spread says every frame maps to about the same point.

`spread` (workers/objectives.py) is ~1 for embeddings spread evenly over the sphere and -> 0 on collapse.
The threshold comes from the COIL-20 objectives study (README, "Learning quality"): every layer that
learned something useful ended with a spread of 0.90-0.98, every layer that stayed at its random-init
probe accuracy ended between 0.09 (the pure hinge: nothing pushes frames apart) and 0.33 (slowness +
variance + decorrelation). A freshly initialised layer starts low too (0.1-0.25) and a learning one
climbs past the threshold within a few hundred micro-batches, so the alarm looks at a smoothed spread
after a warm-up, and only at one that is not climbing: below the threshold and less than RISE above where
it was WINDOW micro-batches before.
"""

from __future__ import annotations

import logging
from collections import deque

logger = logging.getLogger(__name__)

COLLAPSE_SPREAD = 0.35  # below: collapsed (study: useless layers <= 0.33, useful layers >= 0.90)
WARMUP = 100  # micro-batches before the alarm may fire; layers start near 0.1 from a random init
SMOOTHING = 0.05  # exponential moving average weight of the newest micro-batch (~20-batch memory)
WINDOW = 100  # micro-batches over which a climbing spread is told from a flat or falling one
RISE = 0.02  # what the smoothed spread must gain over WINDOW to count as climbing


class CollapseAlarm:
    """Feeds on per-layer spread; logs a warning when a layer collapses and when it recovers."""

    def __init__(self, threshold: float = COLLAPSE_SPREAD, warmup: int = WARMUP) -> None:
        self.threshold, self.warmup = threshold, warmup
        self._ema: dict[int, float] = {}
        self._seen: dict[int, int] = {}
        self._past: dict[int, deque[float]] = {}  # the smoothed spread of the last WINDOW micro-batches
        self.collapsed: set[int] = set()

    def update(self, layer: int, spread: float) -> bool:
        """Record one micro-batch's spread for `layer`; True while the layer counts as collapsed."""
        ema = self._ema.get(layer, spread)
        self._ema[layer] = ema = (1 - SMOOTHING) * ema + SMOOTHING * spread
        self._seen[layer] = seen = self._seen.get(layer, 0) + 1
        past = self._past.setdefault(layer, deque(maxlen=WINDOW))
        climbing = bool(past) and ema - past[0] >= RISE  # against the oldest kept, up to WINDOW ago
        past.append(ema)
        if seen < self.warmup:
            return False
        if ema < self.threshold and not climbing and layer not in self.collapsed:
            self.collapsed.add(layer)
            logger.warning("layer %d is collapsing: feature spread %.3f < %.2f after %d micro-batches "
                           "(every frame maps to about the same point; check the objective's counter-force)",
                           layer + 1, ema, self.threshold, seen)
        elif ema >= self.threshold and layer in self.collapsed:
            self.collapsed.discard(layer)
            logger.warning("layer %d recovered: feature spread %.3f", layer + 1, ema)
        return layer in self.collapsed

    def status(self) -> str:
        """For the progress bar: empty when all is well."""
        return "COLLAPSE " + ",".join(f"L{k + 1}" for k in sorted(self.collapsed)) if self.collapsed else ""
