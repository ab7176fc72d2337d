"""Warehouse tables kept exact bucket by bucket: DuckDB, PostgreSQL and Redshift.

One loader (`loader.Loader`) does the work for all three; a `Dialect` says only
how each of them spells types, quoting, staging and bulk loading.
"""

from aries_assets.core.warehouse.loader import LoadedBucket, Loader, TableRef, open_loader

__all__ = ["LoadedBucket", "Loader", "TableRef", "open_loader"]
