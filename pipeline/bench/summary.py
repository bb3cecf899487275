"""What `lamina bench` reports from its measurements: the headline's medians over the repeats, each ratio
taken within a repeat first ([Note: efficiency] in pipeline/bench/suite.py), and the hops against memcpy.
Pure arithmetic on what pipeline/bench/suite.py measured."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from pipeline.bench.transport import HopRow


def headline(runs: list[dict[str, Any]], stages: int, clips: int, cores: int) -> dict[str, Any]:
    """Medians over the repeats; every ratio is taken within a repeat first (its rate with its own isolation
    times and CPU use), so that a drift of the machine between repeats cancels."""
    med = statistics.median
    rate = med(r["pipeline"]["rate"] for r in runs)
    base = {k: med(r["baselines"][k] for r in runs) for k in runs[0]["baselines"]}
    effs, slowdown, fraction, corun, avail_effs, cpu_ratio, step_ratio, others, waits = ([] for _ in range(9))
    for r in runs:
        p, t_iso = r["pipeline"], r["t_iso_s"]
        b = max(range(stages), key=lambda k: p["busy_s"][k])  # the bottleneck in the pipeline
        effs.append(p["rate"] * max(t_iso))
        slowdown.append(p["busy_s"][b] / max(t_iso))
        fraction.append(p["busy_fraction"][b])
        corun.append(max(r["corun_s"]) / max(t_iso))
        # What the cores other processes left allow: min(1 / max t, free cores / sum t).
        free = max(0.05, cores - p["cores"].get("other", 0.0))
        avail_effs.append(p["rate"] / min(1 / max(t_iso), free / sum(t_iso)))
        # CPU time is what the stage spent, not what it waited for a core: the pipeline's own overhead.
        k = max(range(stages), key=lambda j: r["cpu_iso_s"][j])
        if p["cpu_per_mb_s"] and p["cpu_per_mb_s"][k] > 0:  # not NaN, not below the clock resolution
            cpu_ratio.append(r["cpu_iso_s"][k] / p["cpu_per_mb_s"][k])
        if p.get("step_cpu_per_mb_s") and p["step_cpu_per_mb_s"][k] > 0:  # the step's thread, and the rest
            step_ratio.append(r["cpu_iso_s"][k] / p["step_cpu_per_mb_s"][k])
            others.append(p["cpu_per_mb_s"][k] - p["step_cpu_per_mb_s"][k])
            waits.append(p["step_wait_per_mb_s"][b])  # the bottleneck's step thread, runnable but not running
    t_iso_med = [med(r["t_iso_s"][k] for r in runs) for k in range(stages)]
    cpu = {k: med(r["pipeline"]["cores"][k] for r in runs) for k in runs[0]["pipeline"]["cores"]}
    return {"stages": stages, "clips": clips, "rate": rate, "rates": [r["pipeline"]["rate"] for r in runs],
            "t_iso_s": t_iso_med, "busy_s": [med(r["pipeline"]["busy_s"][k] for r in runs) for k in range(stages)],
            "efficiency": med(effs), "efficiencies": effs, "compute_slowdown": med(slowdown),
            "bottleneck_busy_fraction": med(fraction), "corun_slowdown": med(corun),
            "efficiency_vs_free_cores": med(avail_effs), "baselines": base,
            "cpu_efficiency": med(cpu_ratio) if cpu_ratio else float("nan"),
            "step_cpu_efficiency": med(step_ratio) if step_ratio else float("nan"),
            "other_threads_cpu_per_mb_s": med(others) if others else float("nan"),
            "step_wait_per_mb_s": med(waits) if waits else float("nan"),
            "vs_sequential": {k: rate / v for k, v in base.items() if k.startswith("sequential")},
            "vs_e2e": {k: rate / v for k, v in base.items() if k.startswith("e2e")}, "cores": cpu}


def hop_dict(h: HopRow) -> dict[str, Any]:
    """One hop row, with each transport as a multiple of memcpy."""
    return {"nbytes": h.nbytes, "ms": h.ms,
            "vs_memcpy": {t: v / h.ms["memcpy"] for t, v in h.ms.items() if t != "memcpy"}}


def marginal(hops: Sequence[HopRow]) -> dict[str, float]:
    """Per-byte cost between the two largest payloads, as a multiple of memcpy's: the bandwidth part of a
    hop with its fixed latency (call dispatch, scheduling) taken out."""
    if len(hops) < 2:
        return {}
    a, b = sorted(hops, key=lambda h: h.nbytes)[-2:]
    copy = b.ms["memcpy"] - a.ms["memcpy"]
    return {t: (b.ms[t] - a.ms[t]) / copy for t in b.ms if t != "memcpy" and copy > 0}
