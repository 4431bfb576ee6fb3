"""``gpuarb``: a thin click layer over the library.

Each command parses its arguments, calls one library function, renders the answer (text,
or JSON with ``--json``) and maps exceptions: a domain error prints ``Error: …`` and exits 1;
bad usage exits 2 (click); a traceback only with ``--debug``. Every option has an
environment twin (``GPUARB_<OPTION>``, click's ``auto_envvar_prefix``) because Slurm starts
hooks with no arguments.

Exit codes (documented in the README):

====  =====================================================================
0     success; for ``lease request``: granted or degraded
1     error (``Error: …``): bad spec, bad config, ledger or telemetry failure
2     usage error (unknown option, missing argument)
3     ``lease request``: not granted now (*wait*): retry later or accept less (``min=``)
4     ``lease request``: denied: can never fit on this node as configured
====  =====================================================================
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import click

from ..errors import GpuArbError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_WAIT = 3
EXIT_DENIED = 4


class GpuArbGroup(click.Group):
    """Maps domain exceptions to ``Error: …`` lines instead of tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except GpuArbError as e:
            if _debug(ctx):
                traceback.print_exc()
            click.echo(f"Error: {e}", err=True)
            ctx.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            click.echo("Error: interrupted", err=True)
            ctx.exit(130)
        except Exception as e:  # a bug: say so in one line, keep the traceback for --debug
            if _debug(ctx):
                traceback.print_exc()
            click.echo(f"Error: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback "
                       "and report it)", err=True)
            ctx.exit(EXIT_ERROR)


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.params.get("debug")) if root.params else False


def main() -> None:
    """Console-script entry point."""
    from .commands import cli

    try:
        cli.main(prog_name="gpuarb", auto_envvar_prefix="GPUARB")
    except UnicodeEncodeError:  # a terminal that cannot show the text: never a traceback
        sys.stderr.write("Error: the output could not be encoded for this terminal; set LANG=C.UTF-8\n")
        sys.exit(EXIT_ERROR)


# Last, once the names above exist: registers `gpuarb services` and `gpuarb route` on the group in .commands.
from . import services as _services  # noqa: E402,F401
