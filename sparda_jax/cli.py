"""What every command-line entry point shares: bad input is one `error: ...` line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from sparda_jax.errors import SpardaError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse prints its usage block and exits; we promise one line, so its complaints become SpardaErrors."""

    def error(self, message: str):
        raise SpardaError(message)


def run_main(run: Callable[[], int | None]) -> None:
    """Runs a CLI body and exits with its code; SpardaError -> `error: ...` and exit 2."""
    try:
        code = run() or 0
    except SpardaError as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    sys.exit(code)
