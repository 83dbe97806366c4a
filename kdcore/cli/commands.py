"""The ``kdcore`` command line: train, capture, demo, plugins, list (and plugin commands).

Exit status: 0 on success, 2 for a usage or configuration error (one line, no
traceback), 1 for a failure while running (``--debug`` or ``KDCORE_DEBUG=1``
shows the traceback), 130 when interrupted (SIGINT), 143 when terminated
(SIGTERM, as schedulers send): both leave a run that continues with ``--resume``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence

from kdcore.common.env import env_flag
from kdcore.common.errors import ConfigError, PluginError, RunFailure, UnknownComponentError
from kdcore.common.version import VERSION
from kdcore.plugins.hookspecs import KINDS


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds like an interrupt."""


def _tell(line: str) -> None:
    """Write one line to standard error in one write: the lines of several ranks of a
    ``torchrun`` job, which share the stream, never interleave within a line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _cmd_train(args) -> int:
    from kdcore.engine import default_out_dir, train

    out = default_out_dir(args.config) if args.out is None else args.out
    summary = train(args.config, out, args.set, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
    from kdcore.engine.distributed import torchrun_env
    from kdcore.engine.loop import summary_line

    if not torchrun_env().is_main:  # under torchrun the job has one summary, rank 0's
        return 0
    print(summary_line(summary) + f"; run directory {out}")
    return 0


def _cmd_capture(args) -> int:
    """``kdcore capture``; an interrupted capture continues when the same command runs again
    (not with ``--resume``, which is training's), and says so."""
    from kdcore.engine.capture import capture

    again = "run the same kdcore capture command again to continue"
    overrides = _capture_overrides(args)
    try:
        m = capture(args.config, args.out, overrides, top_k=args.top_k, sample=args.sample, values=args.values,
                    batch_size=args.batch_size, shard_samples=args.shard_samples, quiet=args.quiet)
    except Terminated:
        _tell(f"kdcore: terminated by SIGTERM ({again})")
        return 143
    except KeyboardInterrupt:
        _tell(f"kdcore: interrupted ({again})")
        return 130
    if not args.quiet and m.get("complete"):
        kept = (f"K = {m['k']} draws from the teacher over {m['num_classes']} classes" if m.get("kind") == "sample"
                else f"k = {m['k']} of {m['num_classes']}")
        stored = m.get("stored_positions", m["n"] * m["positions"])
        dropped = f"; {stored} positions stored (those whose target is not -100)" if m.get("drops_ignored") else ""
        print(f"store {args.out}: {m['n']} samples x {m['positions']} position(s), {kept}, "
              f"{m['layout']['record_bytes']} bytes per position{dropped}")
    return 0


def _capture_overrides(args) -> list[str]:
    """``--set`` plus ``teacher=NAME`` (keep only that teacher) for ``--teacher NAME``, or for
    the only ``[teachers.NAME]`` table; a config with several teachers needs ``--teacher``."""
    if args.teacher is not None:
        return [*args.set, f"teacher={args.teacher}"]
    from kdcore import config as cfg

    teachers = cfg.load(args.config, args.set).teachers or {}
    if len(teachers) > 1:
        raise ConfigError(f"--teacher: {args.config} has {len(teachers)} teachers ({', '.join(teachers)}); "
                          "name the one to capture with --teacher NAME")
    return [*args.set, *(f"teacher={name}" for name in teachers)]


def _cmd_demo(args) -> int:
    from kdcore.cli.demo import find_demo
    from kdcore.engine.rundir import check_out, clear_run, holds_run

    run_demo = find_demo(_registry(), args.name)
    out = check_out(args.out or ("runs/demo" if args.name is None else f"runs/demo-{args.name}"))
    earlier = [d for d in sorted(out.iterdir()) if d.is_dir() and holds_run(d)] if out.is_dir() else []
    if earlier and not args.overwrite:
        raise ConfigError(f"--out: {out} holds an earlier demo ({', '.join(d.name for d in earlier)}); "
                          "replace it with --overwrite or choose another --out")
    for d in earlier:
        clear_run(d)
    run_demo(out, quiet=args.quiet)
    return 0


def _registry():
    from kdcore.plugins import default_registry

    return default_registry()


def _cmd_plugins(args) -> int:
    reg = _registry()
    plugins = [{"name": p.name, "distribution": p.dist, "version": p.version,
                "registered": {k: sorted(c.name for c in p.components if c.kind == k)
                               for k in KINDS if any(c.kind == k for c in p.components)}}
               for p in reg.plugins]
    failed = [{"name": f.name, "distribution": f.dist, "version": f.version, "reason": f.reason}
              for f in reg.failed]
    if args.json:
        print(json.dumps({"plugins": plugins, "failed": failed}, indent=2))
        return 0
    for p in plugins:
        print(f"{p['name']} ({p['distribution'] or '?'} {p['version'] or ''})".rstrip())
        for kind, names in p["registered"].items():
            print(f"  {kind}: {', '.join(names)}")
    for f in failed:
        print(f"{f['name']} FAILED: {f['reason']}")
    return 0


def _cmd_list(args) -> int:
    reg = _registry()
    kinds = [args.kind] if args.kind else list(KINDS)
    table = {k: reg.available(k) for k in kinds}
    if args.json:
        detail = {k: [{"name": n, "plugin": reg.get(k, n).plugin} for n in names] for k, names in table.items()}
        print(json.dumps(detail if not args.kind else detail[args.kind], indent=2))
        return 0
    for kind, names in table.items():
        if args.kind:
            print("\n".join(names))
        else:
            print(f"{kind}: {', '.join(names)}")
    return 0


def _cmd_new_plugin(args) -> int:
    from kdcore.cli.scaffold import new_plugin

    path = new_plugin(args.name, args.kind or ["loss"], args.out)
    where = str(path) if path.is_absolute() else f"./{path}"
    print(f"wrote {where}\n"
          f"next: pip install -e \"{where}[test]\" && pytest {where}   (its tests need it installed)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdcore", description="Plugin-based knowledge distillation for PyTorch.")
    parser.add_argument("--version", action="version", version=f"kdcore {VERSION}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a student (or a teacher) from a TOML config")
    p.add_argument("config", help="the run's TOML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set run.epochs=5 --set loss[1].temperature=2")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the results of an earlier run in <out> (refused otherwise)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("capture", help="run a config's teacher over the training split once and store its top-k "
                       "or draws from it")
    p.add_argument("config", help="the training config (its [data] and [teacher])")
    p.add_argument("--out", required=True, help="the store's directory (an interrupted capture continues there)")
    kept = p.add_mutually_exclusive_group()
    kept.add_argument("--top-k", type=int, default=None, metavar="K",
                      help="ids kept per position (default: 128, at most the number of classes)")
    kept.add_argument("--sample", type=int, default=None, metavar="K",
                      help="instead of the top k: K ids drawn from the teacher per position, weighted by their "
                           "counts (unbiased for kd at temperature 1)")
    p.add_argument("--values", choices=("auto", "float32", "float16", "uint8"), default="auto",
                   help="coding of the kept log-probabilities (auto: float32 when K is every class, else uint8)")
    p.add_argument("--batch-size", type=int, default=None, help="teacher batch size (default: run.eval_batch_size)")
    p.add_argument("--shard-samples", type=int, default=None, help="samples per shard file (default: ~64 MiB)")
    p.add_argument("--teacher", default=None, metavar="NAME",
                   help="the teacher to capture, of a config with [teachers.NAME] tables")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_capture)

    p = sub.add_parser("demo", help="teacher + students on the embedded gaussian_mixture data (offline)")
    p.add_argument("name", nargs="?", default=None,
                   help="a plugin's demo instead, e.g. 'lm' (kdcore-lm: synthetic_lm, KL to the true law)")
    p.add_argument("--out", default=None,
                   help="where the demo's runs go (default: runs/demo, or runs/demo-NAME)")
    p.add_argument("--overwrite", action="store_true", help="delete the runs of an earlier demo in <out>")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    p.set_defaults(handler=_cmd_demo)

    p = sub.add_parser("plugins", help="installed plugins, what each registered, and failures")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_plugins)

    p = sub.add_parser("list", help="registered component names")
    p.add_argument("kind", nargs="?", choices=KINDS)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_list)

    p = sub.add_parser("new-plugin", help="write a ready plugin package kdcore-NAME (sample components, tests)")
    p.add_argument("name", metavar="NAME", help="the plugin's name, e.g. my-loss (package kdcore_my_loss)")
    p.add_argument("--kind", action="append", choices=("loss", "divergence", "transform", "scheduler", "backbone",
                                                       "dataset"),
                   help="a sample component's kind; repeat it for several in one package (default: loss)")
    p.add_argument("--out", default=".", help="the directory that receives kdcore-NAME/ (default: .)")
    p.set_defaults(handler=_cmd_new_plugin)
    return parser, sub


