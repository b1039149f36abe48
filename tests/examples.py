"""How many examples a property test runs: its local count, multiplied under CI=true.

Property tests name their own example counts (some are cheap, some drive sockets or databases); CI runs each of
them ``CI_MULTIPLIER`` times as hard, as the developers' guide asks.
"""

from __future__ import annotations

import os

CI_MULTIPLIER = 3


def examples(local: int) -> int:
    return local * CI_MULTIPLIER if os.environ.get("CI") == "true" else local
