"""The command line: one error boundary, then the commands of each module below."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence

import click

from audience_sync.cli import admin, builder, daemon, deliveries, engine, housekeeping, ui
from audience_sync.cli.common import app
from audience_sync.errors import AudienceSyncError
from audience_sync.process import tune_garbage_collector

__all__ = ["app", "main"]

# The command modules register themselves on `app` when imported.
_COMMAND_MODULES = (admin, engine, deliveries, daemon, ui, builder, housekeeping)


def main(argv: Sequence[str] | None = None) -> None:
    tune_garbage_collector()
    args = hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    verbose = any(a in ("-v", "--verbose") for a in args)
    try:
        result = app(args=args, prog_name="audience-sync", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        print("audience-sync: interrupted", file=sys.stderr)
        sys.exit(130)
    except click.UsageError as exc:
        hint = f" (see: audience-sync {exc.ctx.command_path.split(' ', 1)[-1]} --help)" \
            if exc.ctx and " " in exc.ctx.command_path else " (see: audience-sync --help)"
        print(f"audience-sync: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as exc:
        print(f"audience-sync: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except AudienceSyncError as exc:
        if verbose:
            traceback.print_exc()
        print(f"audience-sync: error: {_chain(exc)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("audience-sync: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if verbose:
            traceback.print_exc()
        print(f"audience-sync: unexpected error: {type(exc).__name__}: {exc}"
              " (run with -v for the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


# Options of the whole program that may also be given after the command
# (`audience-sync sync --log-format json -v`); the ones taking a value are listed True.
GLOBAL_OPTIONS = {"-v": False, "--verbose": False, "-q": False, "--quiet": False,
                  "--log-format": True}


def hoist_global_options(args: list[str]) -> list[str]:
    """Move the global options given after the command in front of it, where click reads
    them; everything after `--` stays where it is."""
    hoisted: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        name = arg.split("=", 1)[0]
        if name in GLOBAL_OPTIONS:
            takes_value = GLOBAL_OPTIONS[name] and "=" not in arg
            hoisted += args[i:i + 2] if takes_value else [arg]
            i += 2 if takes_value else 1
            continue
        rest.append(arg)
        i += 1
    return hoisted + rest


def _chain(exc: AudienceSyncError) -> str:
    return exc.message.replace("\n", " ")


if __name__ == "__main__":  # pragma: no cover
    main()

