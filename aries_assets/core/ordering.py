"""MongoDB's BSON comparison order, as a Python sort key.

Bucket boundaries are `_id` values of any BSON type; to find which bucket an
`_id` falls in without asking the server we must order values exactly as
MongoDB does: first by type class, then within the class.
See https://www.mongodb.com/docs/manual/reference/bson-type-comparison-order/
"""

from __future__ import annotations

import datetime
import math
import re
import uuid
from decimal import Decimal
from typing import Any

from bson import Binary, Code, DBRef, Decimal128, Int64, ObjectId, Regex, Timestamp
from bson.datetime_ms import DatetimeMS
from bson.max_key import MaxKey
from bson.min_key import MinKey

# Type classes in MongoDB's cross-type order. Numbers share one class, as do
# strings and symbols, so 5 (int) and 5.0 (double) compare equal.
_MINKEY, _NULL, _NUMBER, _STRING, _OBJECT, _ARRAY, _BINARY = 0, 1, 2, 3, 4, 5, 6
_OBJECTID, _BOOL, _DATE, _TIMESTAMP, _REGEX, _CODE, _MAXKEY = 7, 8, 9, 10, 11, 12, 13

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _number_key(value: int | float | Decimal128) -> tuple:
    if isinstance(value, Decimal128):
        value = value.to_decimal()
        if value.is_nan():
            return (_NUMBER, 0, Decimal(0))
        if value.is_infinite():
            return (_NUMBER, 1 if value < 0 else 3, Decimal(0))
        return (_NUMBER, 2, value)
    if isinstance(value, float):
        if math.isnan(value):
            return (_NUMBER, 0, Decimal(0))  # NaN sorts below every other number
        if math.isinf(value):
            return (_NUMBER, 1 if value < 0 else 3, Decimal(0))
        return (_NUMBER, 2, Decimal(value))  # exact: Decimal(float) keeps every bit
    return (_NUMBER, 2, Decimal(int(value)))


def epoch_millis(value: datetime.datetime | DatetimeMS) -> int:
    if isinstance(value, DatetimeMS):
        return int(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def sort_key(value: Any) -> tuple:
    """A tuple that sorts Python-decoded BSON values the way MongoDB sorts them."""
    if isinstance(value, MinKey):
        return (_MINKEY,)
    if isinstance(value, MaxKey):
        return (_MAXKEY,)
    if value is None:
        return (_NULL,)
    if isinstance(value, bool):  # before int: bool is an int subclass
        return (_BOOL, value)
    if isinstance(value, (int, float, Decimal128, Int64)):
        return _number_key(value)
    if isinstance(value, Code):  # before str: Code is a str subclass, ordered after regexes
        return (_CODE, str(value).encode("utf-8"))
    if isinstance(value, str):
        # The simple collation compares UTF-8 bytes, which is code point order.
        return (_STRING, value.encode("utf-8"))
    if isinstance(value, ObjectId):
        return (_OBJECTID, value.binary)
    if isinstance(value, (datetime.datetime, DatetimeMS)):
        return (_DATE, epoch_millis(value))
    if isinstance(value, (Binary, bytes, uuid.UUID)):
        if isinstance(value, uuid.UUID):
            data, subtype = value.bytes, 4
        else:
            data, subtype = bytes(value), getattr(value, "subtype", 0)
        # BinData compares by length first, then subtype, then bytes.
        return (_BINARY, len(data), subtype, data)
    if isinstance(value, Timestamp):
        return (_TIMESTAMP, value.time, value.inc)
    if isinstance(value, (Regex, re.Pattern)):
        pattern = value.pattern if isinstance(value.pattern, str) else value.pattern.decode()
        flags = value.flags if isinstance(value.flags, str) else str(value.flags)
        return (_REGEX, pattern.encode("utf-8"), flags)
    if isinstance(value, DBRef):
        return sort_key(value.as_doc())
    if isinstance(value, dict):
        # Documents compare field by field: type of value, name, then value.
        return (_OBJECT, tuple((sort_key(v)[0], k.encode("utf-8"), sort_key(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (_ARRAY, tuple(sort_key(v) for v in value))
    raise TypeError(f"cannot order BSON value of type {type(value).__name__}")
