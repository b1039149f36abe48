"""Key-selection strategies: exact sequences, and hypothesis properties over any weights and any availability."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy.balancer.strategies import (
    STRATEGY_NAMES,
    HealthBest,
    KeyStats,
    LeastInflight,
    PoolState,
    Priority,
    RoundRobin,
    SmoothWeighted,
    cost,
    make_strategies,
)


def keys(weights: Sequence[int], **fields: Sequence[int]) -> list[KeyStats]:
    """Candidates with ids 0..n-1 at positions 0..n-1."""
    out = []
    for i, weight in enumerate(weights):
        extra = {name: values[i] for name, values in fields.items()}
        out.append(KeyStats(key_id=i, position=i, weight=weight, **extra))
    return out


def run(
    strategy: object, candidates: list[KeyStats], picks: int, state: PoolState | None = None
) -> list[int]:
    state = state or PoolState()
    return [strategy.pick(candidates, state) for _ in range(picks)]  # type: ignore[attr-defined]


def letters(ids: list[int]) -> str:
    return " ".join("abcdefghij"[i] for i in ids)


def nginx_swrr(weights: Sequence[int], picks: int) -> list[int]:
    """nginx's ngx_http_upstream_get_peer, verbatim in spirit: the reference the weighted strategy starts from."""
    current = [0] * len(weights)
    total = sum(weights)
    out = []
    for _ in range(picks):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=lambda i: (current[i], -i))
        current[best] -= total
        out.append(best)
    return out


def worst_lag(weights: Sequence[int], sequence: list[int]) -> float:
    """The largest |count - exact share| over every key and every prefix."""
    total = sum(weights)
    counts = [0] * len(weights)
    worst = 0
    for t, chosen in enumerate(sequence, 1):
        counts[chosen] += 1
        for i, w in enumerate(weights):
            worst = max(worst, abs(counts[i] * total - t * w))
    return worst / total


# -- exact sequences ------------------------------------------------------------------------------------------


def test_weighted_5_1_1_is_nginx_smooth_order() -> None:
    assert letters(run(SmoothWeighted(), keys([5, 1, 1]), 7)) == "a a b a c a a"
    assert letters(run(SmoothWeighted(), keys([5, 1, 1]), 14)) == "a a b a c a a a a b a c a a"


@pytest.mark.parametrize(
    "weights", [[5, 1, 1], [3, 2, 1], [1, 1], [2, 1], [1, 1, 1], [1, 1, 1, 1, 1], [7, 1]]
)
def test_weighted_is_nginx_order_for_common_small_pools(weights: list[int]) -> None:
    picks = 3 * sum(weights)
    assert run(SmoothWeighted(), keys(weights), picks) == nginx_swrr(weights, picks)


def test_plain_nginx_drifts_more_than_one_pick_and_ours_does_not() -> None:
    weights = [100, 1, 2, 3, 717, 10, 3, 3, 100, 1, 731, 3]
    assert worst_lag(weights, nginx_swrr(weights, sum(weights))) > 1.4
    assert worst_lag(weights, run(SmoothWeighted(), keys(weights), sum(weights))) < 1


def test_weighted_3_2_1_gives_exact_counts_per_cycle() -> None:
    picks = run(SmoothWeighted(), keys([3, 2, 1]), 600)
    assert Counter(picks) == {0: 300, 1: 200, 2: 100}


def test_round_robin_rotates_in_pool_order() -> None:
    assert run(RoundRobin(), keys([1, 1, 1]), 7) == [0, 1, 2, 0, 1, 2, 0]


def test_round_robin_skips_an_unavailable_key_and_resumes_after_the_last_pick() -> None:
    state = PoolState()
    all_keys = keys([1, 1, 1, 1])
    strategy = RoundRobin()
    assert strategy.pick(all_keys, state) == 0
    assert strategy.pick([all_keys[0], all_keys[2], all_keys[3]], state) == 2  # key 1 left the pool
    assert strategy.pick(all_keys, state) == 3
    assert strategy.pick(all_keys, state) == 0


def test_priority_fills_the_top_tier_and_falls_back() -> None:
    candidates = keys([1, 1, 1], priority=[2, 2, 1])
    assert run(Priority(), candidates, 4) == [0, 1, 0, 1]
    assert run(Priority(), candidates[2:], 2) == [2, 2]  # tier 2 unavailable: tier 1 serves
    by_weight = keys([5, 5, 1])  # no explicit priority: the weight is the tier
    assert set(run(Priority(), by_weight, 10)) == {0, 1}


