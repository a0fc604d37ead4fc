"""What every command line shares: logging set up once, --config and verbosity flags, config building."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from imgfeat.metadata.config import Config, load_config


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Configure the root logger once, for the process that runs a command."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("py4j", "botocore", "s3fs", "aiobotocore", "urllib3", "fsspec", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_py4j_retry_notice)


def _drop_py4j_retry_notice(record: logging.LogRecord) -> bool:
    """Drop py4j's INFO traceback for a pooled connection it then reopens successfully.

    Forked DataLoader workers close the gateway sockets they inherit, so the driver's next Spark call
    after featurize finds one pooled connection reset; py4j retries it on a fresh connection and logs the
    first attempt on the root logger at INFO. A retry that fails is logged at ERROR and still shows.
    """
    return not (record.levelno == logging.INFO and record.name == "root"
                and record.getMessage() == "Exception while sending command.")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config file (configs/*.toml); flags override it")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="set any config key, typed as in TOML (repeatable), e.g. --set pca.k=32 "
                             "--set featurize.model=resnet18; stage flags win over it")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def build_config(args: argparse.Namespace, overrides: dict[str, dict[str, Any]]) -> Config:
    """Load ``--config`` and apply flag ``overrides`` (flags left at None are ignored)."""
    return load_config(getattr(args, "config", None), overrides, getattr(args, "settings", None))


class StageFailed(RuntimeError):
    """A stage failed for a reason its message fully explains (e.g. torchrun exited non-zero): exit 1, one line."""


def report_errors(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; an expected error prints one ``imgfeat: error: ...`` line without a traceback.

    Exit 2 for a bad option or a missing/forbidden path, 1 for a stage that failed (``StageFailed``), 130 for
    Ctrl-C. ``-v`` prints the traceback too, for bug reports.
    """
    try:
        return func(args)
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError, StageFailed) as exc:
        if getattr(args, "verbose", 0):
            import traceback

            traceback.print_exc()
        kind = "" if isinstance(exc, (ValueError, StageFailed)) else f"{type(exc).__name__}: "
        print(f"imgfeat: error: {kind}{exc}", file=sys.stderr)
        return 1 if isinstance(exc, StageFailed) else 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback per process (every stage resumes on a rerun)
        if getattr(args, "verbose", 0):
            import traceback

            traceback.print_exc()
        print("imgfeat: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def run_command(prog: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                func: Callable[[argparse.Namespace], int], argv: list[str] | None = None) -> int:
    """Entry point of a single-command module (``python -m <stage>``)."""
    parser = argparse.ArgumentParser(prog=prog)
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    return report_errors(func, args)
