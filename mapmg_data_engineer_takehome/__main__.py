"""``python -m mapmg_data_engineer_takehome``: flags → Settings → logging → serve."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

import structlog

from .errors import StartupError
from .logs import configure_logging
from .settings import SettingsError, load_settings
from .workers import run_event_loop, serve, supervise


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the server; the exit status is 0 after a clean shutdown."""
    try:
        settings = load_settings(argv)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings)
    try:
        if settings.worker_count > 1:
            return supervise(settings)
        run_event_loop(serve(settings))
    except StartupError as error:
        structlog.get_logger("kv").error("startup_failed", reason=str(error))
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
