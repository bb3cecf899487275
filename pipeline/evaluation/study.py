"""`lamina study`: train and probe a named set of variants side by side, one table and one plot.

A study is data: a name -> list of (label, TrainConfig overrides). Every variant trains in its own run
directory under OUT and is probed with the same protocol; a variant whose probe.json exists is not run
again and one that was interrupted continues from its last checkpoint, so a study resumes where it
stopped. The random-init twin of every variant is probed with it, so each row carries its own baseline.

    OUT/<label>/...      each variant's run directory
    OUT/study.json       every variant's config and probe
    OUT/study.md         the table, after a first line naming the command that made it
    OUT/study.png        probe accuracy by layer, learned (solid) and random init (dotted)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.evaluation.probe import probe
from pipeline.run import resume, train

logger = logging.getLogger(__name__)

Variant = tuple[str, dict]

STUDIES: dict[str, list[Variant]] = {
    # Every objective, layer-local and end-to-end, at the default settings.
    "objectives": [(f"{obj}-{eng}", {"objective": obj, "engine": eng})
                   for obj in ("hinge", "hinge-neg", "slow-var", "nce", "clip-nce")
                   for eng in ("sequential", "e2e")],
    # The seed's claim: earlier layers need a larger tolerance.
    "deltas": [("constant", {"deltas": (0.3, 0.3, 0.3)}), ("decreasing", {"deltas": (0.5, 0.3, 0.1)}),
               ("increasing", {"deltas": (0.1, 0.3, 0.5)}), ("none", {"deltas": (0.0, 0.0, 0.0)})],
    # The other settings, one at a time from the defaults: where the loss pools, clip length, temporal
    # distance of positives, normalisation between layers, head, learning rate, width and depth; with the
    # default on the Ray pipeline (it must equal the sequential loop) and end to end (the top-layer target).
    "settings": [("default", {}), ("default-ray", {"engine": "ray"}), ("default-e2e", {"engine": "e2e"}),
                 ("e2e-grid-1", {"engine": "e2e", "loss_grid": (1,)}),
                 ("grid-1", {"loss_grid": (1,)}), ("grid-2-2-1", {"loss_grid": (2, 2, 1)}),
                 ("grid-4", {"loss_grid": (4,)}), ("clip-len-4", {"clip_len": 4}), ("stride-2", {"stride": 2}),
                 ("norm-channel", {"norm": "channel"}), ("norm-none", {"norm": "none"}), ("no-head", {"head": None}),
                 ("lr-3e-4", {"lr": 3e-4}), ("steps-1000", {"steps": 1000}),
                 ("wide", {"layers": "conv:64,conv:128,conv:256"}),
                 ("deep", {"layers": "conv:32,conv:64,conv:128,conv:256"})],
    # The defaults with three seeds (initialisation and data order): how much of a result is the seed's.
    "seeds": [(f"seed-{seed}", {"seed": seed}) for seed in (0, 1, 2)],
}


def run_study(name: str, out: str | Path, base: dict, views: tuple[int, ...] | None,
              fraction: float | None, only: list[str] | None = None, command: str = "") -> list[dict]:
    if name not in STUDIES:
        raise ConfigError(f"study must be one of {sorted(STUDIES)} (got {name!r})")
    variants = [v for v in STUDIES[name] if only is None or v[0] in only]
    if only is not None and len(variants) != len(only):
        known = [label for label, _ in STUDIES[name]]
        raise ConfigError(f"--only: unknown variants {sorted(set(only) - set(known))} (known: {known})")
    out = Path(out)
    results = []
    for i, (label, overrides) in enumerate(variants):
        run_dir = out / label
        cfg = TrainConfig(**{**base, **overrides, "run_dir": str(run_dir)})
        if not (run_dir / "probe.json").is_file():
            logger.info("study %s: variant %d/%d %s", name, i + 1, len(variants), label)
            if (run_dir / "config.json").is_file():
                resume(str(run_dir))  # an interrupted variant continues from its last checkpoint
            else:
                train(cfg)
            probe(run_dir, views=views, fraction=fraction, progress=True)
        report = json.loads((run_dir / "probe.json").read_text())
        results.append({"label": label, "config": cfg.to_dict(), "probe": report})
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "study.md").write_text((f"<!-- command: {command} -->\n" if command else "") + format_study(results) + "\n")
    plot_study(results, out / "study.png")
    return results


def format_study(results: list[dict]) -> str:
    """Markdown: one row per variant, linear probe per layer (gain over its random-init twin)."""
    n = max(len(r["probe"]["layers"]) for r in results)
    head = "| variant | " + " | ".join(f"layer {k + 1}" for k in range(n)) + " |"
    rows = [head, "|---|" + "---|" * n]
    first = results[0]["probe"]
    for label, twin in _twins(results).items():
        rows.append(_row(label, [f"{100 * x['linear_random']:.1f}" for x in twin], n))
    for r in results:
        cells = [f"{100 * x['linear']:.1f} ({100 * (x['linear'] - x['linear_random']):+.1f})"
                 for x in r["probe"]["layers"]]
        rows.append(_row(r["label"], cells, n))
    return (f"linear probe, % ({first['split']} on {first['data']}); in brackets: gain over the same "
            f"network at random init\n\n" + "\n".join(rows))


def _twins(results: list[dict]) -> dict[str, list[dict]]:
    """Each network's random-init twin, per layer (the same for every variant of that network), by its
    table and legend label: "random init", naming the network when the study has several.

    The normalisation between layers is part of the network: it changes the features the probe reads; so
    is the seed it was initialised with, when the variants differ in it.
    """
    twins: dict[str, list[dict]] = {}
    seeds = len({r["config"]["seed"] for r in results}) > 1
    for r in results:
        norm = r["config"].get("norm", "rms")  # runs written before --norm existed used rms
        net = r["config"]["layers"] + ("" if norm == "rms" else f", norm {norm}")
        net += f", seed {r['config']['seed']}" if seeds else ""
        twins.setdefault(net, r["probe"]["layers"])
    if len(twins) == 1:
        return {"random init": next(iter(twins.values()))}
    return {f"random init ({net})": twin for net, twin in twins.items()}


def _row(label: str, cells: list[str], n: int) -> str:
    return f"| {label} | " + " | ".join(cells + [""] * (n - len(cells))) + " |"


def plot_study(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours, markers = plt.get_cmap("tab20"), "osD^v<>p*h"
    for i, r in enumerate(results):
        layers = [x["layer"] for x in r["probe"]["layers"]]
        ax.plot(layers, [100 * x["linear"] for x in r["probe"]["layers"]], "-", marker=markers[i % len(markers)],
                color=colours(i % 20), label=r["label"])
    twins = _twins(results)
    for k, (label, twin) in enumerate(twins.items()):  # one dotted line per network: its random-init twin
        ax.plot([x["layer"] for x in twin], [100 * x["linear_random"] for x in twin], ":", marker=".",
                color=str(round(0.7 * k / max(len(twins) - 1, 1), 3)), label=label)
    data = Path(results[0]["probe"]["data"].partition(":")[2] or results[0]["probe"]["data"]).name
    ax.set(xlabel="layer", ylabel="linear probe accuracy (%)", title=f"{data} — learned (solid), random init (dotted)")
    ax.set_xticks(sorted({x["layer"] for r in results for x in r["probe"]["layers"]}))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
