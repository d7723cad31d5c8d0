"""The one reader for every model family: webdataset tar expansion + torch DataLoader.

Why not a plain `wds.WebDataset(...)` pipeline: webdataset splits shards by node/worker
before shuffling (a rank keeps a fixed shard subset), cannot equalise batch counts when
shards are uneven or fewer than workers, has no resume, unpickles `.pyd` members in its
default decoders and sleeps 0.5 s per error in its warn handlers. So the schedule is ours,
the tar reading is webdataset's (`tar_file_iterator`, `base_plus_ext`):

* Epoch plan, identical on every rank: the source's shards are shuffled with
  rng(seed, source, epoch); the concatenated sample sequence (counts from `sizes.json`,
  else counted once) is cut into `world_size` equal contiguous ranges (wrapping around to
  pad, so every rank gets ceil(N / world) samples), and each rank's range into
  `num_workers` near-equal ranges. Every sample is read exactly once per epoch (plus at
  most world-1 wrap-around repeats when N % world != 0); every rank yields the same
  number of batches; fewer shards than workers is fine (workers share a shard and skip
  to their offset).
* Sample shuffle per (seed, source, epoch, rank, worker) in a buffer of raw bytes;
  decoding (json + the images the json names, header-checked) happens after the shuffle,
  in the worker.
* Exact resume: a worker's position is (epoch, items taken from the shuffle) per source
  plus a counter for the weighted source choice (counter-based hashing, no RNG state).
  Restoring replays the epoch's raw bytes up to the position (no decoding) and rotates
  the DataLoader workers so the round-robin continues with the right one.
* Bad input is a counted skip, never an exception: each fault is one "sample" with a
  reason in `stats["skipped"]`, logged for the first occurrence and then every 1000th.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger("mmkit.data")

IMAGE_EXTS = {"png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm"}
# members that other tools decode with pickle / torch.load / numpy: a sample carrying one is
# rejected outright (we would never decode it, but its presence means an untrusted writer).
UNSAFE_EXTS = {"pyd", "pkl", "pickle", "pth", "pt", "ckpt", "bin", "npy", "npz", "mp", "msgpack", "ten"}
MAX_IMAGE_PIXELS = 4096 * 4096
LOG_EVERY = int(os.environ.get("MMKIT_DATA_ERROR_LOG_EVERY", "1000"))

REASONS = ("truncated_tar", "unreadable_shard", "empty_shard", "duplicate_member", "missing_json",
           "invalid_json", "invalid_schema", "missing_image", "corrupt_image", "image_too_large",
           "unsafe_member", "map_fn")


# ----------------------------------------------------------------------------- helpers


def _derive(*parts) -> int:
    """A 64-bit seed from any tuple of ints/strings (stable across processes and runs)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8)
    return struct.unpack("<Q", h.digest())[0]


def _uniform(*parts) -> float:
    return _derive(*parts) / 2.0**64


