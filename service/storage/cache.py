"""Remote objects kept in a local cache directory, fetched once per node."""

from __future__ import annotations

import json
import os
from pathlib import Path

from service.storage.base import ObjectInfo, Storage, file_lock
from service.storage.s3 import TRANSFER_CONCURRENCY

CACHE_INDEX = ".spotlora-etags.json"
CACHE_LOCK = ".spotlora-fetch.lock"


def fetch_cached(store: Storage, objects: list[ObjectInfo], target: Path) -> list[ObjectInfo]:
    """Download ``objects`` under ``target`` in parallel, remembering the ETag each came
    with: an interrupted fetch resumes with what is missing, and a cache that still
    matches costs only the listing. Returns the objects that were downloaded."""
    from concurrent.futures import ThreadPoolExecutor

    target.mkdir(parents=True, exist_ok=True)
    # The ranks of one node share its cache: the first to take the lock downloads, the others
    # then find the cache current. Never two writers on one path.
    with file_lock(target / CACHE_LOCK):
        index_path = target / CACHE_INDEX
        etags: dict[str, str] = json.loads(index_path.read_text()) if index_path.is_file() else {}
        todo = [
            o
            for o in objects
            if etags.get(o.key) != o.etag
            or not (target / o.key).is_file()
            or (target / o.key).stat().st_size != o.size
        ]
        if todo:
            with ThreadPoolExecutor(TRANSFER_CONCURRENCY) as pool:
                list(pool.map(lambda o: store.download_file(o.key, target / o.key), todo))
            etags.update({o.key: o.etag for o in todo})
            tmp = index_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(etags, indent=1))
            os.replace(tmp, index_path)
    return todo
