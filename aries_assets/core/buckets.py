"""Buckets: contiguous `_id` ranges of a collection, one Parquet file each.

After the Scale AI design (seed 002): documents are grouped by `_id` in BSON
order; a new bucket opens when the newest one is full, so the young documents
that change most land in few files. A bucket is identified by its lower bound
and covers every `_id` up to the next bucket's lower bound; the first bucket
starts at MinKey and the last runs to MaxKey, so every `_id` has a bucket.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import bson
from bson import Int64, ObjectId, json_util
from bson.max_key import MaxKey
from bson.min_key import MinKey

from aries_assets.core.ordering import sort_key

_CANONICAL = json_util.CANONICAL_JSON_OPTIONS
_UNSAFE = re.compile(r"[^A-Za-z0-9_.]+")

# A middle bucket (one that no longer receives the newest `_id`s) is split once
# it holds this many times its size: ids that are not monotonic (strings, UUIDs)
# keep landing in old buckets, and a file must not grow without bound.
SPLIT_FACTOR = 2


def bucket_key(lower: Any) -> str:
    """A stable, path- and partition-safe name for the bucket starting at `lower`."""
    if isinstance(lower, MinKey):
        return "first"
    if isinstance(lower, ObjectId):
        return f"oid-{lower}"
    if isinstance(lower, (int, Int64)) and not isinstance(lower, bool):
        return f"int-{lower}" if lower >= 0 else f"int-neg{-lower}"
    # Lossy readable prefix plus a digest of the exact value keeps keys unique.
    digest = hashlib.sha1(bson.encode({"": lower})).hexdigest()[:10]
    if isinstance(lower, str):
        readable = _UNSAFE.sub("_", lower)[:24].strip("_.") or "x"
        return f"str-{readable}-{digest}"
    return f"{type(lower).__name__.lower()}-{digest}"


@dataclass(frozen=True)
class Bucket:
    """One `_id` range: lower bound inclusive, upper bound exclusive."""

    key: str
    lower: Any
    upper: Any

    def describe(self) -> str:
        def show(value: Any) -> str:
            if isinstance(value, (MinKey, MaxKey)):
                return type(value).__name__
            return json_util.dumps(value, json_options=json_util.RELAXED_JSON_OPTIONS)

        return f"[{show(self.lower)}, {show(self.upper)})"


@dataclass
class BucketMap:
    """The ordered bucket boundaries of one collection (the seed's `Buckets` index)."""

    bucket_size: int
    lowers: list[Any] = field(default_factory=lambda: [MinKey()])

    def __post_init__(self) -> None:
        self._keys = [sort_key(v) for v in self.lowers]

    @property
    def buckets(self) -> list[Bucket]:
        uppers = self.lowers[1:] + [MaxKey()]
        return [Bucket(bucket_key(lo), lo, up) for lo, up in zip(self.lowers, uppers, strict=True)]

    @property
    def keys(self) -> list[str]:
        return [bucket_key(lo) for lo in self.lowers]

    def index_of(self, _id: Any) -> int:
        """Index of the bucket holding `_id` (rightmost lower bound <= _id)."""
        return bisect.bisect_right(self._keys, sort_key(_id)) - 1

    def find(self, _id: Any) -> Bucket:
        return self.buckets[self.index_of(_id)]

    def get(self, key: str) -> Bucket:
        for bucket in self.buckets:
            if bucket.key == key:
                return bucket
        raise KeyError(key)

    def add_lower(self, lower: Any) -> None:
        key = sort_key(lower)
        i = bisect.bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            return
        self._keys.insert(i, key)
        self.lowers.insert(i, lower)

    def to_json(self) -> str:
        body = {"version": 1, "bucket_size": self.bucket_size, "lowers": self.lowers}
        return json_util.dumps(body, json_options=_CANONICAL, indent=1)

    @classmethod
    def from_json(cls, text: str) -> BucketMap:
        body = json_util.loads(text, json_options=_CANONICAL)
        return cls(bucket_size=int(body["bucket_size"]), lowers=list(body["lowers"]))


@dataclass
class BucketDocuments:
    """One bucket's documents as read in `_id` order, ready to be written."""

    bucket: Bucket
    documents: list[bytes]  # raw BSON
    nbytes: int
    digest: str  # SHA-256 of the documents' raw BSON, in order
    new: bool  # opened or split off by this pass


class BucketCutter:
    """Assigns documents streamed in `_id` order to buckets, cutting new ones on the fly.

    The seed's `Buckets` class, streaming: existing boundaries never move; the
    newest bucket closes when it holds `size` documents or `max_bytes` of BSON,
    and a bucket in the middle is cut in pieces of that size once it holds
    SPLIT_FACTOR times as much. Every bucket whose range starts inside the span
    is handed back, empty ones included, so deleted documents leave their file.
    The bucket map is updated in place as buckets are cut. Buckets named in `fresh`
    (the ranges of a split first load, read for the first time) are cut as soon as
    they are full, like the newest bucket, and so are the pieces cut from them.
    """

    def __init__(
        self,
        bucket_map: BucketMap,
        first: int,
        last: int,
        size: int,
        max_bytes: int,
        fresh: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        self.map = bucket_map
        self.size, self.max_bytes = size, max_bytes
        self._i = first  # index in the map of the bucket being filled
        self._last = last  # index of the last bucket of the span
        self._new: set[str] = set()
        self._fresh_keys = fresh
        self._fresh = bucket_key(bucket_map.lowers[first]) in fresh  # the bucket being filled is fresh
        self._reset()

    def _reset(self) -> None:
        self._docs: list[bytes] = []
        self._keys: list[Any] = []  # sort keys, for splitting a swollen middle bucket
        self._ids: list[Any] = []
        self._bytes = 0

    def _bucket_at(self, i: int) -> Bucket:
        lower = self.map.lowers[i]
        upper = self.map.lowers[i + 1] if i + 1 < len(self.map.lowers) else MaxKey()
        return Bucket(bucket_key(lower), lower, upper)

    def _emit(self, docs: list[bytes]) -> BucketDocuments:
        bucket = self._bucket_at(self._i)
        digest = hashlib.sha256()
        for raw in docs:
            digest.update(raw)
        return BucketDocuments(bucket, docs, sum(map(len, docs)), digest.hexdigest(), bucket.key in self._new)

    def _open(self, lower: Any) -> None:
        self.map.add_lower(lower)
        self._new.add(bucket_key(lower))
        self._i += 1
        self._last += 1

    def add(self, _id: Any, raw: bytes) -> list[BucketDocuments]:
        """Take the next document; return the buckets this finished."""
        done: list[BucketDocuments] = []
        if self._i + 1 == len(self.map.lowers):
            # The newest bucket (all of a first load): no boundary ahead and never split, so no
            # sort keys are needed, only the count and size that close it.
            if self._docs and (len(self._docs) >= self.size or self._bytes + len(raw) > self.max_bytes):
                done.append(self._emit(self._docs))
                self._reset()
                self._open(_id)
            self._docs.append(raw)
            self._bytes += len(raw)
            return done
        key = sort_key(_id)
        while self._i + 1 < len(self.map.lowers) and key >= self.map._keys[self._i + 1]:
            done.append(self._emit(self._docs))
            self._reset()
            self._i += 1
            self._fresh = bucket_key(self.map.lowers[self._i]) in self._fresh_keys
        is_newest = self._i == len(self.map.lowers) - 1
        if is_newest or self._fresh:
            if self._docs and (len(self._docs) >= self.size or self._bytes + len(raw) > self.max_bytes):
                done.append(self._emit(self._docs))
                self._reset()
                self._open(_id)
        elif len(self._docs) > 1 and (
            len(self._docs) >= SPLIT_FACTOR * self.size or self._bytes >= SPLIT_FACTOR * self.max_bytes
        ):  # (a bucket of one document is not split, however large)
            cut, running = 0, 0
            while cut < len(self._docs) - 1 and cut < self.size and running < self.max_bytes:
                running += len(self._docs[cut])
                cut += 1
            cut = max(1, cut)
            docs, ids, keys = self._docs[cut:], self._ids[cut:], self._keys[cut:]
            done.append(self._emit(self._docs[:cut]))
            self._open(ids[0])
            self._docs, self._ids, self._keys = docs, ids, keys
            self._bytes = sum(map(len, docs))
        self._docs.append(raw)
        self._ids.append(_id)
        self._keys.append(key)
        self._bytes += len(raw)
        return done

    def add_many(self, documents: list[bytes], id_of: Callable[[bytes], Any]) -> list[BucketDocuments]:
        """`add` for each of `documents` (raw BSON, in `_id` order); return the buckets this finished.

        Filling the newest bucket (all of a first load) needs no `_id` but the one that opens the
        next bucket: whole runs of documents are taken at once, by count and size. Elsewhere,
        each document is placed by its `_id` (`id_of` reads it from the raw BSON)."""
        done: list[BucketDocuments] = []
        i, n = 0, len(documents)
        ends: list[int] | None = None  # ends[k]: bytes of documents[:k], once the newest bucket is met
        while i < n:
            if self._i + 1 != len(self.map.lowers):
                done += self.add(id_of(documents[i]), documents[i])
                i += 1
                continue
            if self._docs and (
                len(self._docs) >= self.size or self._bytes + len(documents[i]) > self.max_bytes
            ):
                done.append(self._emit(self._docs))
                self._reset()
                self._open(id_of(documents[i]))
            if ends is None:
                ends = [0, *itertools.accumulate(map(len, documents))]
            # As many as fit: at most the room left by count, and by size (at least one, as `add`).
            room = min(n, i + self.size - len(self._docs))
            end = bisect.bisect_right(ends, ends[i] + self.max_bytes - self._bytes, i, room + 1) - 1
            end = max(end, i if self._docs else i + 1)
            self._docs += documents[i:end]
            self._bytes += ends[end] - ends[i]
            i = end
        return done

    def finish(self) -> list[BucketDocuments]:
        """The bucket being filled and any later (empty) buckets of the span."""
        done = [self._emit(self._docs)]
        self._reset()
        while self._i < self._last:
            self._i += 1
            done.append(self._emit([]))
        return done
