"""Bad input never stops the stream: each fault is skipped and counted exactly, nothing is
unpickled, every good sample arrives; `mmkit data inspect` reports the same counts."""

import io
import json
import pickle
import struct
import zlib

import pytest

from mmkit.cli import main as cli_main
from mmkit.data import build_stream, inspect_shards
from mmkit.data.synth import make_doc
from mmkit.data.writer import encode_json, sample_members, write_shard


class _CreatesFile:
    """Unpickling this opens (creates) `path`: what a malicious .pyd member would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _png_header(w, h) -> bytes:
    """A PNG whose header claims w x h pixels (a decompression bomb's calling card)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\0" * 64)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat)))


def _good(i):
    doc, imgs = make_doc("vqa", i, 5, "train")
    return f"vqa{i:08d}", sample_members(doc, imgs)


def _tar_with_duplicate(path, samples, dup_key):
    """write_shard cannot write duplicates (dict members); add one by appending raw members."""
    import tarfile

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            names = sorted(members)
            if key == dup_key:
                names = names + [names[-1]]
            for suffix in names:
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(members[suffix])
                tar.addfile(info, io.BytesIO(members[suffix]))


@pytest.fixture
def faulty(tmp_path):
    marker = tmp_path / "PWNED"
    d = tmp_path / "shards"
    d.mkdir()
    good = []
    # shard 0: 6 good + corrupt image + invalid json + missing image + unsafe .pyd + bomb + missing json
    s0 = []
    for i in range(6):
        s0.append(_good(i))
        good.append(s0[-1][0])
    k, m = _good(100)
    m["img0.png"] = m["img0.png"][:40] + b"garbage" * 20
    s0.append(("bad00000001", m))
    k, m = _good(101)
    m["json"] = b'{"kind": "vqa", "texts": [nul'
    s0.append(("bad00000002", m))
    k, m = _good(102)
    del m["img0.png"]
    s0.append(("bad00000003", m))
    k, m = _good(103)
    m["pyd"] = pickle.dumps(_CreatesFile(str(marker)))
    s0.append(("bad00000004", m))
    k, m = _good(104)
    m["img0.png"] = _png_header(100_000, 100_000)
    s0.append(("bad00000005", m))
    s0.append(("bad00000006", {"img0.png": _good(105)[1]["img0.png"]}))
    k, m = _good(106)
    m["json"] = encode_json({"kind": "vqa", "texts": ["a", "b"], "images": ["img0.png", None]})
    s0.append(("bad00000007", m))  # both entries at position 0 -> invalid schema
    write_shard(d / "a-000000.tar", s0)
    # shard 1: 4 good, then one with a duplicate member, then 2 good
    s1 = [_good(i) for i in range(6, 10)] + [("dup00000001", _good(107)[1])] + [_good(i) for i in range(10, 12)]
    good += [k for k, _ in s1 if not k.startswith("dup")]
    _tar_with_duplicate(d / "a-000001.tar", s1, "dup00000001")
    # shard 2: 5 samples, truncated inside the 5th sample's last member
    s2 = [_good(i) for i in range(12, 17)]
    write_shard(d / "a-000002.tar", s2)
    data = (d / "a-000002.tar").read_bytes()
    # cut 10 bytes into the data of the last member (json of vqa00000016)
    last = data.rfind(b"vqa00000016.json")
    cut = (last // 512 + 1) * 512 + 10
    (d / "a-000002.tar").write_bytes(data[:cut])
    good += [k for k, _ in s2[:4]]
    # shard 3: empty
    write_shard(d / "a-000003.tar", [])
    # shard 4: not a tar at all
    (d / "a-000004.tar").write_bytes(b"this is not a tar file" * 10)
    expected = {"corrupt_image": 1, "invalid_json": 1, "missing_image": 1, "unsafe_member": 1,
                "image_too_large": 1, "missing_json": 1, "invalid_schema": 1, "duplicate_member": 1,
                "truncated_tar": 1, "empty_shard": 1, "unreadable_shard": 1}
    return d, good, expected, marker


def test_inspect_counts_every_fault(faulty, capsys):
    d, good, expected, marker = faulty
    stats = inspect_shards([d])
    assert stats["skipped"] == expected
    assert stats["ok"] == len(good) == 16
    assert stats["samples"] == len(good) + sum(expected.values())
    assert cli_main(["data", "inspect", str(d), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == stats
    assert not marker.exists()
    # the payload is armed: unpickling the same kind of member does create its file
    armed = marker.with_name("ARMED")
    pickle.loads(pickle.dumps(_CreatesFile(str(armed)))).close()
    assert armed.exists()


def test_inspect_fails_cleanly_when_nothing_opens(tmp_path, capsys):
    assert cli_main(["data", "inspect", str(tmp_path / "missing.tar"), "--json"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmkit: error:") and len(err.splitlines()) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_reader_skips_and_counts_faults(faulty, workers):
    d, good, expected, marker = faulty
    s = build_stream(d, batch_size=4, seed=1, num_workers=workers, infinite=False, shuffle_buffer=8)
    keys = [doc["__key__"] for b in s for doc in b]
    st = s.stats
    assert st["skipped"] == expected
    assert st["ok"] == len(good) and set(keys) == set(good)
    # the epoch lost 11 items to faults; padding keeps the nominal batch count
    assert len(keys) == len(good) + st.get("padded", 0)
    assert not marker.exists()


def test_errors_are_logged_rate_limited_without_sleeping(tmp_path, caplog):
    import logging
    import time

    samples = [(f"bad{i:08d}", {"json": b"{broken"}) for i in range(300)] + [_good(0)]
    write_shard(tmp_path / "x-000000.tar", samples)
    caplog.set_level(logging.WARNING, logger="mmkit.data")
    t = time.perf_counter()
    s = build_stream(tmp_path, batch_size=1, infinite=False, decode_images=False)
    keys = [d["__key__"] for b in s for d in b]
    assert time.perf_counter() - t < 10  # webdataset's warn handlers would sleep 0.5 s x 300
    assert s.stats["skipped"] == {"invalid_json": 300} and "vqa00000000" in keys
    assert len([r for r in caplog.records if "invalid_json" in r.getMessage()]) == 1  # first one only


def test_infinite_stream_drops_a_source_with_no_valid_sample(tmp_path):
    import itertools

    (tmp_path / "bad").mkdir()
    (tmp_path / "good").mkdir()
    write_shard(tmp_path / "bad" / "b-000000.tar", [(f"bad{i:08d}", {"json": b"[1,"}) for i in range(5)])
    write_shard(tmp_path / "good" / "g-000000.tar", [_good(i) for i in range(6)])
    s = build_stream({str(tmp_path / "bad"): 0.9, str(tmp_path / "good"): 0.1}, batch_size=4, decode_images=False)
    batches = list(itertools.islice(s, 6))  # would spin forever on the bad source otherwise
    assert all(len(b) == 4 for b in batches)
    assert s.stats["skipped"] == {"invalid_json": 5}  # its one epoch, then it is dropped
