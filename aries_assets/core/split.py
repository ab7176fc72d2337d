"""Split a very large collection's first load into `_id` ranges, one run each.

`plan_ranges` picks the ranges' lower bounds from a random sample of `_id`s;
`record_split` writes them into the ledger as the collection's bucket map,
each range a dirty bucket and an unfinished range. A run per range
(`engine.sync_range`, a Dagster backfill of the `load__<db>__<coll>` job)
then reads its range once and cuts it into buckets, beside the others, on
whatever machines the run launcher picks.
"""

from __future__ import annotations

from typing import Any

from bson.min_key import MinKey
from pymongo import MongoClient

from aries_assets.core.buckets import Bucket, BucketMap
from aries_assets.core.changes import StreamMark, adopt_mark
from aries_assets.core.extract import SourceCollection
from aries_assets.core.lake import Lake
from aries_assets.core.ledger import Lease, LedgerStore
from aries_assets.core.ordering import sort_key

SAMPLE_PER_RANGE = 200  # sampled `_id`s per range: sizes within ~10% of each other
MIN_SAMPLE = 1_000


def plan_ranges(client: MongoClient, source: SourceCollection, runs: int) -> list[Any]:
    """Lower bounds of up to `runs` contiguous `_id` ranges of about equal size, MinKey first.

    From `$sample`: a random cursor on a large collection reads only the sampled
    documents, where `$bucketAuto` or an `_id` scan would read every one; a
    collection smaller than the sample is returned whole, so its split is exact.
    """
    if runs < 1:
        raise ValueError(f"{source.label}: split into at least one range, not {runs}")
    pipeline: list[dict[str, Any]] = [{"$match": source.query}] if source.query else []
    pipeline += [{"$sample": {"size": max(MIN_SAMPLE, SAMPLE_PER_RANGE * runs)}}, {"$project": {"_id": 1}}]
    # $sample may return a document twice.
    by_key = {
        sort_key(d["_id"]): d["_id"] for d in source.open(client).aggregate(pipeline, allowDiskUse=True)
    }
    ids = [by_key[k] for k in sorted(by_key)]
    lowers: list[Any] = [MinKey()]
    for i in range(1, runs):
        cut = ids[round(i * len(ids) / runs)] if ids else None
        if cut is not None and sort_key(cut) > sort_key(lowers[-1]):
            lowers.append(cut)
    return lowers


def record_split(
    lake: Lake, source: SourceCollection, lowers: list[Any], bucket_size: int, mark: StreamMark, holder: str
) -> list[Bucket]:
    """Make `lowers` the bucket map of a collection not yet loaded, each range waiting for its run.

    Taken under the collection's lease, so a first load in progress is never split
    under it; refused (ValueError, LeaseHeld) once a first load has started. The
    collection's own stream is marked (`mark`, taken before its ranges are read), as a
    first load's is, before the ledger shows it loaded: the sensor joins it by token.
    """
    store = LedgerStore(lake, source.database, source.collection)
    lease = Lease(lake, source.database, source.collection, holder)
    lease.acquire(wait=0)
    try:
        store.load().split(lowers, bucket_size, mark.start)  # refused here, before the mark is saved
        now = adopt_mark(lake, source, mark)
        store.update(lambda ledger: ledger.split(lowers, bucket_size, now))
    finally:
        lease.release()
    return BucketMap(bucket_size, list(lowers)).buckets
