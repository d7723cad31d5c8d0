"""Byte-reproducible shard writing in the mmkit sample schema.

Hand-written on `tarfile` rather than `webdataset.ShardWriter` because reproducibility is
the point: webdataset stamps the current time unless told otherwise, sets a user name,
and does not sort members. Here every member has mtime 0, uid/gid 0, empty user/group
names, mode 0644, and members are sorted by name within a sample; samples keep the order
they are given in. Writes go to a temporary file that is renamed into place, so a crashed
writer never leaves a half shard that looks complete.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

KEY_RE = re.compile(r"^[^./][^./]*$")


def encode_json(obj) -> bytes:
    """Stable JSON bytes (sorted keys, compact) so equal documents give equal shards."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))


def check_key(key: str) -> str:
    """Keys may not contain dots (webdataset splits member names at the first dot) or slashes."""
    if not KEY_RE.match(key):
        raise ValueError(f"invalid sample key {key!r}: no dots, no slashes, not empty")
    return key


def write_shard(path: str | os.PathLike, samples) -> int:
    """Write `samples` (iterable of (key, {suffix: bytes})) to a tar; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for key, members in samples:
                check_key(key)
                for suffix in sorted(members):
                    _add(tar, f"{key}.{suffix}", members[suffix])
                n += 1
    os.replace(tmp, path)
    return n


def sample_members(doc: dict, images: list[bytes | None]) -> dict[str, bytes]:
    """A schema document + image bytes (aligned with doc['images']) -> tar members."""
    members = {"json": encode_json(doc)}
    for name, data in zip(doc["images"], images):
        if name is not None:
            members[name] = data
    return members


def update_sizes(directory: str | os.PathLike, sizes: dict[str, int]) -> None:
    """Merge per-shard sample counts into DIR/sizes.json (sorted, stable bytes)."""
    p = Path(directory) / "sizes.json"
    cur = {}
    if p.is_file():
        try:
            cur = json.loads(p.read_text())
        except (ValueError, OSError):
            cur = {}
    cur.update(sizes)
    p.write_text(json.dumps(dict(sorted(cur.items())), indent=1) + "\n")


class ShardWriter:
    """Write samples into `DIR/{prefix}-NNNNNN.tar`, `maxcount` samples per shard; on close,
    record the counts in DIR/sizes.json."""

    def __init__(self, directory, prefix: str, maxcount: int = 1000, start: int = 0):
        self.dir = Path(directory)
        self.prefix = prefix
        self.maxcount = maxcount
        self.index = start
        self.buffer: list = []
        self.sizes: dict[str, int] = {}

    def write(self, key: str, members: dict[str, bytes]) -> None:
        self.buffer.append((check_key(key), members))
        if len(self.buffer) >= self.maxcount:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"{self.prefix}-{self.index:06d}.tar"
        self.sizes[name] = write_shard(self.dir / name, self.buffer)
        self.buffer = []
        self.index += 1

    def close(self) -> dict[str, int]:
        self.flush()
        update_sizes(self.dir, self.sizes)
        return self.sizes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
