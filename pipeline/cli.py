"""`lamina`: train a network layer-locally from video, and probe, report, study, steer and benchmark it.

Every error lamina raises on purpose (pipeline/errors.py) ends the command with one line on stderr and a
non-zero exit; `--debug` shows the traceback too.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from pipeline.errors import ConfigError, LaminaError
from pipeline.flags import add_flags, arg_type, config_from_args, given_settings, train_fields

PROBE_FRACTION = 0.5  # the probe's split when none is given: half of the sequences labelled
STUDY_FLAGS = ("data", "steps", "seed", "engine", "loss_grid", "deltas")  # what a study's variants share


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _add_split(p: argparse.ArgumentParser) -> None:
    """The probe's labelled split: frame indices in every sequence, or a fraction of the sequences."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--probe-views", type=arg_type(_ints, "--probe-views"), default=None, metavar="I,J,...",
                   help="label these frame indices of every sequence, test on the others (e.g. 0,18,36,54)")
    g.add_argument("--probe-fraction", type=float, default=None, metavar="F",
                   help=f"label every frame of this fraction of the sequences, test on the others "
                        f"(default: {PROBE_FRACTION})")


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
    t.add_argument("--no-probe", action="store_true",
                   help="skip the probe of the finished run (learned vs random init per layer, as lamina probe)")

    pr = sub.add_parser("probe", help="linear and 1-NN probes of a run's layers, next to random init")
    pr.add_argument("--run-dir", required=True)
    pr.add_argument("--data", default=None, metavar="SPEC", help="data spec (default: the run's)")
    _add_split(pr)

    rp = sub.add_parser("report", help="redraw RUN_DIR/loss.png from the run's metrics")
    rp.add_argument("--run-dir", required=True)

    st = sub.add_parser("study", help="train and probe a named set of variants side by side")
    st.add_argument("name", choices=("objectives", "deltas", "settings", "seeds"))
    st.add_argument("--out", required=True, help="study directory (finished variants are kept, others resumed)")
    add_flags(st, STUDY_FLAGS, defaults={"steps": 1500, "engine": "sequential"})
    st.add_argument("--only", default=None, metavar="LABEL,...", help="the variants to run")
    _add_split(st)

    ct = sub.add_parser("control", help="ask a training run for its status, a checkpoint or a graceful stop")
    ct.add_argument("--run-dir", required=True)
    ct.add_argument("action", choices=("status", "watch", "checkpoint", "stop"),
                    help="status: where the run stands; watch: the same every --interval seconds until it ends")
    ct.add_argument("--json", action="store_true", help="status as JSON (watch: one JSON object a line), for scripts")
    ct.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between watch updates "
                    "(default: 1)")

    be = sub.add_parser("bench", help="pipeline efficiency, speed-up, transport and memory, side by side")
    be.add_argument("--quick", action="store_true", help="a run of about 4 minutes on 2 cores (default: the full bench)")
    be.add_argument("--out", default="", help="output directory (default runs/bench-<time>)")
    be.add_argument("--transports", default="", help="the --transport values run side by side, comma-separated; "
                    "the first is the headline's (default: shm,object-store,direct,compiled-graph)")
    be.add_argument("--repeats", type=int, default=0, help="interleaved repeats of the headline (default: 5)")
    be.add_argument("--headline-only", action="store_true",
                    help="the headline, the transports side by side, per-hop and peak memory: no balance, replicas or "
                    "sources, and of the scaling table the headline's row only")

    pp = sub.add_parser("prepare", help="video files, folders of them and image-sequence folders -> a Parquet "
                        "dataset for --data parquet:DIR (in parallel on Ray, resumable)")
    pp.add_argument("sources", nargs="+", metavar="SRC", help="video files, folders (walked recursively) or globs")
    pp.add_argument("--out", required=True, metavar="DIR|URI",
                    help="the dataset: a path or a pyarrow.fs URI (s3://..., gs://...); a re-run adds to it")
    pp.add_argument("--size", type=int, default=32, help="frames are stored at SIZE x SIZE (train with this --size)")
    pp.add_argument("--channels", type=int, choices=(3, 1), default=3, help="3: RGB, 1: grey")
    pp.add_argument("--fit", choices=("crop", "squash"), default="crop",
                    help="square frames by a centre crop to the short side, or by resizing as they are")
    pp.add_argument("--encoding", choices=("raw", "png", "jpeg"), default="raw", help="how frames are stored")
    pp.add_argument("--quality", type=int, default=90, help="JPEG quality (--encoding jpeg)")
    pp.add_argument("--labels", choices=("folder", "stem", "none"), default="folder",
                    help="a video's label: its parent folder's name, its file's stem, or none")
    pp.add_argument("--group-frames", type=int, default=64, metavar="N",
                    help="rows per Parquet row group, the unit a reader fetches")
    pp.add_argument("--strict", action="store_true", help="stop at the first damaged or unreadable source "
                    "(default: skip it, with a warning naming it, and count it)")
    pp.add_argument("--workers", type=int, default=0, metavar="N",
                    help="shards prepared at once, one Ray task each (default: the Ray cluster's CPUs)")
    pp.add_argument("--address", default=None, metavar="HOST:PORT",
                    help="Ray cluster to run on (default: RAY_ADDRESS, else a local Ray for this command)")
    _add_ingest(sub)
    for command in sub.choices.values():
        command.set_defaults(command_parser=command)  # main's errors name the command
    return p


