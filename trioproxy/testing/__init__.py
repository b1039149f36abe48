"""Test helpers that ship with trioproxy: a faithful fake of the providers' HTTP APIs.

Used by the end-to-end tests (official SDKs -> gateway -> fake) and by the benchmarks; nothing in the data or
control plane imports this package. The names below are imported lazily, so that
``python -m trioproxy.testing.fake_upstream`` runs the module once (as ``__main__``) and not twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trioproxy.testing.fake_payloads import FakeUsage
    from trioproxy.testing.fake_upstream import CapturedRequest, FakeUpstream, Fault

__all__ = ["CapturedRequest", "FakeUpstream", "FakeUsage", "Fault"]


def __getattr__(name: str) -> object:
    if name == "FakeUsage":
        from trioproxy.testing import fake_payloads

        return fake_payloads.FakeUsage
    if name in __all__:
        from trioproxy.testing import fake_upstream

        return getattr(fake_upstream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
