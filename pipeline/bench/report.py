"""The bench's output: bench.json, the markdown tables (bench.md) and the plot (bench.png)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.bench.sources import format_sources
from pipeline.bench.transport import KB, MB


def _size(nbytes: int) -> str:
    return f"{nbytes // MB} MB" if nbytes >= MB else f"{nbytes // KB} KB"


EFFICIENCY_TARGET = 0.95  # issue 16's targets, judged on `lamina bench --quick`
HOP_TARGET = 2.0  # the best transport's hop at 1 MB, in memcpys
NOISE = 1.02  # a factor within 2 % of 1 is not named as a cause


def targets(res: dict[str, Any]) -> list[tuple[str, str, bool, str]]:
    """Each target as (target, measured, met, where the shortfall is: empty when met)."""
    h = res["headline"]
    rows = []
    eff = h["efficiency"]
    rows.append((f"pipeline efficiency >= {EFFICIENCY_TARGET}", f"{eff:.2f}", eff >= EFFICIENCY_TARGET,
                 "" if eff >= EFFICIENCY_TARGET else _efficiency_shortfall(h)))
    hop = next((x for x in res.get("hops", []) if x["nbytes"] == MB), None)
    if hop is not None:
        vs = {t: v for t, v in hop["vs_memcpy"].items() if t not in ("wake", "memcpy", "memcpy-new")}
        best = min(vs, key=vs.__getitem__)
        met = vs[best] <= HOP_TARGET
        wake = f"; the FIFO wake-up alone {hop['ms']['wake']:.3f} ms" if "wake" in hop["ms"] else ""
        rows.append((f"best transport per hop at 1 MB <= {HOP_TARGET:g}x memcpy", f"{best}: {vs[best]:.1f}x", met,
                     "" if met else f"transport: {hop['ms'][best] - hop['ms']['memcpy']:.3f} ms per message beyond "
                                    f"the copy{wake}"))
    slowest = max(h["t_iso_s"])
    for loop, speedup in h["vs_sequential"].items():
        ideal = 1 / slowest / h["baselines"][loop]  # the speed-up at efficiency 1
        met = speedup > 1
        why = (f"imbalance: at efficiency 1 the slowest stage ({slowest * 1e3:.0f} ms) gives {ideal:.2f}x"
               if ideal <= 1 else f"the efficiency above: at efficiency 1 this split gives {ideal:.2f}x")
        rows.append((f"S = {h['stages']} faster than the {loop} loop", f"{speedup:.2f}x", met, "" if met else why))
    return rows


def _efficiency_shortfall(h: dict[str, Any]) -> str:
    """Where the efficiency went, from its factors ([Note: efficiency] in suite.py): the bottleneck stage
    waiting (transport or driver), the machine running stages at once (the co-run), and what the pipeline's
    slowdown has beyond the co-run (the stage's process itself, or waiting for a core)."""
    parts = []
    busy, slowdown, corun = h["bottleneck_busy_fraction"], h["compute_slowdown"], h["corun_slowdown"]
    if busy * NOISE < 1:
        parts.append(f"transport or driver: the slowest stage waited {1 - busy:.0%} of the time")
    if corun > NOISE:
        parts.append(f"machine: the stages at once, no transport, no driver, step {corun:.2f}x slower than alone")
    rest = slowdown / max(corun, 1.0)
    if rest > NOISE:
        if h["cpu_efficiency"] * NOISE < 1:
            parts.append(f"the slowest stage's process: {1 / h['cpu_efficiency']:.2f}x its CPU per step alone "
                         f"({rest:.2f}x beyond the co-run){_whose_cpu(h)}")
        else:
            c, wait = h["cores"], h.get("step_wait_per_mb_s", float("nan"))
            waited = "" if math.isnan(wait) else f"; the step's thread waited {wait * 1e3:.1f} ms per micro-batch"
            parts.append(f"waiting for a core: {rest:.2f}x beyond the co-run (driver {c['driver']:.2f}, Ray "
                         f"{c['ray']:.2f}, other processes {c['other']:.2f} cores{waited})")
    return "; ".join(parts) or "no factor beyond 2 %: together"


def _whose_cpu(h: dict[str, Any]) -> str:
    """Which threads of the process the extra CPU went to: the step's own (a slower step), or the others."""
    step = h.get("step_cpu_efficiency", float("nan"))
    if math.isnan(step):  # a result from before threads were told apart, or none measured
        return ""
    if step * NOISE < 1:
        return f": the step's thread {1 / step:.2f}x"
    return f": other threads {h['other_threads_cpu_per_mb_s'] * 1e3:.1f} ms per micro-batch, the step's thread {1 / step:.2f}x"


def format_tables(res: dict[str, Any]) -> str:
    h, cores = res["headline"], res["config"]["cores"]
    b = h["baselines"]
    lines = [(f"## Headline: S = {h['stages']} stages, B = {h['clips']} clips x {res['config']['clip_len']} frames, "
             f"--transport {res['config']['pipeline_transports'][0]} ({len(h['rates'])} interleaved runs, medians)"), "",
             "| measure | value | target |", "|---|---|---|",
             f"| pipeline micro-batches/s | {h['rate']:.2f} ({', '.join(f'{x:.2f}' for x in h['rates'])}) | |",
             f"| stage step in isolation (ms, 1 thread) | {' / '.join(f'{t * 1e3:.1f}' for t in h['t_iso_s'])} | |",
             f"| **pipeline efficiency** = rate x max t_iso | **{h['efficiency']:.2f}** | >= 0.95 |",
             f"| = 1 / compute slowdown in the pipeline | 1 / {h['compute_slowdown']:.2f} | |",
             f"| x busy fraction of the bottleneck stage | {h['bottleneck_busy_fraction']:.2f} | |",
             f"| co-run slowdown (stages at once, no transport) | {h['corun_slowdown']:.2f} | |",
             f"| efficiency against the cores other processes left free | {h['efficiency_vs_free_cores']:.2f} | |",
             f"| CPU efficiency: slowest stage's CPU per step alone / in the pipeline | {h['cpu_efficiency']:.2f} | |"]
    if "step_cpu_efficiency" in h:
        lines.append(f"| of it the step's thread (CPU per step alone / in the pipeline) / other threads (ms per micro-batch) | "
                     f"{h['step_cpu_efficiency']:.2f} / {h['other_threads_cpu_per_mb_s'] * 1e3:.1f} | |")
        lines.append(f"| bottleneck's step thread waiting for a core (ms per micro-batch) | "
                     f"{h['step_wait_per_mb_s'] * 1e3:.1f} | |")
    for k, v in h["vs_sequential"].items():
        lines.append(f"| speed-up vs {k} ({b[k]:.2f} mb/s) | {v:.2f}x | |")
    for k, v in h["vs_e2e"].items():
        lines.append(f"| speed-up vs {k} backprop ({b[k]:.2f} mb/s) | {v:.2f}x | |")
    c = h["cores"]
    lines.append(f"| cores busy during the pipeline: stages / driver / Ray / other / machine | "
                 f"{c['stages']:.2f} / {c['driver']:.2f} / {c['ray']:.2f} / {c['other']:.2f} / {c['machine']:.2f} | |")
    lines += ["", "## Targets, and where a miss comes from", "", "| target | measured | verdict | where the shortfall is |",
              "|---|---|---|---|"]
    lines += [f"| {t} | {m} | {'met' if ok else '**missed**'} | {why} |" for t, m, ok, why in targets(res)]
    if res.get("by_transport"):
        from pipeline.engines.transport import AUTO

        lines += ["", "## Transports side by side (the headline's S and B, the same repeats, interleaved)", "",
                  ("| --transport | mb/s (repeats) | efficiency | bottleneck busy fraction | vs sequential 1t | "
                   f"vs sequential {cores}t | stage actors idle (cores) |"), "|---|---|---|---|---|---|---|"]
        for t, v in res["by_transport"].items():
            lines.append(f"| {t} | {v['rate']:.2f} ({', '.join(f'{x:.2f}' for x in v['rates'])}) | "
                         f"{v['efficiency']:.2f} | {v['bottleneck_busy_fraction']:.2f} | "
                         f"{v['vs_sequential']['sequential 1t']:.2f}x | {v['vs_sequential'][f'sequential {cores}t']:.2f}x | "
                         f"{v.get('idle_cores', float('nan')):.2f} |")
        for t, v in res["by_transport"].items():
            if v.get("lost"):
                lines.append(f"\n{t}: {len(v['lost'])} repeat(s) lost a stage and ran again on new stage actors "
                             f"(first: {v['lost'][0]}).")
        best = max(res["by_transport"], key=lambda t: res["by_transport"][t]["rate"])
        lines.append(f"\nFastest in this run: {best}; `--transport auto` picks {AUTO['cpu']} on the cpu "
                     f"(pipeline/engines/transport.py says from which runs, and why).")
    if res.get("balance"):
        bl = res["balance"]

        def _ranges(rs: list[list[int]]) -> str:
            return " / ".join(",".join(str(k + 1) for k in range(a, b)) for a, b in rs)

        def _row(split: str) -> str:  # per stage: step alone, step in the pipeline (ms), memory (MB)
            return " | ".join(" / ".join(f"{v * scale:.0f}" for v in bl[f"{split}_{key}"])
                              for key, scale in (("t_iso_s", 1e3), ("busy_s", 1e3), ("stage_mb", 1)))

        lines += ["", f"## Balance: layers per stage by measured step time (--balance auto; --transport {bl.get('transport', 'object-store')})", "",
                  f"Layer step times alone (ms, 1 thread): {' / '.join(f'{t * 1e3:.1f}' for t in bl['per_layer_s'])}.",
                  "", ("| split | layers per stage | slowest / mean stage | stage t_iso (ms) | stage step in the pipeline (ms) "
                  f"| stage memory (MB) | mb/s | vs sequential 1t | vs sequential {cores}t |"),
                  "|---|---|---|---|---|---|---|---|---|",
                  (f"| even (--layers-per-stage) | {_ranges(bl['even'])} | {bl['even_imbalance']:.2f} | "
                   f"{_row('even')} | {bl['even_rate']:.2f} | "
                   f"{bl['even_rate'] / b['sequential 1t']:.2f}x | {bl['even_rate'] / b[f'sequential {cores}t']:.2f}x |"),
                  (f"| balanced (--balance auto) | {_ranges(bl['balanced'])} (the run: {_ranges(bl['balanced_in_run'])})"
                   f" | {bl['balanced_imbalance']:.2f} | {_row('balanced')} | {bl['balanced_rate']:.2f}"
                   f" | {bl['balanced_vs_sequential']['sequential 1t']:.2f}x | "
                   f"{bl['balanced_vs_sequential'][f'sequential {cores}t']:.2f}x |")]
    if res.get("replicas"):
        rp = res["replicas"]
        lines += ["", (f"## Replicas: the whole network as one stage of R data-parallel replicas (B = {rp['clips']}, "
                       f"1 CPU each; the stage alone: {rp['t_iso_s'] * 1e3:.0f} ms per micro-batch)"), "",
                  (f"| R | mb/s | vs R = {rp['rows'][0]['replicas']}, per replica | vs sequential 1t | "
                   f"vs sequential {cores}t |"), "|---|---|---|---|---|"]
        lines += [f"| {r['replicas']} | {r['rate']:.2f} | {r['scaling_efficiency']:.2f} | "
                  f"{r['vs_sequential']['sequential 1t']:.2f}x | {r['vs_sequential'][f'sequential {cores}t']:.2f}x |"
                  for r in rp["rows"]]
    lines += ["", (f"## Scaling (one run each, --transport {res['config']['pipeline_transports'][0]}; {cores} cores: "
                   f"S > {cores} is oversubscribed)"), "",
              ("| S | B | mb/s | stage t_iso (ms) | efficiency | vs ideal | vs sequential "
              f"{cores}t | vs sequential 1t | vs e2e {cores}t |"), "|---|---|---|---|---|---|---|---|---|"]
    for s in res["scaling"]:
        lines.append(f"| {s['stages']} | {s['clips']} | {s['rate']:.2f} | "
                     f"{' / '.join(f'{t * 1e3:.0f}' for t in s['t_iso_s'])} | {s['efficiency']:.2f} | "
                     f"{s['efficiency_vs_ideal']:.2f} | {s['vs_sequential']:.2f}x | {s['vs_sequential_1t']:.2f}x | "
                     f"{s['vs_e2e']:.2f}x |")
    mem = res["memory"][str(h["clips"])] if str(h["clips"]) in res["memory"] else res["memory"][h["clips"]]
    e2e = next(v for k, v in mem.items() if k.startswith("e2e"))
    lines += ["", f"## Peak memory at B = {h['clips']} (RSS high-water mark above the process's baseline)", "",
              "| layers | peak MB | vs e2e backprop |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {v / e2e:.2f} |" for k, v in mem.items()]
    names = [t for t in res["hops"][0]["ms"] if not t.startswith("memcpy")]
    lines += ["", "## Per-hop transport (median ms, and x memcpy; memcpy-new: into fresh pages)", "",
              "| payload | " + " | ".join(names) + " | memcpy | memcpy-new |", "|---|" + "---|" * (len(names) + 2)]
    for hop in res["hops"]:
        ms, vs = hop["ms"], hop["vs_memcpy"]
        lines.append(f"| {_size(hop['nbytes'])} | " + " | ".join(f"{ms[t]:.2f} ({vs[t]:.1f}x)" for t in names)
                     + f" | {ms['memcpy']:.3f} | {ms['memcpy-new']:.3f} ({vs['memcpy-new']:.1f}x) |")
    if res["hop_marginal"]:
        m = res["hop_marginal"]
        lines.append("| per extra byte, two largest sizes | " + " | ".join(f"{m[t]:.2f}x" for t in names)
                     + f" | 1x | {m['memcpy-new']:.2f}x |")
    if "sources" in res:
        lines += ["", format_sources(res["sources"])]
    lines += ["", (f"{res['machine']['cores']} cores, torch {res['machine']['torch']}, ray {res['machine']['ray']}; "
              f"load average at start {', '.join(f'{x:.1f}' for x in res['machine']['load_avg_at_start'])}; "
              f"bench took {res['elapsed_s']:.0f} s.")]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    cores = res["config"]["cores"]
    for clips in sorted({s["clips"] for s in res["scaling"]}):
        rows = [s for s in res["scaling"] if s["clips"] == clips]
        (line,) = ax1.plot([s["stages"] for s in rows], [s["rate"] / rows[0]["baselines"]["sequential 1t"]
                                                         for s in rows], "o-", label=f"pipeline, B={clips}")
        ax1.plot([s["stages"] for s in rows], [s["ideal"] / rows[0]["baselines"]["sequential 1t"] for s in rows],
                 ":", color=line.get_color(), label=f"ideal (isolated stages), B={clips}")
        ax1.axhline(rows[0]["baselines"][f"sequential {cores}t"] / rows[0]["baselines"]["sequential 1t"],
                    ls="--", color=line.get_color(), lw=0.8)
    ax1.set_xticks(sorted({s["stages"] for s in res["scaling"]}))
    ax1.set_xlabel("stages S (1 CPU, 1 thread each)")
    ax1.set_ylabel("micro-batches/s ÷ sequential loop, 1 thread")
    ax1.set_title(f"throughput (dashed: sequential, {cores} threads)")
    ax1.legend(fontsize=7)
    sizes = [h["nbytes"] / MB for h in res["hops"]]
    for t in res["hops"][0]["ms"]:
        ax2.loglog(sizes, [h["ms"][t] for h in res["hops"]], "o-" if t != "memcpy" else "k--", label=t)
    ax2.set_xlabel("activation (MB)")
    ax2.set_ylabel("per-hop ms (median)")
    ax2.set_title("transport vs memcpy")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(res: dict[str, Any], out: Path) -> str:
    """bench.json, bench.md and bench.png in `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=1, default=_jsonable))
    res = json.loads((out / "bench.json").read_text())  # the tables read what the json holds
    table = format_tables(res)
    (out / "bench.md").write_text(table + "\n")
    plot(res, out / "bench.png")
    return table


def _jsonable(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    return str(o)
