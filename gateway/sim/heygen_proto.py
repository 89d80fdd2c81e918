"""The protobuf frames of HeyGen's chat socket (``/v1/ws/streaming.chat``), by hand.

``@heygen/streaming-avatar`` 2.0.16 builds its messages with protobufjs from a JSON descriptor
shipped in ``lib/index.esm.js`` (proto3, package ``pipecat``)::

    message TextFrame          { uint64 id = 1; string name = 2; string text = 3; }
    message AudioRawFrame      { uint64 id = 1; string name = 2; bytes audio = 3;
                                 uint32 sampleRate = 4; uint32 numChannels = 5; }
    message TranscriptionFrame { uint64 id = 1; string name = 2; string text = 3;
                                 string userId = 4; string timestamp = 5; }
    message Frame { oneof frame { TextFrame text = 1; AudioRawFrame audio = 2;
                                  TranscriptionFrame transcription = 3; } }

The SDK sends ``Frame{text{text}}`` for its default ``speak()`` and ``Frame{audio{audio,
sampleRate: 16000, numChannels: 1}}`` (512 samples of s16le) for websocket voice chat. Three
messages of five scalar fields do not justify generated code: this module decodes and encodes
exactly them, following the protobuf wire format (varints, length-delimited fields; unknown
fields skipped, as every protobuf reader does; the last member of a oneof wins).
"""

from __future__ import annotations

from dataclasses import dataclass

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_MAX_DEPTH = 2  # Frame -> one of its members; nothing nests deeper


class ProtoError(ValueError):
    """The bytes are not a well-formed ``pipecat.Frame``."""


@dataclass(frozen=True, slots=True)
class TextFrame:
    text: str
    id: int = 0
    name: str = ""


@dataclass(frozen=True, slots=True)
class AudioFrame:
    audio: bytes
    sample_rate: int = 0
    num_channels: int = 0
    id: int = 0
    name: str = ""


@dataclass(frozen=True, slots=True)
class TranscriptionFrame:
    text: str
    user_id: str = ""
    timestamp: str = ""
    id: int = 0
    name: str = ""


Frame = TextFrame | AudioFrame | TranscriptionFrame | None
"""What a ``pipecat.Frame`` holds; None when its oneof is empty."""


# -- decoding ---------------------------------------------------------------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ProtoError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise ProtoError("varint longer than 10 bytes")


def _fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of every field; length-delimited values as bytes."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtoError("field number 0")
        value: int | bytes
        if wire == _VARINT:
            value, pos = _varint(data, pos)
        elif wire == _LEN:
            size, pos = _varint(data, pos)
            if size > len(data) - pos:
                raise ProtoError(f"field {number} claims {size} bytes, {len(data) - pos} left")
            value, pos = data[pos:pos + size], pos + size
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if size > len(data) - pos:
                raise ProtoError(f"truncated fixed-width field {number}")
            value, pos = int.from_bytes(data[pos:pos + size], "little"), pos + size
        else:  # groups (3, 4) are proto2-only; 6 and 7 do not exist
            raise ProtoError(f"wire type {wire} (field {number}) is not valid here")
        out.append((number, wire, value))
    return out


def _typed(number: int, wire: int, value: int | bytes, expected: int) -> int | bytes:
    if wire != expected:
        raise ProtoError(f"field {number} has wire type {wire}, expected {expected}")
    return value


def _string(number: int, wire: int, value: int | bytes) -> str:
    raw = _typed(number, wire, value, _LEN)
    assert isinstance(raw, bytes)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ProtoError(f"field {number} is not valid UTF-8") from None


def _uint(number: int, wire: int, value: int | bytes, bits: int) -> int:
    raw = _typed(number, wire, value, _VARINT)
    assert isinstance(raw, int)
    return raw & ((1 << bits) - 1)  # protobuf truncates oversized varints to the field's width


def _member(number: int, body: bytes) -> Frame:
    scalars: dict[int, int | str | bytes] = {}
    for field, wire, value in _fields(body):
        if field == 1:
            scalars[1] = _uint(field, wire, value, 64)
        elif field == 2:
            scalars[2] = _string(field, wire, value)
        elif field == 3 and number == 2:
            raw = _typed(field, wire, value, _LEN)
            assert isinstance(raw, bytes)
            scalars[3] = raw
        elif field == 3 or (field in (4, 5) and number == 3):
            scalars[field] = _string(field, wire, value)
        elif field in (4, 5) and number == 2:
            scalars[field] = _uint(field, wire, value, 32)
    ident, name = int(scalars.get(1, 0)), str(scalars.get(2, ""))
    if number == 1:
        return TextFrame(text=str(scalars.get(3, "")), id=ident, name=name)
    if number == 2:
        audio = scalars.get(3, b"")
        assert isinstance(audio, bytes)
        return AudioFrame(audio=audio, sample_rate=int(scalars.get(4, 0)),
                          num_channels=int(scalars.get(5, 0)), id=ident, name=name)
    return TranscriptionFrame(text=str(scalars.get(3, "")), user_id=str(scalars.get(4, "")),
                              timestamp=str(scalars.get(5, "")), id=ident, name=name)


def decode_frame(data: bytes) -> Frame:
    """Decode one ``pipecat.Frame``.

    :raises ProtoError: the bytes are not a well-formed ``Frame`` (truncated, a field with the
        wrong wire type, invalid UTF-8 in a string, ...).
    """
    frame: Frame = None
    for number, wire, value in _fields(data):
        if number in (1, 2, 3):
            body = _typed(number, wire, value, _LEN)
            assert isinstance(body, bytes)
            frame = _member(number, body)
    return frame


# -- encoding (tests, and anything that wants to talk to the socket) ---------------------------


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _put_varint(number << 3 | _LEN) + _put_varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _put_varint(number << 3 | _VARINT) + _put_varint(value) if value else b""


def _str_field(number: int, value: str) -> bytes:
    return _len_field(number, value.encode()) if value else b""


def encode_frame(frame: TextFrame | AudioFrame | TranscriptionFrame) -> bytes:
    """Encode ``frame`` as a ``pipecat.Frame`` (proto3: default values are left out)."""
    head = _int_field(1, frame.id) + _str_field(2, frame.name)
    if isinstance(frame, TextFrame):
        return _len_field(1, head + _str_field(3, frame.text))
    if isinstance(frame, AudioFrame):
        body = (head + (_len_field(3, frame.audio) if frame.audio else b"")
                + _int_field(4, frame.sample_rate) + _int_field(5, frame.num_channels))
        return _len_field(2, body)
    body = (head + _str_field(3, frame.text) + _str_field(4, frame.user_id)
            + _str_field(5, frame.timestamp))
    return _len_field(3, body)
