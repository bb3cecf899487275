"""`lamina` command line: train, probe, report."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pipeline.config import ENGINES, PLACEMENTS, TrainConfig
from workers.layers import NORMS
from workers.objectives import OBJECTIVES

D = TrainConfig()


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers (got {s!r})") from None


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (got {s!r})") from None


def _head(s: str) -> tuple[int, int] | None:
    if s == "none":
        return None
    sizes = _ints(s)
    if len(sizes) != 2:
        raise argparse.ArgumentTypeError(f"expected HIDDEN,OUT or none (got {s!r})")
    return (sizes[0], sizes[1])


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a network layer-locally from video")
    p.add_argument("--data", default=D.data, help="synthetic[:OPTS] | moving-mnist:PATH | npz:PATH")
    p.add_argument("--objective", default=D.objective, choices=sorted(OBJECTIVES))
    p.add_argument("--engine", default=D.engine, choices=ENGINES)
    p.add_argument("--steps", type=int, default=D.steps, help="micro-batches to train on")
    p.add_argument("--layers", default=D.layers, help="network, e.g. conv:32,conv:64,conv:128,mlp:256")
    p.add_argument("--deltas", type=_floats, default=(), help="per-layer tolerance, one per layer (default: 0 on every layer)")
    p.add_argument("--clips", type=int, default=D.clips, help="B: clips per micro-batch")
    p.add_argument("--clip-len", type=int, default=D.clip_len, help="T: frames per clip")
    p.add_argument("--stride", type=int, default=D.stride, help="frames between a clip's neighbouring frames")
    p.add_argument("--size", type=int, default=D.size, help="frames are resized to SIZE x SIZE")
    p.add_argument("--lr", type=float, default=D.lr)
    p.add_argument("--head", type=_head, default=D.head, help="projection head HIDDEN,OUT or none")
    p.add_argument("--loss-grid", type=_ints, default=(),
                   help="per-layer pooling grid before the loss, one value or one per layer (default: 2)")
    p.add_argument("--norm", default=D.norm, choices=NORMS, help="scaling of each layer's output (default: rms)")
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--run-dir", default="", help="output directory (default runs/<time>)")
    p.add_argument("--layers-per-stage", type=int, default=D.layers_per_stage)
    p.add_argument("--queue-depth", type=int, default=D.queue_depth)
    p.add_argument("--placement", default=D.placement, choices=PLACEMENTS)
    p.add_argument("--cpus-per-stage", type=float, default=D.cpus_per_stage)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--checkpoint-every", type=int, default=D.checkpoint_every,
                   help="barrier checkpoint every N micro-batches (0: only on SIGUSR1, Ctrl-C and at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=D.keep_checkpoints, help="complete checkpoints kept")
    p.add_argument("--checkpoint-uri", default=D.checkpoint_uri,
                   help="checkpoint storage: a path or a pyarrow.fs URI (default RUN_DIR/checkpoints)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR from its last complete checkpoint, with its config (other flags ignored)")


def _add_split(p: argparse.ArgumentParser) -> None:
    """The probe's labelled split: frame indices in every sequence, or a fraction of the sequences."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--probe-views", type=_ints, default=None, help="labelled frame indices, e.g. 0,18,36,54")
    g.add_argument("--probe-fraction", type=float, default=None, help="labelled fraction of sequences")


def _add_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="linear and 1-NN probes per layer, next to random init")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--data", default=None, help="data spec (default: the run's)")
    _add_split(p)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="plot a run's per-layer loss and spread to RUN_DIR/loss.png")
    p.add_argument("--run-dir", required=True)


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="train and probe a named set of variants side by side")
    p.add_argument("name", help="objectives | deltas | settings")
    p.add_argument("--data", required=True, help="data spec")
    p.add_argument("--out", required=True, help="study directory (resumes: finished variants are kept)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="sequential", choices=ENGINES,
                   help="engine of the variants that do not name one (sequential: bit-identical to ray)")
    p.add_argument("--loss-grid", type=_ints, default=(), help="loss grid of the variants that do not name one")
    p.add_argument("--deltas", type=_floats, default=(), help="tolerances of the variants that do not name them")
    p.add_argument("--only", default=None, help="comma-separated variant labels to run")
    _add_split(p)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="pipeline efficiency, speed-up, transport and memory, side by side")
    p.add_argument("--quick", action="store_true", help="a run of a minute or two (default: the full bench)")
    p.add_argument("--out", default="", help="output directory (default runs/bench-<time>)")


def _add_control(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("control", help="ask a training run for its status, a checkpoint or a graceful stop")
    p.add_argument("--run-dir", required=True)
    p.add_argument("action", choices=("status", "checkpoint", "stop"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lamina", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")
    _add_train(sub)
    _add_probe(sub)
    _add_report(sub)
    _add_study(sub)
    _add_control(sub)
    _add_bench(sub)
    args = parser.parse_args(["train"] if argv is None and len(sys.argv) == 1 else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return _run(args, parser)
    except (ValueError, FileNotFoundError) as e:
        print(f"lamina {args.command}: error: {e}", file=sys.stderr)
        return 2


def _probe_split(args: argparse.Namespace) -> tuple[tuple[int, ...] | None, float | None]:
    """--probe-views or --probe-fraction; half of the sequences when neither is given."""
    if args.probe_views is None and args.probe_fraction is None:
        return None, 0.5
    return args.probe_views, args.probe_fraction


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "train":
        from pipeline.train import resume, train_run

        fields = {k: v for k, v in vars(args).items() if k not in ("command", "verbose", "resume")}
        outcome = resume(args.resume) if args.resume else train_run(TrainConfig(**fields), handle_signals=True)
        print(f"run directory: {outcome.path}")
        if outcome.stopped_at is not None:
            print(f"stopped after {outcome.stopped_at} micro-batches (checkpoint written); "
                  f"continue with: lamina train --resume {outcome.path}")
        else:
            print(f"next: lamina probe --run-dir {outcome.path}")
        return 0
    if args.command == "probe":
        from pipeline.probe import format_table, probe

        report = probe(args.run_dir, args.data, *_probe_split(args))
        print(format_table(report))
        print(f"wrote {args.run_dir}/probe.json")
        return 0
    if args.command == "study":
        from pipeline.study import format_study, run_study

        only = args.only.split(",") if args.only else None
        results = run_study(args.name, args.out, {"data": args.data, "steps": args.steps, "seed": args.seed,
                                                       "engine": args.engine, "loss_grid": args.loss_grid,
                                                       "deltas": args.deltas},
                            *_probe_split(args), only)
        print(format_study(results))
        print(f"wrote {args.out}/study.json, study.md, study.png")
        return 0
    if args.command == "bench":
        import time

        from pipeline.bench.suite import main as bench

        out = args.out or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}"
        print(bench(args.quick, out))
        print(f"wrote {out}/bench.json, bench.md, bench.png")
        return 0
    if args.command == "control":
        import grpc

        from pipeline.control import ControlClient

        client = ControlClient(args.run_dir)
        try:
            print(getattr(client, args.action)(), end="")
        except grpc.RpcError as e:
            print(f"lamina control: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
        finally:
            client.close()
        return 0
    if args.command == "report":
        from pipeline.rundir import RunDir

        print(f"wrote {RunDir(args.run_dir).plot_losses()}")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