class _RateLimitedLog:
    """First error of each reason, then every LOG_EVERY-th; never sleeps."""

    def __init__(self):
        self.counts: Counter = Counter()

    def __call__(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n == 1 or n % LOG_EVERY == 0:
            log.warning("skipped sample (%s, %d so far in this worker): %s", reason, n, where)



def expand_shards(source) -> list[str]:
    """A directory, a glob/brace pattern, a shard path, or a list of these -> shard paths."""
    if isinstance(source, (list, tuple)):
        out = []
        for s in source:
            out += expand_shards(s)
        return out
    source = str(source)
    p = Path(source)
    if p.is_dir():
        return sorted(str(x) for x in p.iterdir() if x.name.endswith((".tar", ".tgz", ".tar.gz")))
    if any(c in source for c in "*?[{"):
        import braceexpand

        out = []
        for pat in braceexpand.braceexpand(source):
            out += sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
        return out
    return [source]


# ----------------------------------------------------------------------------- raw level


def iter_shard_raw(path: str) -> Iterator[dict]:
    """Raw items of one shard, in file order: {"__key__", "__url__", "members": {suffix: bytes}}
    or a fault {"__fault__": reason, "__url__", "__key__"}. Never raises."""
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    try:
        f = open(path, "rb")
    except OSError:
        yield {"__fault__": "unreadable_shard", "__url__": path, "__key__": None}
        return
    n_items = 0
    cur: dict | None = None
    with f:
        try:
            for member in tar_file_iterator(f):
                key, suffix = base_plus_ext(member["fname"])
                if key is None:
                    continue  # not "<key>.<suffix>": not part of any sample
                suffix = suffix.lower()
                if cur is None or key != cur["__key__"]:
                    if cur is not None:
                        n_items += 1
                        yield _finish(cur)
                    cur = {"__key__": key, "__url__": path, "members": {}, "dup": False}
                if suffix in cur["members"]:
                    cur["dup"] = True
                else:
                    cur["members"][suffix] = member["data"]
        except Exception as e:  # truncated / corrupt tar: the sample being read is lost
            kind = "truncated_tar" if n_items or cur is not None else "unreadable_shard"
            yield {"__fault__": kind, "__url__": path, "__key__": cur["__key__"] if cur else None,
                   "error": f"{type(e).__name__}: {e}"}
            return
        if cur is not None:
            n_items += 1
            yield _finish(cur)
    if n_items == 0:
        yield {"__fault__": "empty_shard", "__url__": path, "__key__": None}


def _finish(cur: dict) -> dict:
    if cur.pop("dup"):
        return {"__fault__": "duplicate_member", "__url__": cur["__url__"], "__key__": cur["__key__"]}
    return cur


_COUNT_CACHE: dict[tuple, int] = {}


def shard_count(path: str) -> int:
    """Number of raw items (samples, or one fault) of a shard: sizes.json beside it if it
    names the shard, else counted by reading it once (cached per path/size/mtime)."""
    p = Path(path)
    sizes = p.parent / "sizes.json"
    try:
        st = p.stat()
        ck = (str(p), st.st_size, st.st_mtime_ns)
    except OSError:
        return 1  # unreadable: one fault item
    if ck in _COUNT_CACHE:
        return _COUNT_CACHE[ck]
    n = None
    if sizes.is_file():
        try:
            n = json.loads(sizes.read_text()).get(p.name)
        except (ValueError, OSError, AttributeError):
            n = None
    if not isinstance(n, int) or n < 0:
        n = sum(1 for _ in iter_shard_raw(str(p)))
    n = max(1, n)  # an empty shard is one "empty_shard" item
    _COUNT_CACHE[ck] = n
    return n


# ----------------------------------------------------------------------------- decoding


def decode_sample(raw: dict, decode_images: bool = True, max_pixels: int = MAX_IMAGE_PIXELS):
    """Raw item -> (document, None) or (None, reason). Only the JSON member and the image
    members it names are ever parsed; images are header-checked before decoding."""
    if "__fault__" in raw:
        return None, raw["__fault__"]
    members = raw["members"]
    if any(s.rsplit(".", 1)[-1] in UNSAFE_EXTS for s in members):
        return None, "unsafe_member"
    if "json" not in members:
        return None, "missing_json"
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None, "invalid_json"
    if not _valid_schema(meta):
        return None, "invalid_schema"
    images = []
    for name in meta["images"]:
        if name is None:
            images.append(None)
            continue
        if name.rsplit(".", 1)[-1].lower() not in IMAGE_EXTS:
            return None, "invalid_schema"
        data = members.get(name.lower())
        if data is None:
            return None, "missing_image"
        img, reason = _decode_image(data, decode_images, max_pixels)
        if reason:
            return None, reason
        images.append(img)
    doc = {"__key__": raw["__key__"], "__url__": raw["__url__"], "kind": meta.get("kind"),
           "texts": meta["texts"], "images": images,
           "meta": {k: v for k, v in meta.items() if k not in ("kind", "texts", "images")}}
    return doc, None


def _valid_schema(meta) -> bool:
    if not isinstance(meta, dict) or not isinstance(meta.get("kind"), str):
        return False
    texts, images = meta.get("texts"), meta.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images) or not texts:
        return False
    for t, i in zip(texts, images):
        if (t is None) == (i is None):  # exactly one non-null per position
            return False
        if t is not None and not isinstance(t, str):
            return False
        if i is not None and (not isinstance(i, str) or "/" in i):
            return False
    return True