def _add_plugin_commands(sub) -> None:
    reg = _registry()
    if reg.hooks is None:
        return
    for impl in reg.hooks.hook.register_commands.get_hookimpls():
        try:
            impl.function(cli=sub)
        except Exception as exc:  # a broken plugin command is reported, not fatal
            _tell(f"warning: plugin {impl.plugin_name!r} could not add its commands: {exc}")


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated


@contextlib.contextmanager
def _sigterm_unwinds():
    """While the command runs, SIGTERM raises :class:`Terminated` (main thread only)."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _ReaderMayLeave:
    """A standard stream whose reader may leave before the command ends (``kdcore list
    loss | head -1``, ``kdcore train CONFIG 2>&1 | head``). The first write or flush that
    meets the closed pipe points the stream's descriptor at the null device: the command
    goes on to its end (a training run still writes its whole run directory) and exits as
    it would have, and what nobody reads is dropped, not raised as BrokenPipeError."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._reader_left()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_left()

    def _reader_left(self) -> None:
        """The descriptor to the null device, where the stream's buffered text drains
        (so the interpreter's last flush at exit does not meet the closed pipe either)."""
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self._stream.fileno())
        finally:
            os.close(null)
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _closed_pipes_tolerated():
    """While the command runs, ``sys.stdout`` and ``sys.stderr`` tolerate a reader that
    leaves (:class:`_ReaderMayLeave`); at the end both are flushed through it."""
    saved = sys.stdout, sys.stderr
    guards = [_ReaderMayLeave(s) if s is not None else None for s in saved]
    sys.stdout, sys.stderr = guards
    try:
        yield
    finally:
        for guard in guards:
            if guard is not None:
                guard.flush()
        sys.stdout, sys.stderr = saved


