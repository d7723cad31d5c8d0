"""The reader: round trip, rank/worker split, exact resume in a new process, mixing, packing."""

import itertools
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mmkit.data import build_stream, pack_sequences
from mmkit.data.packing import cu_seqlens, doc_attention_mask
from mmkit.data.reader import consumer_range, iter_shard_raw
from mmkit.data.synth import make_doc
from mmkit.data.writer import sample_members, write_shard
from mmkit.errors import UsageError


def _keys(batch):
    return [d["__key__"] for d in batch]


def _kind_index(key):
    kind = key.rstrip("0123456789")
    return kind, int(key[len(kind):])


def test_round_trip_equals_generated_documents(shapes_data):
    train = shapes_data / "train"
    s = build_stream(train, batch_size=5, seed=3, infinite=False, decode_images=False, shuffle_buffer=20)
    docs = [d for b in s for d in b]
    assert len(docs) == 3 * 64 and len({d["__key__"] for d in docs}) == 3 * 64
    for d in docs:
        kind, i = _kind_index(d["__key__"])
        ref, imgs = make_doc(kind, i, 0, "train")
        assert d["kind"] == kind and d["texts"] == ref["texts"]
        assert d["images"] == imgs  # raw PNG bytes, exactly the generated ones
        assert d["meta"]["scenes"] == ref["scenes"]
    # seeded order: same seed -> same order; another seed -> another order
    again = [d["__key__"] for b in build_stream(train, batch_size=5, seed=3, infinite=False,
                                                 decode_images=False, shuffle_buffer=20) for d in b]
    other = [d["__key__"] for b in build_stream(train, batch_size=5, seed=4, infinite=False,
                                                 decode_images=False, shuffle_buffer=20) for d in b]
    assert again == [d["__key__"] for d in docs] and other != again and sorted(other) == sorted(again)
    # decoded images are PIL RGB of the scene's size
    d = next(iter(build_stream(train / "vqa-000000.tar", batch_size=1, infinite=False)))[0]
    assert d["images"][0].mode == "RGB" and d["images"][0].size == (d["meta"]["scenes"][0]["width"],
                                                                    d["meta"]["scenes"][0]["height"])
    assert d["meta"]["answers"] and len(d["meta"]["answers"]) == 10


def test_plain_webdataset_reads_the_same_members(shapes_data):
    import webdataset as wds

    shards = sorted(str(p) for p in (shapes_data / "train").glob("*.tar"))
    ours = {}
    for sh in shards:
        for raw in iter_shard_raw(sh):
            ours[raw["__key__"]] = raw["members"]
    theirs = {}
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):  # no .decode(): raw bytes
        theirs[sample["__key__"]] = {k: v for k, v in sample.items() if not k.startswith("__")}
    assert theirs == ours and len(ours) == 192


def _uneven_shards(root: Path, sizes=(7, 5, 8)):
    root.mkdir()
    i = 0
    for s, n in enumerate(sizes):
        samples = []
        for _ in range(n):
            doc, imgs = make_doc("caption", i, 1, "train")
            samples.append((f"caption{i:08d}", sample_members(doc, imgs)))
            i += 1
        write_shard(root / f"caption-{s:06d}.tar", samples)  # no sizes.json: counted by reading
    return i


def test_two_ranks_two_workers_every_sample_once(tmp_path, monkeypatch):
    n = _uneven_shards(tmp_path / "d")
    streams = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        streams.append(build_stream(tmp_path / "d", batch_size=3, seed=7, rank=None, world_size=None, num_workers=2,
                                    infinite=False, decode_images=False, shuffle_buffer=4))
    epochs = []
    for epoch in range(2):  # iterating a finite stream again runs the next epoch
        seen, batches = [], []
        for s in streams:
            got = [_keys(b) for b in s]
            batches.append(len(got))
            assert len(got) == len(s)
            seen += [k for b in got for k in b]
        assert batches[0] == batches[1] == 4  # 10 samples per rank, 5 per worker -> 2+2 batches
        assert len(seen) == n and len(set(seen)) == n, Counter(seen).most_common(3)
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # the shard/sample order changes with the epoch
    streams[0].set_epoch(0)
    assert [k for b in streams[0] for k in _keys(b)] == epochs[0][:10]


