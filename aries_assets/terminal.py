"""Where an in-process run reports progress when `aries sync` runs it from a terminal.

`aries sync` executes each change stream's Dagster job in its own process; the job's
op finds the terminal's listener here, and tells it each collection's progress and, once
synced, its outcome (or its error). In the daemon nothing is registered and progress goes
to the run's log only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# (collection label, event name, details) -> None
listener: Callable[[str, str, dict[str, Any]], None] | None = None
shows_totals = False  # the listener draws progress against a total (an ETA): worth a count


def tell(label: str, event: str, **details: Any) -> None:
    if listener is not None:
        listener(label, event, details)