def test_least_inflight_takes_the_idlest_and_rotates_ties() -> None:
    assert run(LeastInflight(), keys([1, 1, 1], in_flight=[3, 0, 2]), 3) == [1, 1, 1]
    assert run(LeastInflight(), keys([1, 1, 1], in_flight=[1, 1, 1]), 4) == [0, 1, 2, 0]


def test_health_best_cost_formula() -> None:
    fresh = KeyStats(key_id=0, position=0, weight=1)
    assert cost(fresh, 2.0) == pytest.approx(2.0 * 1 / 0.5)  # unknown: fallback latency, 50 % success
    busy = KeyStats(
        key_id=1, position=1, weight=1, in_flight=3, ewma_latency=0.5, window_ok=8, window_failed=0
    )
    assert cost(busy) == pytest.approx(0.5 * 4 / 0.9)
    failing = KeyStats(key_id=2, position=2, weight=1, ewma_latency=0.5, window_ok=0, window_failed=8)
    assert cost(failing) == pytest.approx(0.5 / 0.1)


def test_health_best_prefers_fast_healthy_keys() -> None:
    candidates = keys(
        [1, 1, 1, 1],
        in_flight=[0, 0, 0, 0],
        window_ok=[50, 50, 50, 5],
        window_failed=[0, 0, 0, 45],
    )
    candidates = [
        KeyStats(c.key_id, c.position, 1, 0, latency, c.window_ok, c.window_failed)
        for c, latency in zip(candidates, [0.2, 0.4, 2.0, 0.2], strict=True)
    ]
    picks = Counter(run(HealthBest(random.Random(7)), candidates, 6000))
    assert picks[0] > picks[1] > picks[2]
    assert picks[2] == 0 or picks[3] == 0  # the worst key loses every comparison it is drawn into
    assert picks[0] > 0.4 * 6000


def test_every_name_has_a_strategy() -> None:
    strategies = make_strategies(random.Random(0))
    assert tuple(strategies) == STRATEGY_NAMES
    assert all(strategies[name].name == name for name in STRATEGY_NAMES)


def test_weighted_refuses_candidates_without_weight() -> None:
    with pytest.raises(ValueError):
        SmoothWeighted().pick(keys([0, 0]), PoolState())


# -- properties -----------------------------------------------------------------------------------------------

weights_lists = st.lists(st.integers(min_value=1, max_value=1000), min_size=1, max_size=12)


@given(weights=weights_lists, data=st.data())
def test_weighted_stays_within_one_pick_of_the_exact_share_at_every_prefix(
    weights: list[int], data: st.DataObject
) -> None:
    picks = data.draw(st.integers(min_value=1, max_value=min(2 * sum(weights), 1500)))
    sequence = run(SmoothWeighted(), keys(weights), picks)
    total = sum(weights)
    counts = [0] * len(weights)
    for t, chosen in enumerate(sequence, 1):
        counts[chosen] += 1
        for i, w in enumerate(weights):
            assert abs(counts[i] * total - t * w) < total, (weights, t, i)


@given(
    weights=st.lists(st.integers(min_value=0, max_value=50), min_size=2, max_size=10),
    picks=st.integers(1, 300),
)
def test_weighted_never_chooses_a_zero_weight_key(weights: list[int], picks: int) -> None:
    if not any(weights):
        weights[0] = 1
    chosen = set(run(SmoothWeighted(), keys(weights), picks))
    assert all(weights[i] > 0 for i in chosen)


@given(weights=weights_lists)
def test_weighted_cycle_gives_exact_counts(weights: list[int]) -> None:
    if sum(weights) > 3000:
        weights = [w % 100 + 1 for w in weights]
    sequence = run(SmoothWeighted(), keys(weights), sum(weights))
    assert Counter(sequence) == {i: w for i, w in enumerate(weights)}


@st.composite
def rotation_script(draw: st.DrawFn) -> tuple[int, list[tuple[str, int]]]:
    """A pool size and a script of availability toggles and picks."""
    size = draw(st.integers(min_value=1, max_value=8))
    steps = draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("toggle"), st.integers(0, size - 1)),
                st.tuples(st.just("pick"), st.just(0)),
            ),
            max_size=120,
        )
    )
    return size, steps


