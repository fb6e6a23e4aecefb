"""The hash of Kafka's default partitioner for keyed records: murmur2 of the key, as the Java
client (and aiokafka's ``DefaultPartitioner``) computes it, so an output lands where any Kafka
client's ``send`` would put it.

aiokafka's ``murmur2`` reads the key a byte at a time in Python: about 8 µs for a 36-byte request
ID, twice per request (its response and its metric). Reading it four bytes at a time with one
``struct`` call does the same arithmetic in under half of that.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

__all__ = ["murmur2"]

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF

_Unpack = Callable[[bytes], tuple[int, ...]]
# Little-endian 32-bit words, by count: request IDs and session keys stay well under 256 bytes.
_WORDS: list[_Unpack] = [struct.Struct(f"<{n}I").unpack_from for n in range(64)]


def murmur2(data: bytes) -> int:
    """The unsigned 32-bit MurmurHash2 of ``data`` with Kafka's seed."""
    length = len(data)
    count = length >> 2
    unpack = _WORDS[count] if count < len(_WORDS) else struct.Struct(f"<{count}I").unpack_from
    h = _SEED ^ length
    for k in unpack(data):
        k = (k * _M) & _MASK
        k = ((k ^ (k >> 24)) * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    extra = length & 3
    if extra:
        tail = length - extra
        if extra == 3:
            h ^= data[tail + 2] << 16
        if extra >= 2:
            h ^= data[tail + 1] << 8
        h = ((h ^ data[tail]) * _M) & _MASK
    h = ((h ^ (h >> 13)) * _M) & _MASK
    return h ^ (h >> 15)