def _decode_image(data: bytes, decode: bool, max_pixels: int):
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        w, h = img.size
    except Image.DecompressionBombError:
        return None, "image_too_large"
    except Exception:
        return None, "corrupt_image"
    if w * h > max_pixels or w <= 0 or h <= 0:
        return None, "image_too_large"
    try:
        if decode:
            img.load()
            return (img if img.mode == "RGB" else img.convert("RGB")), None
        img.verify()  # checks structure/CRCs without keeping pixels
        return data, None
    except Exception:
        return None, "corrupt_image"


def inspect_shards(paths, progress: bool = False) -> dict:
    """Validate shards: {"samples": seen, "ok": valid, "skipped": {reason: n}}.
    Raises MmkitError when no shard can be opened at all."""
    from mmkit.errors import MmkitError

    shards = expand_shards(list(paths))
    if not shards:
        raise MmkitError("no shards found in " + " ".join(map(str, paths)))
    stats = {"samples": 0, "ok": 0, "skipped": {}}
    opened = 0
    it = shards
    if progress and len(shards) > 1:
        from tqdm import tqdm

        it = tqdm(shards, desc="inspect", unit="shard")
    for path in it:
        first = True
        for raw in iter_shard_raw(path):
            if first and raw.get("__fault__") != "unreadable_shard":
                opened += 1
            first = False
            _, reason = decode_sample(raw, decode_images=True)
            stats["samples"] += 1
            if reason is None:
                stats["ok"] += 1
            else:
                stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
    if opened == 0:
        raise MmkitError(f"none of the {len(shards)} shard(s) could be opened (first: {shards[0]})")
    return stats


# ----------------------------------------------------------------------------- schedule


