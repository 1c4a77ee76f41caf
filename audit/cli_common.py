"""What every ``underfire`` command shares: one 'Error:' line per known failure with its exit status, an
internal error said to be one, and the documented exit codes."""

from __future__ import annotations

import functools
import sys

import click
from underfire.guard.errors import UnderfireError

KNOWN_ERRORS = (UnderfireError, OSError)  # bad input a user can fix; anything else is an internal error
INTERNAL = 70  # EX_SOFTWARE: a bug, not bad input
EXIT_CODES = """Exit status: 0 the audit measured the deployment (and it is within --fail-above); 1 an error
(bad setting, model, data or folder; one 'Error:' line); 2 a usage error of the command line; 3 the
headline spoofability is above --fail-above; 4 the audit could not measure the deployment (refused before
the attacks, or a target marked INCONCLUSIVE after them) and passes no gate — nor does, under --fail-above,
a spoofability measured only from below (transfer / query attacks, a map whose gradient is not its derivative,
a row NOT CONVERGED), an interpreter listed but not attacked, or random weights; 70 an internal error (a bug:
one 'Internal error:' line; -v shows the traceback)."""


class CliError(click.ClickException):
    """One 'Error:' line with the exit status the error carries (1, or 4 for a refused audit)."""

    def __init__(self, exc: Exception) -> None:
        msg = str(exc) if not isinstance(exc, OSError) or not exc.filename else \
            f"{exc.strerror or exc}: {exc.filename}"
        super().__init__(msg)
        self.exit_code = getattr(exc, "exit_code", 1)


def _verbose() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get("verbose"))


def friendly(fn):
    """Turn the library's known errors (and OS errors) into one clear line and their exit status; with -v the
    traceback too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KNOWN_ERRORS as exc:
            if _verbose():
                import traceback

                traceback.print_exc()
            raise CliError(exc) from exc
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 (not bad input: say so, never dress a bug up as one)
            if _verbose():
                import traceback

                traceback.print_exc()
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            click.echo(f"Internal error: {type(exc).__name__}{': ' + msg if msg else ''}. This is a bug in underfire "
                       f"(or in code it called), not a problem with your input; run again with -v for the traceback "
                       f"and report it.", err=True)
            sys.exit(INTERNAL)

    return wrapper


def _echo_progress(p: dict) -> None:
    eta = p["elapsed"] / p["step"] * (p["steps"] - p["step"])
    extra = " ".join(f"{k}={v:.3f}" for k, v in p.get("logs", {}).items())
    click.echo(f"  epoch {p['epoch']}/{p['epochs']} step {p['step']}/{p['steps']} loss {p['loss']:.4f} {extra}"
               f" [{p['elapsed']:.0f}s, eta {eta:.0f}s]", err=True)