@given(script=rotation_script())
def test_round_robin_visits_each_available_key_once_per_cycle(
    script: tuple[int, list[tuple[str, int]]],
) -> None:
    """A cycle is one pass of the cursor around the pool (it ends where the next pick wraps to an earlier
    position). In a cycle no key is picked twice, and a key that was available when the cycle began and was not
    toggled until the next cycle began is picked exactly once."""
    size, steps = script
    available = [True] * size
    strategy, state = RoundRobin(), PoolState()
    all_keys = keys([1] * size)
    picks: list[tuple[int, int, list[bool]]] = []  # (step, chosen key, availability then)
    toggles: list[tuple[int, int]] = []  # (step, key)
    for step, (action, index) in enumerate(steps):
        if action == "toggle":
            available[index] = not available[index]
            toggles.append((step, index))
            continue
        candidates = [k for k in all_keys if available[k.key_id]]
        if not candidates:
            continue
        chosen = strategy.pick(candidates, state)
        assert available[chosen]
        picks.append((step, chosen, list(available)))
    cycles: list[list[tuple[int, int, list[bool]]]] = []
    for pick in picks:
        if not cycles or pick[1] <= cycles[-1][-1][1]:
            cycles.append([])
        cycles[-1].append(pick)
    for cycle, following in itertools.pairwise(cycles):
        visited = [k for _, k, _ in cycle]
        assert len(visited) == len(set(visited))
        begin, availability = cycle[0][0], cycle[0][2]
        end = following[0][0]
        for key in range(size):
            steady = availability[key] and not any(begin < s < end and k == key for s, k in toggles)
            if steady:
                assert key in visited, (picks, toggles, key)


@st.composite
def pools(draw: st.DrawFn) -> list[KeyStats]:
    size = draw(st.integers(min_value=1, max_value=10))
    out = []
    for i in range(size):
        out.append(
            KeyStats(
                key_id=100 + i,
                position=i,
                weight=draw(st.integers(1, 20)),
                in_flight=draw(st.integers(0, 5)),
                ewma_latency=draw(st.none() | st.floats(0.01, 30.0)),
                window_ok=draw(st.integers(0, 50)),
                window_failed=draw(st.integers(0, 50)),
                priority=draw(st.none() | st.integers(0, 3)),
            )
        )
    return out


@given(
    pool=pools(), name=st.sampled_from(STRATEGY_NAMES), seed=st.integers(0, 2**32), picks=st.integers(1, 40)
)
def test_every_strategy_picks_only_candidates_and_is_deterministic(
    pool: list[KeyStats], name: str, seed: int, picks: int
) -> None:
    first = make_strategies(random.Random(seed))[name]
    second = make_strategies(random.Random(seed))[name]
    state = PoolState(last_position=seed % 7 - 1)
    copy = state.copy()
    ids = {k.key_id for k in pool}
    sequence = [first.pick(pool, state) for _ in range(picks)]
    assert set(sequence) <= ids
    assert [second.pick(pool, copy) for _ in range(picks)] == sequence
    assert state == copy


@given(pool=pools(), seed=st.integers(0, 2**32))
def test_health_best_never_picks_the_strictly_worst_key(pool: list[KeyStats], seed: int) -> None:
    known = [k.ewma_latency for k in pool if k.ewma_latency is not None]
    fallback = sum(known) / len(known) if known else 1.0
    costs = sorted(cost(k, fallback) for k in pool)
    strategy = HealthBest(random.Random(seed))
    chosen = {strategy.pick(pool, PoolState()) for _ in range(20)}
    if len(pool) > 1 and costs[-1] > costs[-2]:
        worst = max(pool, key=lambda k: cost(k, fallback)).key_id
        assert worst not in chosen


@given(pool=pools())
def test_least_inflight_and_priority_choose_from_the_right_group(pool: list[KeyStats]) -> None:
    fewest = min(k.in_flight for k in pool)
    chosen = LeastInflight().pick(pool, PoolState())
    assert next(k for k in pool if k.key_id == chosen).in_flight == fewest
    top = max(k.priority if k.priority is not None else k.weight for k in pool)
    chosen = Priority().pick(pool, PoolState())
    picked = next(k for k in pool if k.key_id == chosen)
    assert (picked.priority if picked.priority is not None else picked.weight) == top


@pytest.mark.parametrize("size", [2, 3, 10])
def test_health_best_shares_evenly_between_equal_keys(size: int) -> None:
    picks = Counter(run(HealthBest(random.Random(11)), keys([1] * size), 20000 * size))
    assert set(picks) == set(range(size))
    assert all(abs(count - 20000) < 1500 for count in picks.values()), picks
