"""`lamina`: train a network layer-locally from video, and probe, report, study, steer and benchmark it.

Every error lamina raises on purpose (pipeline/errors.py) ends the command with one line on stderr and a
non-zero exit; `--debug` shows the traceback too.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Sequence

from pipeline.errors import ConfigError, LaminaError
from pipeline.flags import add_flags, arg_type, config_from_args, given_flags

STUDY_FLAGS = ("data", "steps", "seed", "engine", "loss_grid", "deltas")  # what a study's variants share


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _add_split(p: argparse.ArgumentParser) -> None:
    """The probe's labelled split: frame indices in every sequence, or a fraction of the sequences."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--probe-views", type=arg_type(_ints, "--probe-views"), default=None, metavar="I,J,...",
                   help="label these frame indices of every sequence, test on the others (e.g. 0,18,36,54)")
    g.add_argument("--probe-fraction", type=float, default=None, metavar="F",
                   help="label every frame of this fraction of the sequences, test on the others (default: 0.5)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lamina", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a network layer-locally from video (a new run, or --resume one)")
    add_flags(t)
    t.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR from its last complete checkpoint, with its own config")

    pr = sub.add_parser("probe", help="linear and 1-NN probes of a run's layers, next to random init")
    pr.add_argument("--run-dir", required=True)
    pr.add_argument("--data", default=None, metavar="SPEC", help="data spec (default: the run's)")
    _add_split(pr)

    rp = sub.add_parser("report", help="redraw RUN_DIR/loss.png from the run's metrics")
    rp.add_argument("--run-dir", required=True)

    st = sub.add_parser("study", help="train and probe a named set of variants side by side")
    st.add_argument("name", choices=("objectives", "deltas", "settings"))
    st.add_argument("--out", required=True, help="study directory (finished variants are kept, others resumed)")
    add_flags(st, STUDY_FLAGS, defaults={"steps": 1500, "engine": "sequential"})
    st.add_argument("--only", default=None, metavar="LABEL,...", help="the variants to run")
    _add_split(st)

    ct = sub.add_parser("control", help="ask a training run for its status, a checkpoint or a graceful stop")
    ct.add_argument("--run-dir", required=True)
    ct.add_argument("action", choices=("status", "checkpoint", "stop"))

    be = sub.add_parser("bench", help="pipeline efficiency, speed-up, transport and memory, side by side")
    be.add_argument("--quick", action="store_true", help="a run of a minute or two (default: the full bench)")
    be.add_argument("--out", default="", help="output directory (default runs/bench-<time>)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command is None:
        p.print_help()
        return 2
    try:
        return _run(args)
    except (LaminaError, ValueError, OSError) as e:  # ValueError, OSError: from libraries, on bad input
        if args.debug:
            traceback.print_exc()
        print(f"lamina {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code if isinstance(e, LaminaError) else 2
    except KeyboardInterrupt:
        print(f"lamina {args.command}: interrupted", file=sys.stderr)
        return 130


def _probe_split(args: argparse.Namespace) -> tuple[tuple[int, ...] | None, float | None]:
    """--probe-views or --probe-fraction; half of the sequences when neither is given."""
    if args.probe_views is None and args.probe_fraction is None:
        return None, 0.5
    return args.probe_views, args.probe_fraction


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from pipeline.run import resume, train

        if args.resume:
            if given_flags(args):
                raise ConfigError(f"--resume continues a run with its own config: drop {' '.join(given_flags(args))}")
            outcome = resume(args.resume, handle_signals=True)
        else:
            outcome = train(config_from_args(args), handle_signals=True)
        print(f"run directory: {outcome.path}")
        if outcome.stopped_at is not None:
            print(f"stopped after {outcome.stopped_at} micro-batches (checkpoint written); "
                  f"continue with: lamina train --resume {outcome.path}")
        else:
            print(f"next: lamina probe --run-dir {outcome.path}")
        return 0
    if args.command == "probe":
        from pipeline.evaluation.probe import format_table, probe

        report = probe(args.run_dir, args.data, *_probe_split(args))
        print(format_table(report))
        print(f"wrote {args.run_dir}/probe.json")
        return 0
    if args.command == "study":
        from pipeline.evaluation.study import format_study, run_study

        base = config_from_args(args).to_dict()
        base = {k: base[k] for k in STUDY_FLAGS}
        only = args.only.split(",") if args.only else None
        results = run_study(args.name, args.out, base, *_probe_split(args), only)
        print(format_study(results))
        print(f"wrote {args.out}/study.json, study.md, study.png")
        return 0
    if args.command == "bench":
        from pipeline.bench.suite import main as bench

        out = args.out or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}"
        print(bench(args.quick, out))
        print(f"wrote {out}/bench.json, bench.md, bench.png")
        return 0
    if args.command == "control":
        return _control(args.run_dir, args.action)
    if args.command == "report":
        from pipeline.rundir import RunDir

        run = RunDir(args.run_dir)
        if not run.read_metrics().num_rows:
            raise ConfigError(f"{args.run_dir}: no metrics to plot")
        print(f"wrote {run.plot_losses()}")
        return 0
    raise AssertionError(f"unknown command {args.command}")


def _control(run_dir: str, action: str) -> int:
    import grpc

    from pipeline.control.server import ControlClient

    client = ControlClient(run_dir)
    try:
        reply = getattr(client, action)()
    except grpc.RpcError as e:
        print(f"lamina control: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    finally:
        client.close()
    if action == "status":
        print(f"{reply.run_dir}: engine {reply.engine}, {reply.steps_done}/{reply.steps_total} micro-batches, "
              f"{reply.microbatches_per_s:.2f}/s" + (", stopping" if reply.stopping else ""))
        for layer in reply.layers:
            print(f"  layer {layer.layer + 1}: loss {layer.loss:.4f}, spread {layer.spread:.3f}")
    elif action == "checkpoint":
        print(reply.detail)
    else:
        print("stopping: the run drains, checkpoints and exits" if reply.accepted else "already stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