def consumer_range(n: int, rank: int, world: int, worker: int, workers: int) -> tuple[int, int]:
    """[start, start + length) of the epoch's sample sequence (indices mod n) for one
    (rank, worker): ranks get ceil(n / world) each (wrapping), workers split that."""
    per_rank = -(-n // world)
    base, extra = divmod(per_rank, workers)
    start = rank * per_rank + worker * base + min(worker, extra)
    return start, base + (1 if worker < extra else 0)


def _segments(counts: list[int], start: int, length: int) -> list[tuple[int, int, int]]:
    """(shard index in epoch order, offset, count) pieces covering [start, start+length) mod N."""
    total = sum(counts)
    out: list[tuple[int, int, int]] = []
    if total == 0 or length <= 0:
        return out
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    pos, left = start % total, length
    while left > 0:
        i = max(j for j in range(len(counts)) if cum[j] <= pos)
        off = pos - cum[i]
        k = min(counts[i] - off, left)
        if out and out[-1][0] == i and out[-1][1] + out[-1][2] == off:
            out[-1] = (i, out[-1][1], out[-1][2] + k)
        else:
            out.append((i, off, k))
        left -= k
        pos = (pos + k) % total
    return out


def _shuffled(items: Iterator, bufsize: int, rng) -> Iterator:
    if bufsize <= 1:
        yield from items
        return
    buf: list = []
    for x in items:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        j = rng.randrange(len(buf))
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


class _Source:
    """One weighted source: its shards and their counts (computed once, in the parent)."""

    def __init__(self, spec, weight: float, index: int):
        self.spec = str(spec)
        self.weight = float(weight)
        self.index = index
        self.shards = expand_shards(spec)
        if not self.shards:
            from mmkit.errors import UsageError

            raise UsageError(f"no shards found for data source {spec}")
        self.counts = {s: shard_count(s) for s in self.shards}

    def epoch_order(self, seed: int, epoch: int) -> list[str]:
        import random

        order = list(self.shards)
        random.Random(_derive(seed, self.index, epoch, "shards")).shuffle(order)
        return order

    def total(self) -> int:
        return sum(self.counts.values())


def _raw_range(order: list[str], counts: list[int], start: int, length: int) -> Iterator[dict]:
    for i, off, k in _segments(counts, start, length):
        taken = 0
        for j, item in enumerate(iter_shard_raw(order[i])):
            if j < off:
                continue
            yield item
            taken += 1
            if taken >= k:
                break


# ----------------------------------------------------------------------------- worker side


class _Plan:
    """Everything a worker needs (picklable; sent to DataLoader workers)."""

    def __init__(self, sources, seed, rank, world, workers, batch_size, shuffle_buffer,
                 decode_images, map_fn, collate_fn, infinite, max_pixels, memo=False):
        self.sources = sources
        self.seed, self.rank, self.world, self.workers = seed, rank, world, workers
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.decode_images, self.map_fn, self.collate_fn = decode_images, map_fn, collate_fn
        self.infinite, self.max_pixels = infinite, max_pixels
        # (shard url, key) -> (map_fn output, skip reason); each process (DataLoader worker) fills its own
        self.memo: dict | None = {} if memo else None

    def worker_length(self, src: _Source, worker: int) -> int:
        return consumer_range(src.total(), self.rank, self.world, worker, self.workers)[1]

    def source_epoch(self, src: _Source, worker: int, epoch: int) -> Iterator[dict]:
        """Shuffled raw items of one source for (epoch, this rank, worker)."""
        import random

        order = src.epoch_order(self.seed, epoch)
        counts = [src.counts[s] for s in order]
        start, length = consumer_range(sum(counts), self.rank, self.world, worker, self.workers)
        rng = random.Random(_derive(self.seed, src.index, epoch, self.rank, worker, "samples"))
        return _shuffled(_raw_range(order, counts, start, length), self.shuffle_buffer, rng)


def _source_stream(plan: _Plan, src: _Source, worker: int, epoch: int, pos: int, one_epoch: bool):
    """(epoch, pos_after, raw item) from (epoch, pos) on; replays up to pos without decoding."""
    if plan.worker_length(src, worker) == 0:
        return
    while True:
        n = 0
        for item in plan.source_epoch(src, worker, epoch):
            n += 1
            if n <= pos:
                continue
            yield epoch, n, item
        if one_epoch:
            return
        epoch, pos = epoch + 1, 0


def worker_batches(plan: _Plan, worker: int, wstate: dict) -> Iterator[tuple]:
    """Batches of one logical worker from its state: ("batch", worker, batch, state, stats)
    ..., then ("end", worker, None, state, stats) if the stream ends."""
    srcs = plan.sources
    pos = [list(p) for p in wstate["src"]]
    mix, good, target = wstate["mix"], wstate["good"], wstate.get("target")
    # good samples per source in its current epoch: a source whose whole epoch (for this
    # worker) held no valid sample is dropped, instead of spinning forever on bad data
    epgood = list(wstate.get("epgood") or [0] * len(srcs))
    one_epoch = not plan.infinite
    if target is None and one_epoch:
        target = sum(plan.worker_length(s, worker) for s in srcs)
    streams = [_source_stream(plan, s, worker, pos[i][0], pos[i][1], one_epoch) for i, s in enumerate(srcs)]
    active = [plan.worker_length(s, worker) > 0 for s in srcs]
    stats: Counter = Counter()
    log_skip = _RateLimitedLog()
    batch: list = []
    recent: list = []  # last good outputs, to pad a finite epoch that lost samples to faults

    def state():
        return {"src": [list(p) for p in pos], "mix": mix, "good": good, "target": target, "done": False,
                "epgood": list(epgood)}

    while any(active):
        if one_epoch and good >= target:
            break
        # weighted source choice (counter-based, so the state is one integer)
        idx = [i for i, a in enumerate(active) if a]
        if len(srcs) == 1:
            i = 0
        else:
            u = _uniform(plan.seed, plan.rank, worker, mix, "mix")
            mix += 1
            wsum = sum(srcs[j].weight for j in idx)
            acc, i = 0.0, idx[-1]
            for j in idx:
                acc += srcs[j].weight / wsum
                if u < acc:
                    i = j
                    break
        try:
            ep, n, raw = next(streams[i])
        except StopIteration:
            active[i] = False
            continue
        if ep != pos[i][0]:  # source i started a new epoch
            if epgood[i] == 0:
                log.error("data source %s has no valid sample for rank %d worker %d in a whole epoch; "
                          "dropping it", srcs[i].spec, plan.rank, worker)
                active[i] = False
                continue
            epgood[i] = 0
        pos[i] = [ep, n]
        stats["samples"] += 1
        mkey = (raw.get("__url__"), raw.get("__key__")) if plan.memo is not None and "__fault__" not in raw else None
        if mkey is not None and mkey in plan.memo:
            doc, reason = plan.memo[mkey]
        else:
            doc, reason = decode_sample(raw, plan.decode_images, plan.max_pixels)
            if reason is None:
                # the pass over this source: lets map_fns vary random augmentation per epoch while
                # staying a pure function of (seed, key, epoch), hence exactly resumable
                doc["__epoch__"] = ep
            if reason is None and plan.map_fn is not None:
                doc = plan.map_fn(doc)
                if doc is None:
                    reason = "map_fn"
            if mkey is not None:
                plan.memo[mkey] = (doc, reason)
        if reason is not None:
            stats["skip:" + reason] += 1
            log_skip(reason, f"{raw.get('__url__')} key={raw.get('__key__')}")
            continue
        stats["ok"] += 1
        good += 1
        epgood[i] += 1
        batch.append(doc)
        if one_epoch:
            recent = (recent + [doc])[-plan.batch_size:]
        if len(batch) == plan.batch_size:
            yield "batch", worker, _collate(plan, batch), state(), dict(stats)
            batch, stats = [], Counter()
    # a finite epoch that lost samples to faults is padded with recent good samples, so
    # every rank still yields the same number of batches (no DDP hang)
    if one_epoch and recent:
        k = 0
        while good < target:
            batch.append(recent[k % len(recent)])
            stats["padded"] += 1
            good += 1
            k += 1
            if len(batch) == plan.batch_size:
                yield "batch", worker, _collate(plan, batch), state(), dict(stats)
                batch, stats = [], Counter()
    if batch:
        yield "batch", worker, _collate(plan, batch), state(), dict(stats)
        stats = Counter()
    st = state()
    st["done"] = True
    yield "end", worker, None, st, dict(stats)


def _collate(plan: _Plan, batch: list):
    return plan.collate_fn(batch) if plan.collate_fn is not None else batch


def _identity(x):
    return x


def _make_dataset(plan: _Plan, wstates: list[dict], rotation: int):
    """A torch IterableDataset whose DataLoader worker p plays logical worker
    (p + rotation) % workers (built here so importing mmkit.data does not import torch)."""
    import torch.utils.data as tud

    class WorkerDataset(tud.IterableDataset):
        def __iter__(self):
            info = tud.get_worker_info()
            physical = info.id if info is not None else 0
            logical = (physical + rotation) % plan.workers
            ws = wstates[logical]
            if ws.get("done"):
                return iter(())
            return worker_batches(plan, logical, ws)

    return WorkerDataset()


# ----------------------------------------------------------------------------- the stream


class Stream:
    """Iterable of batches with `state_dict()` / `load_state_dict()` and `stats`."""

    def __init__(self, plan: _Plan, num_workers: int, prefetch_factor: int = 4):
        self.plan = plan
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self._reset_epoch(0)
        self._stats: Counter = Counter()

    # state ---------------------------------------------------------------
    def _fresh_worker(self, epoch: int) -> dict:
        return {"src": [[epoch, 0] for _ in self.plan.sources], "mix": 0, "good": 0, "target": None,
                "done": False, "epgood": [0] * len(self.plan.sources)}

    def _reset_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.workers = [self._fresh_worker(epoch) for _ in range(self.plan.workers)]
        self.next_worker = 0
        self.batches_in_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Start (finite mode) epoch `epoch` from its beginning on the next iter()."""
        self._reset_epoch(int(epoch))

    def state_dict(self) -> dict:
        return {"version": 1, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "next_worker": self.next_worker, "workers": json.loads(json.dumps(self.workers)),
                "stats": dict(self._stats), "num_workers": self.plan.workers, "rank": self.plan.rank,
                "world_size": self.plan.world, "seed": self.plan.seed}

    def load_state_dict(self, state: dict) -> None:
        from mmkit.errors import UsageError

        if state.get("num_workers") != self.plan.workers or state.get("world_size") != self.plan.world:
            raise UsageError("data state was saved with a different num_workers/world_size; exact resume "
                             f"needs the same (saved {state.get('num_workers')}/{state.get('world_size')}, "
                             f"now {self.plan.workers}/{self.plan.world})")
        if len(state["workers"][0]["src"]) != len(self.plan.sources):
            raise UsageError("data state was saved with a different number of sources")
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.next_worker = int(state["next_worker"])
        self.workers = json.loads(json.dumps(state["workers"]))
        self._stats = Counter(state.get("stats", {}))

    @property
    def stats(self) -> dict:
        skipped = {k[5:]: v for k, v in sorted(self._stats.items()) if k.startswith("skip:") and v}
        out = {"samples": self._stats.get("samples", 0), "ok": self._stats.get("ok", 0), "skipped": skipped}
        if self._stats.get("padded"):
            out["padded"] = self._stats["padded"]
        return out

    # iteration -----------------------------------------------------------
    def _items(self) -> Iterator[tuple]:
        rotation = self.next_worker
        if self.num_workers == 0:  # a single in-process "worker"
            if self.workers[0].get("done"):
                return
            yield from worker_batches(self.plan, 0, self.workers[0])
            return
        import torch.utils.data as tud

        ds = _make_dataset(self.plan, self.workers, rotation)
        loader = tud.DataLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                                prefetch_factor=self.prefetch_factor, persistent_workers=False)
        yield from loader

    def __iter__(self):
        while True:
            for kind, worker, batch, wstate, stats in self._items():
                self.workers[worker] = wstate
                self.next_worker = (worker + 1) % self.plan.workers
                self._stats.update(stats)
                if kind == "batch":
                    self.batches_in_epoch += 1
                    yield batch
            if self.plan.infinite:
                return  # every worker's stream ended: nothing left to read at all
            self._reset_epoch(self.epoch + 1)
            return

    def __len__(self) -> int:
        """Batches per epoch on this rank (finite mode)."""
        b = self.plan.batch_size
        return sum(-(-sum(self.plan.worker_length(s, w) for s in self.plan.sources) // b)
                   for w in range(self.plan.workers))


def build_stream(sources, *, batch_size: int, collate_fn: Callable | None = None,
                 map_fn: Callable | None = None, seed: int = 0, rank: int | None = 0,
                 world_size: int | None = 1, num_workers: int = 0, decode_images: bool = True,
                 shuffle_buffer: int = 1000, infinite: bool = True,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, memo: bool = False) -> Stream:
    """The reader (docs/design.md): batches of documents (or map_fn outputs, collated).

    `sources`: a directory, a glob, a list of shard paths, or {dir_or_pattern: weight}.
    `rank`/`world_size` None -> from the RANK / WORLD_SIZE environment variables.
    `memo`: map_fn's output depends on the sample alone (not on `__epoch__`), so each sample's
    output (or skip) is kept by (shard, key) and later epochs reuse it without decoding. Why:
    small data seen for several epochs (the quickstart's Chameleon: ~3) spends most of its
    stream time decoding and tokenizing the same samples again. Order, batches, state and
    counts are unchanged; memory grows with the dataset's map_fn outputs."""
    from mmkit.errors import UsageError

    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if memo and map_fn is None:
        raise UsageError("build_stream(memo=True) needs a map_fn (memoised docs would keep their first __epoch__)")
    if batch_size < 1 or num_workers < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"bad reader settings: batch_size={batch_size} num_workers={num_workers} "
                         f"rank={rank} world_size={world_size}")
    if isinstance(sources, dict):
        specs = list(sources.items())
        if not specs or any(float(w) <= 0 for _, w in specs):
            raise UsageError("weighted sources need positive weights")
    else:
        specs = [(sources, 1.0)]
    import webdataset.tariterators  # noqa: F401  (import once here; forked workers inherit it)

    srcs = [_Source(spec, w, i) for i, (spec, w) in enumerate(specs)]
    plan = _Plan(srcs, seed, rank, world_size, max(1, num_workers), batch_size, shuffle_buffer,
                 decode_images, map_fn, collate_fn, infinite, max_image_pixels, memo)
    return Stream(plan, num_workers)