def test_consumer_ranges_cover_and_pad():
    for n in (1, 5, 20, 23):
        for world in (1, 2, 3):
            for workers in (1, 2, 4):
                idx = []
                for r in range(world):
                    per_rank = sum(consumer_range(n, r, world, w, workers)[1] for w in range(workers))
                    assert per_rank == -(-n // world)
                    for w in range(workers):
                        a, k = consumer_range(n, r, world, w, workers)
                        idx += [(a + j) % n for j in range(k)]
                assert set(idx) == set(range(n)) and len(idx) - n < world


RESUME_SCRIPT = r"""
import json, sys, itertools
from mmkit.data import build_stream
src, state, m = json.loads(sys.argv[1]), json.loads(open(sys.argv[2]).read()), int(sys.argv[3])
s = build_stream(src, batch_size=4, seed=11, num_workers=2, shuffle_buffer=16, decode_images=False)
s.load_state_dict(state)
out = [[d["__key__"] for d in b] for b in itertools.islice(s, m)]
print(json.dumps({"batches": out, "stats": s.stats}))
"""


def test_resume_in_a_new_process_equals_uninterrupted(shapes_data, tmp_path):
    train = shapes_data / "train"
    src = {str(train / "caption-*.tar"): 0.6, str(train / "vqa-*.tar"): 0.3, str(train / "interleaved-*.tar"): 0.1}
    mk = lambda: build_stream(src, batch_size=4, seed=11, num_workers=2, shuffle_buffer=16, decode_images=False)
    k, m = 7, 30  # 30 more batches run past the end of the 1st epoch of every source
    ref = [_keys(b) for b in itertools.islice(mk(), k + m)]
    s = mk()
    head = [_keys(b) for b in itertools.islice(s, k)]
    assert head == ref[:k]
    (tmp_path / "state.json").write_text(json.dumps(s.state_dict()))
    out = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(src), str(tmp_path / "state.json"), str(m)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["batches"] == ref[k:]
    assert res["stats"]["samples"] == (k + m) * 4 and res["stats"]["ok"] == (k + m) * 4
    # weighted mixing: captions dominate, then vqa, then interleaved
    kinds = Counter(_kind_index(key)[0] for b in ref for key in b)
    assert kinds["caption"] > kinds["vqa"] > kinds["interleaved"] > 0


def test_resume_in_process_finite_no_workers(shapes_data):
    mk = lambda: build_stream(shapes_data / "train", batch_size=6, seed=2, infinite=False, shuffle_buffer=8,
                              decode_images=False)
    ref = [_keys(b) for b in mk()]
    s = mk()
    head = [_keys(b) for b in itertools.islice(s, 10)]
    st = json.loads(json.dumps(s.state_dict()))
    s2 = mk()
    s2.load_state_dict(st)
    assert head + [_keys(b) for b in s2] == ref
    assert s2.state_dict()["epoch"] == 1  # the epoch finished; the next iter() starts epoch 1


def test_fewer_shards_than_workers(shapes_data):
    s = build_stream(shapes_data / "train" / "vqa-000000.tar", batch_size=4, num_workers=2, world_size=2,
                     rank=1, infinite=False, decode_images=False)
    keys = [k for b in s for k in _keys(b)]
    s0 = build_stream(shapes_data / "train" / "vqa-000000.tar", batch_size=4, num_workers=2, world_size=2,
                      rank=0, infinite=False, decode_images=False)
    keys0 = [k for b in s0 for k in _keys(b)]
    assert len(keys) == len(keys0) == 16 and set(keys) | set(keys0) == {f"vqa{i:08d}" for i in range(32)}


def test_map_fn_and_collate_run_per_sample_and_batch(shapes_data):
    s = build_stream(shapes_data / "train" / "vqa-000000.tar", batch_size=5, infinite=False, num_workers=1,
                     map_fn=_answer_or_none, collate_fn=_collate_len)
    out = list(s)
    assert all(isinstance(b, tuple) and b[0] <= 5 for b in out)
    assert s.stats["skipped"].get("map_fn", 0) + s.stats["ok"] == 32
    assert s.stats["skipped"].get("map_fn", 0) > 0


class _CountingMap:
    """map_fn that counts its calls (num_workers=0: it runs in this process)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, doc):
        self.calls += 1
        return _answer_or_caption(doc)


def _answer_or_caption(doc):
    """A VQA doc's answer (None: skipped for yes/no answers), a caption doc's first caption."""
    return _answer_or_none(doc) if "answer" in doc["meta"] else (doc["__key__"], doc["texts"][0])


@pytest.mark.parametrize("workers", [0, 2])
def test_memo_reuses_map_fn_outputs_and_changes_nothing_else(shapes_data, workers):
    """memo=True: later epochs take each sample's map_fn output (or skip) from memory; the
    batches, the resume state and the counts equal the stream without it."""
    src = {str(shapes_data / "train" / "vqa-*.tar"): 0.7, str(shapes_data / "train" / "caption-*.tar"): 0.3}
    n_batches = 60  # ~3.5 epochs of the vqa shards
    mk = lambda memo, fn: build_stream(src, batch_size=4, seed=5, num_workers=workers, shuffle_buffer=8,
                                       map_fn=fn, collate_fn=_collate_len, memo=memo)
    ref, s = mk(False, _answer_or_caption), mk(True, _CountingMap())
    a, b = list(itertools.islice(ref, n_batches)), list(itertools.islice(s, n_batches))
    assert a == b
    assert s.stats == ref.stats and s.stats["skipped"].get("map_fn", 0) > 0
    assert s.state_dict() == ref.state_dict()
    if workers == 0:
        n_samples = sum(1 for p in (shapes_data / "train").glob("vqa-*.tar") for _ in iter_shard_raw(str(p)))
        assert s.stats["samples"] > 3 * n_samples  # several epochs went by ...
        assert s.plan.map_fn.calls == len(s.plan.memo) < s.stats["samples"]  # ... and each sample was mapped once
    with pytest.raises(UsageError, match="memo=True"):
        build_stream(src, batch_size=4, memo=True)


def _answer_or_none(doc):
    return None if doc["meta"]["answer"] in ("yes", "no") else doc["meta"]["answer"]


def _collate_len(items):
    return (len(items), items)


def test_pack_sequences_keeps_documents_apart():
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12], [13]]
    p = pack_sequences(seqs, seq_len=5, pad_id=0)
    assert p["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 0, 0]]
    assert p["doc_ids"].tolist() == [[0, 0, 0, 1, 1], [2, 2, 2, 2, 2], [2, 2, 3, -1, -1]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4], [5, 6, 0, 0, 0]]
    m = doc_attention_mask(p["doc_ids"])
    assert m.shape == (3, 1, 5, 5)
    assert m[0, 0, 4].tolist() == [False, False, False, True, True]  # doc 1 sees only itself
    assert m[0, 0, 2].tolist() == [True, True, True, False, False]
    assert cu_seqlens(p["doc_ids"]).tolist() == [0, 3, 5, 10, 12, 13, 15]
    with pytest.raises(ValueError):
        pack_sequences([[1] * 6], seq_len=5, split_long=False)
