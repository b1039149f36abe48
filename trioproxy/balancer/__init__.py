"""Load balancing across a gateway key's pool of provider keys: strategies, key health, failover and retries.

The sans-IO core (:mod:`.strategies`, :mod:`.health`, :mod:`.ratelimit_headers`, :mod:`.retry`,
:mod:`.balancer`) imports no trio; :mod:`.shared_state` (Redis) and :mod:`.active_checks` (token-free key tests)
are the thin I/O around it. Import those two from their modules: they pull in coredis and httpcore.
"""

from trioproxy.balancer.balancer import Balancer, Pick
from trioproxy.balancer.health import AttemptKind, AttemptResult, HealthPolicy, KeyState, Transition
from trioproxy.balancer.retry import RetryBudget, RetryPolicy, backoff_delay, is_retryable
from trioproxy.balancer.strategies import STRATEGY_NAMES

__all__ = [
    "STRATEGY_NAMES",
    "AttemptKind",
    "AttemptResult",
    "Balancer",
    "HealthPolicy",
    "KeyState",
    "Pick",
    "RetryBudget",
    "RetryPolicy",
    "Transition",
    "backoff_delay",
    "is_retryable",
]
