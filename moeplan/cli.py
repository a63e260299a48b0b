"""The `moeplan` command line: thin typer commands that parse, call the library, render.

Each family of commands lives in `moeplan/commands/<family>.py` and registers itself on the
app; this file only wires them together. Library errors become one red line and an exit
code in `moeplan.commands.guard`, so CliRunner tests see exactly what a user sees; usage
errors (a missing or malformed option) are turned into one line here.
"""

from __future__ import annotations

import sys

import typer

try:  # typer >= 0.20 vendors click; older releases use the click package
    from typer._click import exceptions as click
except ImportError:  # pragma: no cover
    from click import exceptions as click  # type: ignore[no-redef]

from moeplan.commands import FAMILIES, guard
from moeplan.validate import host_allocator

app = typer.Typer(
    name="moeplan",
    help="Plan, predict and verify how MoE training is sharded over a data x expert x model mesh.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    guard.set_debug(debug)
    # glibc's adaptive thresholds page the planner's per-block numpy temporaries in afresh
    # (scoring 10^6 plans 0.62 s instead of 0.34 s, 2026-12-02); pinned, they are recycled
    host_allocator.pin()


for _register in FAMILIES:
    _register(app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: usage errors print as one line plus a pointer to --help."""
    try:
        code = app(args=argv, standalone_mode=False)
    except click.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else "", err=False)
        sys.exit(0)
    except click.UsageError as e:
        command = e.ctx.command_path if e.ctx else "moeplan"
        guard.error_line(f"{e.format_message()} (see '{command} --help')")
        sys.exit(e.exit_code)
    except click.ClickException as e:
        guard.error_line(e.format_message())
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        guard.error_line("aborted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
