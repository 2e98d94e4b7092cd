"""The one eviction rule of fedtiny's on-disk cache ($FEDTINY_CACHE, default ~/.cache/fedtiny): least recently used.

Each kind of cached thing (a C build folder, a compiled object, a pretrained model's .ftm and .pt) is an entry with
a marker file whose modification time says when it was last used: `used(marker)` on every hit, and `evict(entries,
keep)` after adding one keeps the `keep` most recently used entries and removes the rest, so a cache shared by every
run and version stays bounded. An entry without its marker (being written by another process) is never removed.
"""

import os
import shutil
from pathlib import Path


def used(marker: Path) -> None:
    """Mark an entry used now: the last to be evicted. A read-only cache is left as it is."""
    try:
        os.utime(marker)
    except OSError:
        pass


def evict(entries, keep: int) -> None:
    """entries: (marker, paths) per cache entry; the paths (files or folders) of all but the `keep` entries whose
    marker was used most recently are removed. Something already loaded from a removed path stays usable (a mapped
    library, a model in memory)."""
    dated = []
    for marker, paths in entries:
        try:
            dated.append((marker.stat().st_mtime, str(marker), paths))
        except OSError:  # not there (yet): in progress, or not an entry
            continue
    for _, _, paths in sorted(dated, reverse=True)[keep:]:
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
