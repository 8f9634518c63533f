"""The ``selfattn`` command line.

Library commands live here. The upper layers (``data_checks``, ``flows``) contribute their
commands through the ``selfattn.cli`` entry-point group, so this module never imports them.
Heavy libraries (torch, prefect, mlflow, ...) are imported inside the commands, keeping
``selfattn --help`` fast.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import typer

from selfattn.errors import UserError

app = typer.Typer(
    name="selfattn",
    help="Self-attention models and the pipeline that trains, tunes, evaluates, registers and promotes them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Self-attention models and the pipeline that trains, tunes, evaluates, registers and promotes them."""


@app.command()
def version() -> None:
    """Print the selfattn version."""
    from selfattn import __version__

    print(__version__)


def _register_plugins() -> None:
    for ep in entry_points(group="selfattn.cli"):
        try:
            register = ep.load()
        except ImportError as exc:  # an optional layer that is not installed
            print(f"warning: CLI plugin {ep.name!r} could not be loaded: {exc}", file=sys.stderr)
            continue
        register(app)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: user mistakes become one paragraph and a non-zero exit."""
    _register_plugins()
    try:
        app(args=argv, standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except typer.exceptions.TyperException as exc:  # usage errors: bad option, missing argument
        if hasattr(exc, "show"):
            exc.show()
        return getattr(exc, "exit_code", 2)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
