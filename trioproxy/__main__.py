"""``python -m trioproxy``: the same command line as the ``trioproxy`` console script."""

from __future__ import annotations

from trioproxy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
