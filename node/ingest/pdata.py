"""C-STORE requests read straight from P-DATA-TF PDUs, and C-STORE responses encoded as PDUs: the receivers'
fast path (node/ingest/scp.py, _FastStores). Pure functions over bytes, no pynetdicom.

PS3.8 9.3.5: a P-DATA-TF PDU body is a run of PDV items, each a 4-byte big-endian length, a presentation
context ID, a message control header (bit 0: command, bit 1: last fragment) and the fragment. PS3.7 6.3.1: a
command set is encoded implicit VR little endian, group 0000 only. Anything these readers do not take as is
gives None: pynetdicom then reads it, as it reads every message that is not a plain C-STORE request."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101
COMMAND, LAST = 0x01, 0x02

# the elements a C-STORE-RQ may carry (PS3.7 Table 9.3-1, and the group length): any other goes to pynetdicom
_STORE_RQ_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031})
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_ITEM = struct.Struct(">IBB")
_ELEMENT = struct.Struct("<HHI")


@dataclass(frozen=True)
class Item:
    """One PDV item: its presentation context, message control header, fragment, and the whole item as sent."""

    context_id: int
    header: int
    fragment: memoryview
    raw: memoryview


@dataclass(frozen=True)
class StoreRequest:
    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str


def items(body: memoryview) -> list[Item] | None:
    """The PDV items of a P-DATA-TF PDU body (after its 6-byte header); None unless they tile it exactly, at
    least one, each with a fragment-length of at least 0 and no header bits but the two defined."""
    out = []
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 6:
            return None
        length, context_id, header = _ITEM.unpack_from(body, pos)
        if length < 2 or pos + 4 + length > end or header & ~(COMMAND | LAST):
            return None
        out.append(Item(context_id, header, body[pos + 6:pos + 4 + length], body[pos:pos + 4 + length]))
        pos += 4 + length
    return out or None


def pdu(raw_items: list[memoryview]) -> bytes:
    """A P-DATA-TF PDU that carries `raw_items` (whole PDV items, as items() gives them in Item.raw)."""
    length = sum(len(raw) for raw in raw_items)
    return b"".join((b"\x04\x00", length.to_bytes(4, "big"), *raw_items))


def command_elements(command: bytes) -> dict[int, bytes] | None:
    """element number -> value of an encoded command set; None when it is not a well-formed group 0000."""
    out = {}
    pos, end = 0, len(command)
    while pos < end:
        if end - pos < 8:
            return None
        group, element, length = _ELEMENT.unpack_from(command, pos)
        pos += 8
        if group != 0 or length > end - pos or element in out:
            return None
        out[element] = command[pos:pos + length]
        pos += length
    return out


def us(value: bytes | None) -> int | None:
    return int.from_bytes(value, "little") if value is not None and len(value) == 2 else None


def uid(value: bytes | None) -> str | None:
    """A UI value without its padding; None unless it is a valid UID (PS3.5 9.1)."""
    if value is None:
        return None
    try:
        text = value.decode("ascii").rstrip("\0 ")
    except UnicodeDecodeError:
        return None
    return text if len(text) <= 64 and _UID.fullmatch(text) else None


def has_data_set(elements: dict[int, bytes]) -> bool | None:
    """Whether the message of a command set goes on with a data set (CommandDataSetType); None if unreadable."""
    kind = us(elements.get(0x0800))
    return None if kind is None else kind != NO_DATA_SET


def store_request(elements: dict[int, bytes], context_id: int) -> StoreRequest | None:
    """The C-STORE-RQ of a command set with a data set, or None (another command, or one to leave to
    pynetdicom: an unexpected element, a UID that is not valid)."""
    if us(elements.get(0x0100)) != C_STORE_RQ or has_data_set(elements) is not True:
        return None
    if not elements.keys() <= _STORE_RQ_ELEMENTS:
        return None
    message_id = us(elements.get(0x0110))
    sop_class, sop_instance = uid(elements.get(0x0002)), uid(elements.get(0x1000))
    if message_id is None or sop_class is None or sop_instance is None:
        return None
    return StoreRequest(context_id, message_id, sop_class, sop_instance)


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def store_response(request: StoreRequest, status: int, comment: str | None, max_pdu: int) -> bytes:
    """The C-STORE-RSP to `request` as P-DATA-TF PDUs, fragmented to the peer's maximum PDU length (0: no
    limit); the command set holds what pynetdicom 3.0.4 writes for the same status and ErrorComment."""
    values = [
        (0x0002, _even(request.sop_class_uid.encode("ascii"), b"\0")),
        (0x0100, C_STORE_RSP.to_bytes(2, "little")),
        (0x0120, request.message_id.to_bytes(2, "little")),
        (0x0800, NO_DATA_SET.to_bytes(2, "little")),
        (0x0900, status.to_bytes(2, "little")),
    ]
    if comment is not None:
        values.append((0x0902, _even(comment.encode("ascii", "replace"), b" ")))
    values.append((0x1000, _even(request.sop_instance_uid.encode("ascii"), b"\0")))
    body = b"".join(_ELEMENT.pack(0, element, len(value)) + value for element, value in values)
    command = _ELEMENT.pack(0, 0, 4) + len(body).to_bytes(4, "little") + body
    room = max(max_pdu - 6, 1) if max_pdu else len(command)
    out = []
    for start in range(0, len(command), room):
        fragment = command[start:start + room]
        header = COMMAND | (LAST if start + room >= len(command) else 0)
        item = _ITEM.pack(len(fragment) + 2, request.context_id, header) + fragment
        out.append(b"\x04\x00" + len(item).to_bytes(4, "big") + item)
    return b"".join(out)
