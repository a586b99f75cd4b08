"""``python -m mapmg_data_engineer_takehome.healthcheck``: exit 0 when /health answers 200.

For container HEALTHCHECKs: it needs nothing but Python (slim images have no curl) and reads
the same settings as the server, so it asks the port the server listens on.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from .settings import SettingsError, load_settings

TIMEOUT_SECONDS = 3.0


def health_url(host: str, port: int) -> str:
    """Where the server answers locally: a wildcard or 'localhost' bind is reached on loopback."""
    if host in ("0.0.0.0", "localhost", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/health"


def main() -> int:
    try:
        settings = load_settings([])
    except SettingsError as error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    url = health_url(settings.host, settings.port)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            healthy = response.status == 200
    except (urllib.error.URLError, OSError) as error:
        print(f"unhealthy: {url}: {error}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
