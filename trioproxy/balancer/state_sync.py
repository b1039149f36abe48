"""Provider key states as they travel between processes: what a state change says, and how another adopts it.

Two transports carry them: Redis between gateway instances (:mod:`trioproxy.balancer.shared_state`) and the
supervisor between the workers of one instance (:mod:`trioproxy.coordinator`). Both send the same fields, one
flat string mapping per key::

    state  deadline (unix time, "" for none)  reason  changed_at (unix time)  ejections  origin

A process shares the changes its own traffic decided: not those a deadline made (every process sees its own
timers run out), not HALF_OPEN (a process's own trial), and not those it adopted from others. Deadlines travel as
wall-clock times and become ``trio.current_time()`` offsets on arrival, so clocks need only agree to NTP
accuracy; :meth:`Balancer.apply_remote` adopts a state only when it is newer than what the process knows.

Pure code: no I/O; the clocks are arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from trioproxy.balancer.balancer import Balancer
from trioproxy.balancer.health import KeyState, Transition

logger = logging.getLogger(__name__)

# Adopting these needs no local event; HALF_OPEN is a process's own business (its trial, its timer).
SHARED_STATES = frozenset({KeyState.ACTIVE, KeyState.COOLING_DOWN, KeyState.EJECTED, KeyState.INVALID})


def transition_fields(balancer: Balancer, transition: Transition, origin: str) -> dict[str, str] | None:
    """The fields to share for ``transition``, or None when it is not for sharing (see the module doc)."""
    if transition.remote or transition.timer or transition.new not in SHARED_STATES:
        return None
    changed_at = balancer.changed_at(transition.key_id)
    if changed_at is None:
        return None
    deadline = "" if transition.deadline is None else repr(changed_at + transition.deadline - transition.at)
    return {
        "state": transition.new.value,
        "deadline": deadline,
        "reason": transition.reason,
        "changed_at": repr(changed_at),
        "ejections": str(transition.ejections),
        "origin": origin,
    }


def adopt_fields(
    balancer: Balancer, key_id: int, fields: Mapping[str, Any], *, origin: str, wall_now: float, now: float
) -> bool:
    """Hand another process's state of ``key_id`` to the balancer; True when it was adopted.

    ``origin`` is this process's own id (its own changes coming back are ignored); ``wall_now`` is
    ``time.time()`` and ``now`` is ``trio.current_time()`` at the same moment."""
    if fields.get("origin") == origin:
        return False
    try:
        state = KeyState(fields["state"])
        changed_at = float(fields["changed_at"])
        ejections = int(fields.get("ejections") or 0)
        deadline = float(fields["deadline"]) if fields.get("deadline") else None
    except (KeyError, ValueError):
        logger.debug("ignoring a malformed shared state for provider key %d", key_id)
        return False
    if state not in SHARED_STATES:
        return False
    if deadline is not None and deadline <= wall_now and state in (KeyState.COOLING_DOWN, KeyState.EJECTED):
        deadline = wall_now  # already over: adopt it and let the timer move it on at once
    return balancer.apply_remote(
        key_id,
        state,
        deadline_in=None if deadline is None else deadline - wall_now,
        reason=str(fields.get("reason", "")),
        changed_at=changed_at,
        ejections=ejections,
        now=now,
    )
