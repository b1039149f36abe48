"""The spool: the JSON-lines codec (exact round trip, strict decoding) and the append-only file."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.examples import examples
from trioproxy.records import CostBreakdown, Outcome, RequestRecord, Usage
from trioproxy.spool import RecordCodec, Spool, SpoolError

# -- strategies --------------------------------------------------------------------------------------------

# Every code point, lone surrogates included: the codec must survive whatever a client put in a model name.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
opt_ints = st.none() | ints
floats = st.floats(allow_nan=False)  # inf and -0.0 included
decimals = st.decimals(allow_nan=False)  # keeps exponents: Decimal("1.0") and Decimal("1.00") must stay apart

usages = st.builds(
    Usage,
    input_tokens=ints,
    output_tokens=ints,
    cache_read_tokens=ints,
    cache_write_tokens=ints,
    reasoning_tokens=ints,
    reported=st.booleans(),
    complete=st.booleans(),
    response_model=st.none() | any_text,
)
costs = st.builds(CostBreakdown, input=decimals, output=decimals, cache_read=decimals, cache_write=decimals)
records = st.builds(
    RequestRecord,
    request_id=any_text,
    started_at=floats,
    route=any_text,
    method=any_text,
    path=any_text,
    client_ip=st.none() | any_text,
    gateway_key_id=opt_ints,
    provider_key_id=opt_ints,
    user_id=opt_ints,
    provider_id=opt_ints,
    provider_kind=st.none() | any_text,
    model=st.none() | any_text,
    stream=st.booleans(),
    status=ints,
    outcome=st.sampled_from(Outcome),
    usage=usages,
    usage_partial=st.booleans(),
    cost=st.none() | costs,
    price_missing=st.booleans(),
    ttfb_ms=st.none() | floats,
    duration_ms=st.none() | floats,
    attempts=ints,
    error=st.none() | any_text,
)


def sample_record(i: int = 0, **changes: object) -> RequestRecord:
    record = RequestRecord(
        request_id=f"req-{i:04d}",
        started_at=1_750_000_000.25 + i,
        route="openai.chat_completions",
        method="POST",
        path="/v1/chat/completions",
        client_ip="127.0.0.1",
        gateway_key_id=3,
        provider_key_id=7,
        user_id=1,
        provider_id=2,
        provider_kind="openai",
        model="gpt-4o-mini",
        stream=True,
        status=200,
        outcome=Outcome.OK,
        usage=Usage(input_tokens=12, output_tokens=30, cache_read_tokens=4, reported=True, complete=True),
        cost=CostBreakdown(Decimal("0.0000018"), Decimal("0.000018"), Decimal("0.0000003"), Decimal("0")),
        ttfb_ms=210.5,
        duration_ms=1840.0,
        attempts=1,
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


# -- codec -------------------------------------------------------------------------------------------------


@given(record=records)
@settings(max_examples=examples(300))
def test_codec_round_trip_is_exact(record: RequestRecord) -> None:
    codec = RecordCodec()
    line = codec.encode(record)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1  # one record, one line, whatever the strings hold
    assert line.isascii()
    decoded = codec.decode(line)
    assert decoded == record
    # Equality is not enough: Decimal("1.0") == Decimal("1.00") and -0.0 == 0.0. Re-encoding must give the
    # same bytes, which pins every exponent, sign and float repr.
    assert codec.encode(decoded) == line
    assert type(decoded.outcome) is Outcome
    assert type(decoded.started_at) is float


@given(record=records, data=st.data())
@settings(max_examples=examples(100), suppress_health_check=[HealthCheck.too_slow])
def test_every_torn_prefix_of_a_line_is_rejected(record: RequestRecord, data: st.DataObject) -> None:
    codec = RecordCodec()
    line = codec.encode(record)
    cut = data.draw(st.integers(min_value=0, max_value=len(line) - 2))  # keeps at most all but the closing }
    with pytest.raises(SpoolError):
        codec.decode(line[:cut])


def test_decimal_and_enum_are_written_as_strings_and_values() -> None:
    raw = json.loads(RecordCodec().encode(sample_record(outcome=Outcome.CLIENT_CANCELLED)))
    assert raw["outcome"] == "client_cancelled"
    assert raw["cost"] == {
        "input": "0.0000018",
        "output": "0.000018",
        "cache_read": "3E-7",
        "cache_write": "0",
    }
    assert raw["usage"]["input_tokens"] == 12


def test_unknown_keys_are_ignored_and_missing_optional_fields_take_defaults() -> None:
    codec = RecordCodec()
    raw = json.loads(codec.encode(sample_record()))
    raw["added_by_a_newer_version"] = {"x": 1}
    for name in ("model", "usage", "cost", "attempts"):
        del raw[name]
    decoded = codec.decode(json.dumps(raw).encode())
    assert decoded.model is None
    assert decoded.usage == Usage()
    assert decoded.cost is None
    assert decoded.attempts == 0
    assert decoded.request_id == "req-0000"


def _mutated(**changes: object) -> bytes:
    raw = json.loads(RecordCodec().encode(sample_record()))
    for key, value in changes.items():
        if value is KeyError:
            del raw[key]
        else:
            raw[key] = value
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b"\xff\xfe",
        b"[" * 100_000,  # nesting deep enough for a RecursionError in the parser
        _mutated(_v=2),
        _mutated(_v=KeyError),
        _mutated(request_id=KeyError),  # required, no default
        _mutated(status="200"),
        _mutated(status=True),  # bool is not an int here
        _mutated(stream=1),
        _mutated(started_at=None),
        _mutated(started_at=10**400),  # too large for a float
        _mutated(outcome="teleported"),
        _mutated(usage=[1, 2]),
        _mutated(usage={"input_tokens": 1.5}),
        _mutated(cost={"input": "1", "output": "x", "cache_read": "0", "cache_write": "0"}),
        _mutated(cost={"input": 1, "output": "1", "cache_read": "0", "cache_write": "0"}),
        _mutated(cost={"input": "1"}),
    ],
)
def test_malformed_lines_are_spool_errors(line: bytes) -> None:
    with pytest.raises(SpoolError):
        RecordCodec().decode(line)


def test_values_the_format_cannot_hold_fail_at_encode_time() -> None:
    with pytest.raises(TypeError):
        RecordCodec().encode(sample_record(model=object()))


# -- file --------------------------------------------------------------------------------------------------


def read_all(spool: Spool, max_records: int = 1000) -> list[RequestRecord]:
    out: list[RequestRecord] = []
    offset = 0
    while offset < spool.size:
        chunk = spool.read(offset, spool.size, max_records)
        assert chunk.next_offset > offset or not chunk.records
        if chunk.next_offset == offset:
            break
        out.extend(chunk.records)
        offset = chunk.next_offset
    return out


def test_append_read_truncate(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "metering.spool"
    spool = Spool(path)
    try:
        batch = [sample_record(i) for i in range(5)]
        spool.append(batch[:2])
        spool.append(batch[2:])
        dirty = [spool.dirty]
        spool.sync()
        dirty.append(spool.dirty)
        assert dirty == [True, False]
        assert spool.size == path.stat().st_size
        assert oct(path.stat().st_mode & 0o777) == oct(0o600)
        assert read_all(spool) == batch
        first = spool.read(0, spool.size, 2)
        assert first.records == batch[:2]
        rest = spool.read(first.next_offset, spool.size, 10)
        assert rest.records == batch[2:]
        assert rest.next_offset == spool.size
        spool.truncate()
        assert spool.size == 0
        assert path.stat().st_size == 0
        spool.append([sample_record(9)])
        assert read_all(spool) == [sample_record(9)]
    finally:
        spool.close()


@given(count=st.integers(1, 30), read_block=st.integers(1, 700), max_records=st.integers(1, 7))
@settings(
    max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_reads_in_any_block_size_and_batch_size_see_every_record_once(
    tmp_path: Path, count: int, read_block: int, max_records: int
) -> None:
    path = tmp_path / f"spool-{count}-{read_block}-{max_records}"
    path.unlink(missing_ok=True)
    spool = Spool(path, read_block=read_block)
    try:
        batch = [sample_record(i, error="x" * (i * 37 % 300)) for i in range(count)]
        spool.append(batch)
        assert read_all(spool, max_records) == batch
    finally:
        spool.close()


def test_torn_last_line_is_skipped_with_a_log_and_later_appends_are_intact(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    codec = RecordCodec()
    path = tmp_path / "metering.spool"
    good = [sample_record(i) for i in range(3)]
    torn = codec.encode(sample_record(3))[:57]  # a crash in the middle of a write
    path.write_bytes(codec.encode_many(good) + torn)
    spool = Spool(path)
    try:
        with caplog.at_level(logging.WARNING, logger="trioproxy.spool"):
            spool.open()
            spool.append([sample_record(4)])
            assert read_all(spool) == [*good, sample_record(4)]
        messages = [r.getMessage() for r in caplog.records]
        assert any("torn line" in m for m in messages)
        assert any("skipped an unreadable metering spool line" in m for m in messages)
        assert all("req-0003" not in m for m in messages)  # offsets and sizes only, never the content
    finally:
        spool.close()


def test_garbage_in_the_middle_is_skipped(tmp_path: Path) -> None:
    codec = RecordCodec()
    path = tmp_path / "metering.spool"
    path.write_bytes(codec.encode(sample_record(1)) + b"\x00\x01garbage\n\n" + codec.encode(sample_record(2)))
    spool = Spool(path)
    try:
        spool.open()
        chunk = spool.read(0, spool.size, 10)
        assert chunk.records == [sample_record(1), sample_record(2)]
        assert chunk.skipped_lines == 1
        assert chunk.next_offset == spool.size
    finally:
        spool.close()


def test_an_unterminated_tail_written_concurrently_is_left_for_later(tmp_path: Path) -> None:
    codec = RecordCodec()
    path = tmp_path / "metering.spool"
    spool = Spool(path)
    try:
        spool.append([sample_record(1)])
        line = codec.encode(sample_record(2))
        with path.open("ab") as other:  # another writer half-way through its append
            other.write(line[:30])
        size_with_fragment = path.stat().st_size
        chunk = spool.read(0, size_with_fragment, 10)
        assert chunk.records == [sample_record(1)]
        assert chunk.next_offset == spool.size  # stops before the fragment
    finally:
        spool.close()


def test_a_second_spool_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "metering.spool"
    first = Spool(path)
    first.open()
    try:
        with pytest.raises(SpoolError, match="in use"):
            Spool(path).open()
    finally:
        first.close()
    second = Spool(path)
    second.open()  # released by close()
    second.close()


def test_size_warning_is_logged_each_time_the_threshold_is_crossed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    line_size = len(RecordCodec().encode(sample_record(0)))
    spool = Spool(tmp_path / "metering.spool", warn_bytes=line_size * 3)
    try:
        with caplog.at_level(logging.WARNING, logger="trioproxy.spool"):
            for i in range(7):
                spool.append([sample_record(i)])
            warnings = [r for r in caplog.records if "metering spool is" in r.getMessage()]
            assert len(warnings) == 2  # at 3 and 6 lines
            spool.truncate()
            spool.append([sample_record(i) for i in range(3)])
            warnings = [r for r in caplog.records if "metering spool is" in r.getMessage()]
            assert len(warnings) == 3  # re-armed by the truncation
    finally:
        spool.close()


def test_a_failed_append_leaves_the_file_line_aligned(tmp_path: Path) -> None:
    path = tmp_path / "metering.spool"
    spool = Spool(path)
    try:
        spool.append([sample_record(1)])
        with pytest.raises(TypeError):
            spool.append([sample_record(2), sample_record(3, model=object())])
        assert read_all(spool) == [sample_record(1)]
        assert spool.size == path.stat().st_size
    finally:
        spool.close()


def test_reading_a_closed_spool_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SpoolError):
        Spool(tmp_path / "metering.spool").read(0, 10, 1)


def test_float_specials_round_trip() -> None:
    codec = RecordCodec()
    record = sample_record(started_at=-0.0, ttfb_ms=math.inf, duration_ms=5e-324)
    decoded = codec.decode(codec.encode(record))
    assert math.copysign(1.0, decoded.started_at) == -1.0
    assert decoded.ttfb_ms == math.inf
    assert decoded.duration_ms == 5e-324


def test_sync_without_appends_and_close_twice_are_no_ops(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "metering.spool")
    spool.sync()
    spool.open()
    fd_count = len(os.listdir("/proc/self/fd"))
    spool.open()
    assert len(os.listdir("/proc/self/fd")) == fd_count
    spool.close()
    spool.close()
    assert not spool.is_open