def _add_ingest(sub: Any) -> None:
    """`lamina serve` (train on a live gRPC ingest) and `lamina push` (its client); pipeline/ingest/."""
    sv = sub.add_parser("serve", help="train the pipeline on live streams pushed over gRPC (proto/lamina/v1/)")
    add_flags(sv, [f.name for f in train_fields() if f.name != "data"])  # the data is what is pushed
    sv.add_argument("--resume", default=None, metavar="RUN_DIR",
                    help="continue a serve run from its last complete checkpoint: the micro-batches its log holds "
                         "beyond it are replayed first, then new frames are taken")
    sv.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                    help="where the ingest listens (default: loopback, any free port; see RUN_DIR/ingest.json)")
    sv.add_argument("--token-file", default=None, metavar="FILE",
                    help="the bearer token every call must carry (default: $LAMINA_INGEST_TOKEN, else a fresh "
                         "one written to RUN_DIR/ingest.json)")
    sv.add_argument("--tls-cert", default=None, metavar="PEM", help="serve TLS with this certificate chain")
    sv.add_argument("--tls-key", default=None, metavar="PEM", help="... and this private key")
    sv.add_argument("--when-full", choices=("block", "drop-oldest"), default="block",
                    help="a full buffer slows producers (block: gRPC flow control) or drops its oldest clip, "
                         "counted (default: block)")
    sv.add_argument("--buffer-clips", type=int, default=64, metavar="N", help="clips the buffer holds (default: 64)")
    sv.add_argument("--memory-clips", type=int, default=256, metavar="N",
                    help="past clips kept as negatives (default: 256)")
    sv.add_argument("--negative-gap", type=int, default=0, metavar="FRAMES",
                    help="frames between clips of one stream in a micro-batch (default: 4 x --clip-len)")
    sv.add_argument("--channels", type=int, choices=(1, 3), default=3, help="3: RGB, 1: grey (default: 3)")
    sv.add_argument("--max-message-mb", type=float, default=4.0, metavar="MB",
                    help="largest Push message (default: 4)")

    pu = sub.add_parser("push", help="push a data spec's videos to a `lamina serve` run as live streams")
    pu.add_argument("source", metavar="SPEC", help="any --data spec: npz:PATH, parquet:DIR, video:PATH, ...")
    pu.add_argument("--to", required=True, metavar="HOST:PORT", help="the ingest's address")
    pu.add_argument("--token-file", default=None, metavar="FILE",
                    help="the bearer token (default: $LAMINA_INGEST_TOKEN)")
    pu.add_argument("--tls-ca", default=None, metavar="PEM", help="speak TLS, trusting this CA certificate")
    pu.add_argument("--size", type=int, default=32, help="frames are pushed at SIZE x SIZE (default: 32)")
    pu.add_argument("--one-stream", action="store_true",
                    help="one stream playing the sequences one after another (default: a stream per sequence)")
    pu.add_argument("--fps", type=float, default=0.0,
                    help="pace each stream at this rate, like a camera (default 0: as fast as the server takes)")
    pu.add_argument("--encoding", choices=("raw", "png", "jpeg"), default="raw", help="(default: raw)")
    pu.add_argument("--prefix", default="", help="stream ids are PREFIX + the sequence number")
    pu.add_argument("--loops", type=int, default=1, metavar="N",
                    help="play every sequence N times in a row, indices going on (a turntable turning again)")


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = p.parse_known_args(_negatives_attached(argv))
    if unknown:  # refused by the command's own parser, which names the command, as a bad choice is
        getattr(args, "command_parser", p).error(f"unrecognized arguments: {' '.join(unknown)}")
    args.command_line = shlex.join(["lamina", *argv])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command is None:
        p.print_help()
        return 2
    try:
        return _run(args)
    except (LaminaError, ValueError, OSError, MemoryError) as e:  # the last three: from libraries, on bad input
        if args.debug:
            traceback.print_exc()
        print(f"lamina {args.command}: error: {e or type(e).__name__}", file=sys.stderr)
        return e.exit_code if isinstance(e, LaminaError) else 2
    except KeyboardInterrupt:
        print(f"lamina {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug of lamina's: still one line, and the way to the traceback
        if args.debug:
            traceback.print_exc()
        print(f"lamina {args.command}: unexpected error: {type(e).__name__}: {e} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


def _negatives_attached(argv: list[str]) -> list[str]:
    """`--deltas -1,0,0` -> `--deltas=-1,0,0`: argparse takes a value that starts with '-' for a flag and
    answers "expected one argument"; attached, the value reaches the check that names what is wrong with it."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.match(r"^-\.?\d", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _probe_split(args: argparse.Namespace) -> tuple[tuple[int, ...] | None, float | None]:
    """--probe-views or --probe-fraction; half of the sequences when neither is given."""
    if args.probe_views is None and args.probe_fraction is None:
        return None, PROBE_FRACTION
    return args.probe_views, args.probe_fraction


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from pipeline.run import resume, train

        if args.resume:
            outcome = resume(args.resume, handle_signals=True, given=given_settings(args))
        else:
            outcome = train(config_from_args(args), handle_signals=True)
        print(f"run directory: {outcome.path} (loss.png: loss and feature spread per layer; metrics/; checkpoints/)")
        if outcome.stopped_at is not None:
            print(f"stopped after {outcome.stopped_at} micro-batches (checkpoint written); "
                  f"continue with: lamina train --resume {outcome.path}")
        elif not args.no_probe:
            _probe_finished(str(outcome.path))
        return 0
    if args.command == "probe":
        from pipeline.evaluation.probe import format_table, probe

        report = probe(args.run_dir, args.data, *_probe_split(args), progress=True)
        print(format_table(report))
        print(f"wrote {args.run_dir}/probe.json")
        return 0
    if args.command == "study":
        from pipeline.evaluation.study import format_study, run_study

        base = config_from_args(args).to_dict()
        base = {k: base[k] for k in STUDY_FLAGS}
        only = args.only.split(",") if args.only else None
        results = run_study(args.name, args.out, base, *_probe_split(args), only, args.command_line)
        print(format_study(results))
        print(f"wrote {args.out}/study.json, study.md, study.png")
        return 0
    if args.command == "bench":
        from pipeline.bench.suite import main as bench

        out = args.out or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}"
        print(bench(args.quick, out, args.transports, args.repeats, args.headline_only))
        print(f"wrote {out}/bench.json, bench.md, bench.png")
        return 0
    if args.command == "prepare":
        from pipeline.sources.dataset import PrepareOptions
        from pipeline.sources.prepare import prepare, summary

        options = PrepareOptions(size=args.size, channels=args.channels, fit=args.fit, encoding=args.encoding,
                                 quality=args.quality, labels=args.labels, group_frames=args.group_frames)
        print(summary(prepare(args.sources, args.out, options, args.strict, args.address, args.workers)))
        return 0
    if args.command == "control":
        return _control(args.run_dir, args.action, args.json, args.interval)
    if args.command == "report":
        from pipeline.rundir import RunDir

        run = RunDir(args.run_dir)
        if not run.read_metrics().num_rows:
            raise ConfigError(f"{args.run_dir}: no metrics to plot")
        print(f"wrote {run.plot_losses()}")
        return 0
    if args.command in ("serve", "push"):
        return _ingest(args)
    raise AssertionError(f"unknown command {args.command}")


def _ingest(args: argparse.Namespace) -> int:
    """`lamina serve` and `lamina push` (pipeline/ingest/)."""
    import grpc

    if args.command == "serve":
        from pipeline.ingest.serve import ServeOptions, serve

        opts = ServeOptions(args.listen, args.token_file, args.tls_cert, args.tls_key, args.when_full,
                            args.buffer_clips, args.memory_clips, args.negative_gap, args.channels,
                            args.max_message_mb)
        if args.resume:
            outcome = serve(config_from_args(args), opts, resume_dir=args.resume, given=given_settings(args))
        else:
            outcome = serve(config_from_args(args), opts)
        print(f"run directory: {outcome.path}")
        if outcome.stopped_at is not None:
            print(f"stopped after {outcome.stopped_at} micro-batches (checkpoint written)")
        print(f"next: lamina probe --run-dir {outcome.path} --data SPEC (labelled frames like those pushed)")
        return 0
    from pipeline.ingest.push import push, streams_of, summary
    from pipeline.ingest.serve import read_token

    token = read_token(args.token_file)
    if token is None:
        raise ConfigError("no token: give --token-file FILE or set LAMINA_INGEST_TOKEN")
    ca = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            ca = f.read()
    streams = streams_of(args.source, args.size, args.one_stream, args.prefix)
    try:
        replies = push(args.to, token, streams, encoding=args.encoding, fps=args.fps or None, tls_ca=ca,
                       loops=args.loops)
    except grpc.RpcError as e:
        print(f"lamina push: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(summary(replies))
    return 0


def _probe_finished(run_dir: str) -> None:
    """The end of `lamina train`: what the run learned, per layer, next to the same network at random init."""
    from pipeline.errors import DataError
    from pipeline.evaluation.probe import format_table, probe

    try:
        report = probe(run_dir, None, None, PROBE_FRACTION, progress=True)
    except (ConfigError, DataError) as e:  # data a probe cannot use (no labels, too few sequences): say so
        print(f"no probe of this run: {e}")
        return
    print(format_table(report))
    print(f"(lamina probe --run-dir {run_dir} computes the same table again)")


def _control(run_dir: str, action: str, as_json: bool = False, interval: float = 1.0) -> int:
    import grpc

    from pipeline.control.server import ControlClient

    client = ControlClient(run_dir)
    try:
        if action == "watch":
            for update in client.watch(interval):
                print(_status_json(update, indent=None) if as_json else _status_table(update) + "\n", flush=True)
            return 0
        reply = getattr(client, action)()
    except grpc.RpcError as e:
        print(f"lamina control: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    finally:
        client.close()
    if action == "status" and as_json:
        print(_status_json(reply))
    elif action == "status":
        print(_status_table(reply))
    elif action == "checkpoint":
        print(reply.detail)
    else:
        print("stopping: the run drains, checkpoints and exits" if reply.accepted else "already stopping")
    return 0


def _status_json(reply: Any, indent: int | None = 1) -> str:
    from google.protobuf.json_format import MessageToDict

    return json.dumps(MessageToDict(reply, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True), indent=indent)


def _status_table(reply: Any) -> str:
    """`lamina control status`: the run on one line, then a row per stage with its layers' loss and spread."""
    last = reply.last_checkpoint if reply.last_checkpoint >= 0 else "none"
    lines = [f"{reply.run_dir}: {reply.engine}, {reply.steps_done}/{reply.steps_total} micro-batches, "
             f"{reply.microbatches_per_s:.2f} micro-batches/s since start, last checkpoint {last}"
             + (f", {reply.checkpoint_failures} checkpoint(s) failed" if reply.checkpoint_failures else "")
             + (", stopping" if reply.stopping else ""),
             f"{'stage':>5}  {'layer':>5}  {'micro-batch':>11}  {'loss':>8}  {'spread':>6}  {'mb/s':>6}  {'busy':>5}"]
    layers = {lr.layer: lr for lr in reply.layers}
    for st in reply.stages:
        for i, k in enumerate(st.layers):
            lr = layers.get(k)
            stage = (f"{st.stage:>5}", f"{st.micro_batch:>11}", f"{st.microbatches_per_s:>6.1f}",
                     f"{st.busy:>5.0%}") if i == 0 else (" " * 5, " " * 11, " " * 6, " " * 5)
            loss = f"{lr.loss:>8.4f}  {lr.spread:>6.3f}" if lr else f"{'-':>8}  {'-':>6}"
            lines.append(f"{stage[0]}  {k + 1:>5}  {stage[1]}  {loss}  {stage[2]}  {stage[3]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