def run() -> None:
    """The ``kdcore`` console script and ``python -m kdcore``: :func:`main` on the process's
    arguments, then the process ends. The interpreter's teardown is spared its garbage
    collections (``gc.freeze``): once TorchDynamo is loaded (every torch optimizer loads it)
    they walk some 300,000 objects, about 0.9 s of every run's end on the CPU. A process
    that joined a ``torchrun`` process group skips that teardown altogether
    (:func:`kdcore.engine.distributed.leave`): torch's worker threads may outlive the group."""
    code = main()
    distributed = sys.modules.get("kdcore.engine.distributed")  # not loaded: no group was joined
    if distributed is not None and distributed.joined():
        distributed.leave(code)
    gc.freeze()
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command of ``argv`` (default: the process's arguments); returns the exit
    status. A closed standard output or error is no failure (:class:`_ReaderMayLeave`)."""
    with _closed_pipes_tolerated():
        return _run_command(argv)


def _run_command(argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run its command, each kind of failure turned into its exit status."""
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    debug = False
    try:
        with _sigterm_unwinds():
            debug = env_flag("KDCORE_DEBUG")
            parser, sub = build_parser()
            _add_plugin_commands(sub)
            args = parser.parse_args(argv)
            debug = debug or args.debug
            if args.command is None:
                parser.print_help()
                return 2
            return int(args.handler(args) or 0)
    except (ConfigError, UnknownComponentError) as exc:
        _tell(f"kdcore: error: {exc}")
        return 2
    except Terminated:
        _tell("kdcore: terminated by SIGTERM (a training run continues with --resume)")
        return 143
    except KeyboardInterrupt:
        _tell("kdcore: interrupted (a training run continues with --resume)")
        return 130
    except RunFailure as exc:
        _tell(f"kdcore: failed: {exc}")
        if debug:
            traceback.print_exc()
        return 1
    except PluginError as exc:
        _tell(f"kdcore: plugin error: {exc}")
        if debug:
            traceback.print_exc()
        return 1
    except Exception as exc:
        _tell(f"kdcore: failed: {type(exc).__name__}: {exc}")
        if debug:
            traceback.print_exc()
        else:
            _tell("(run with --debug for the traceback)")
        return 1
