"""The wire protocol: encoding, limits, and defensive decoding."""

import msgpack
import pytest

from libaios import errors, protocol
from libaios.protocol import ErrorCode, MsgType, ProtocolError


def frames(head: dict, body: object = None) -> list[bytes]:
    return [msgpack.packb(head), msgpack.packb({} if body is None else body)]


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


DEEP = nested(protocol.MAX_DEPTH + 5)


def head(**over: object) -> dict:
    return {"v": protocol.VERSION, "id": "x1", "type": "sys.null", **over}


def test_round_trip_keeps_every_header_field() -> None:
    msg = protocol.call(MsgType.LLM_CHAT, {"messages": [{"role": "user", "content": "hi"}]}, 5.0)
    back = protocol.decode(protocol.encode(msg)[1:])
    assert (back.type, back.id, back.body, back.deadline) == (msg.type, msg.id, msg.body, msg.deadline)
    rep = protocol.decode(protocol.encode(protocol.reply(msg.id, {"ok": 1}))[1:])
    assert rep.re == msg.id and rep.type is MsgType.REPLY


def test_split_envelope() -> None:
    ids, payload = protocol.split_envelope([b"a", b"b", b"", b"h", b"b"])
    assert ids == [b"a", b"b"] and payload == [b"h", b"b"]
    with pytest.raises(ProtocolError):
        protocol.split_envelope([b"no", b"delimiter"])
    with pytest.raises(ProtocolError):
        protocol.split_envelope([b"x"] * (protocol.MAX_ROUTING_FRAMES + 1) + [b""])


@pytest.mark.parametrize("payload, code", [
    (frames(head(v=2)), ErrorCode.BAD_VERSION),
    (frames(head(type="nope")), ErrorCode.UNKNOWN_TYPE),
    ([msgpack.packb([1]), msgpack.packb({})], ErrorCode.BAD_FRAME),
    ([b"\xc1", msgpack.packb({})], ErrorCode.BAD_FRAME),
    (frames(head(), {"x": msgpack.ExtType(5, b"x")}), ErrorCode.BAD_FRAME),
    ([msgpack.packb(head()), b"\xda" + b"\xff\xff" + b"x" * 10], ErrorCode.BAD_FRAME),
    (frames(head(), {"x": "y" * (protocol.MAX_BODY_BYTES + 1)}), ErrorCode.TOO_LARGE),
    ([msgpack.packb(head(pad="x" * protocol.MAX_HEADER_BYTES)), msgpack.packb({})], ErrorCode.TOO_LARGE),
    (frames(head(), {"a": DEEP}), ErrorCode.TOO_LARGE),
    (frames(head(), [1, 2]), ErrorCode.BAD_FRAME),
    (frames(head(id="")), ErrorCode.BAD_FRAME),
    (frames(head(deadline="soon")), ErrorCode.BAD_FRAME),
    ([msgpack.packb(head())], ErrorCode.BAD_FRAME),
])
def test_bad_messages_raise_the_right_code(payload: list[bytes], code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode(payload)
    assert info.value.code == code
    assert info.value.message


def test_peek_id_recovers_the_id_of_an_undecodable_message() -> None:
    assert protocol.peek_id([msgpack.packb(head(id="abc", v=9)), b"\xc1"]) == "abc"
    assert protocol.peek_id([b"\xc1", b""]) is None
    assert protocol.peek_id([]) is None


def test_error_envelope_and_exception_classes_match() -> None:
    env = protocol.error("c1", ErrorCode.WORKER_LOST, "gone", details={"k": 1})
    assert env.body == {"code": 203, "name": "WORKER_LOST", "message": "gone",
                        "retriable": True, "details": {"k": 1}}
    exc = errors.from_envelope(env.body)
    assert isinstance(exc, errors.WorkerLost) and exc.retriable and exc.details == {"k": 1}
    assert not protocol.error(None, ErrorCode.INVALID_ARGUMENT, "x").body["retriable"]
    for code in ErrorCode:
        assert errors.error_class(code).code is code
    assert isinstance(errors.from_envelope({"code": 12345, "message": "?"}), errors.InternalError)


SELF_NESTED: list = []
SELF_NESTED.append(SELF_NESTED)


@pytest.mark.parametrize("mtype, body, field, what", [
    (MsgType.LLM_CHAT, {"messages": [], "max_tokens": 2**70}, "'max_tokens'", "integer beyond 64 bits"),
    (MsgType.LLM_CHAT, {"seed": -2**63 - 1}, "'seed'", "integer beyond 64 bits"),
    (MsgType.STORAGE_PUT, {"key": "k", "value": {1, 2}}, "'value'", "a set"),
    (MsgType.STORAGE_PUT, {"key": "k", "value": {"a": [1, {"b": frozenset()}]}}, "'value.a[1].b'",
     "a frozenset"),
    (MsgType.STORAGE_PUT, {"key": "k", "value": {7: 10**5000}}, "'value[7]'", "integer beyond"),
    (MsgType.MEMORY_ADD, {"text": "\udc80"}, "'text'", "lone surrogate"),
    (MsgType.MEMORY_ADD, {"text": "t", "metadata": {"when": object()}}, "'metadata.when'",
     "an object"),
    (MsgType.STORAGE_PUT, {"key": "k", "value": SELF_NESTED}, "'value[0][0]", "nested deeper"),
])
def test_a_call_whose_body_cannot_be_packed_names_the_call_and_field(
        mtype: MsgType, body: dict, field: str, what: str) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.encode_call(protocol.call(mtype, body))
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    assert info.value.message.startswith(f"{mtype.value}: ")
    assert f"(field {field}" in info.value.message and what in info.value.message


def test_a_call_body_is_refused_past_the_call_limit_and_sent_up_to_it() -> None:
    limit = protocol.MAX_CALL_BODY_BYTES
    assert limit < protocol.MAX_BODY_BYTES
    # a map of one key "v" holding bin 32: 8 bytes around the data
    at_limit = protocol.call(MsgType.STORAGE_PUT, {"v": b"x" * (limit - 8)})
    frames = protocol.encode_call(at_limit)
    assert len(frames[2]) == limit and frames == protocol.encode(at_limit)
    with pytest.raises(ProtocolError) as info:
        protocol.encode_call(protocol.call(MsgType.STORAGE_PUT, {"v": b"x" * (limit - 7)}))
    assert info.value.code == ErrorCode.TOO_LARGE
    assert "storage.put" in info.value.message and "too large" in info.value.message
    assert f"{limit + 1} bytes" in info.value.message and str(limit) in info.value.message


def test_a_body_of_many_tiny_values_is_refused_before_it_is_built() -> None:
    flood = msgpack.packb({"x": [[]] * 2_000_000})
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.decode([protocol.encode(protocol.call(MsgType.SYS_NULL))[1], flood])
    assert caught.value.code == ErrorCode.TOO_LARGE and "values" in caught.value.message
    # as large, but of a few large values: read as ever
    big = msgpack.packb({"text": "x" * 2_000_000, "blob": b"\0" * 2_000_000,
                         "items": [{"n": n} for n in range(50_000)]})
    msg = protocol.decode([protocol.encode(protocol.call(MsgType.SYS_NULL))[1], big])
    assert len(msg.body["text"]) == 2_000_000 and len(msg.body["items"]) == 50_000
    # a map claiming more entries than it holds is the decoder's to refuse
    lying = b"\xdf\xff\xff\xff\xff" + b"\xa1a\xc0" * 30_000
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.decode([protocol.encode(protocol.call(MsgType.SYS_NULL))[1], lying])
    assert caught.value.code in (ErrorCode.BAD_FRAME, ErrorCode.TOO_LARGE)


def test_events_round_trip_with_their_topic_time_and_body() -> None:
    frames = protocol.encode_event("agent.a-1.started", {"agent": "a-1", "pid": 7}, ts=12.5)
    assert frames[0] == b"agent.a-1.started"   # first: subscribers filter on it
    event = protocol.decode_event(frames)
    assert (event.topic, event.ts, event.body) == ("agent.a-1.started", 12.5,
                                                   {"agent": "a-1", "pid": 7})


@pytest.mark.parametrize("raw, code", [
    ([b"t", msgpack.packb({"v": 1, "ts": 1.0})], ErrorCode.BAD_FRAME),
    ([b"t", msgpack.packb({"v": 99, "ts": 1.0}), msgpack.packb({})], ErrorCode.BAD_VERSION),
    ([b"t", msgpack.packb({"v": 1, "ts": "now"}), msgpack.packb({})], ErrorCode.BAD_FRAME),
    ([b"t", msgpack.packb({"v": 1, "ts": 1.0}), msgpack.packb([1])], ErrorCode.BAD_FRAME),
    ([b"\xff", msgpack.packb({"v": 1, "ts": 1.0}), msgpack.packb({})], ErrorCode.BAD_FRAME),
    ([b"t" * 513, msgpack.packb({"v": 1, "ts": 1.0}), msgpack.packb({})], ErrorCode.TOO_LARGE),
])
def test_bad_events_are_refused_saying_why(raw: list[bytes], code: ErrorCode) -> None:
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.decode_event(raw)
    assert info.value.code is code and "event" in info.value.message
