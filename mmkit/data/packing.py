"""Packing several token sequences into fixed-length rows, keeping document boundaries.

`doc_ids` and restarted `position_ids` let attention stay inside a document (a
block-diagonal causal mask, or cu_seqlens for varlen kernels) and rotary positions start
at 0 for every document, so a packed row computes what the unpacked documents would.
"""

from __future__ import annotations

from typing import Sequence

import torch


def pack_sequences(seqs: Sequence[Sequence[int]], seq_len: int, pad_id: int = 0,
                   split_long: bool = True) -> dict[str, torch.Tensor]:
    """Greedy in-order packing (a sequence that does not fit the current row's remainder
    starts a new row; longer than `seq_len` is cut into chunks when `split_long`).

    Returns {"input_ids", "doc_ids" (-1 on padding), "position_ids" (restart at 0 per
    document; a chunk of a split document continues its positions)}, each (R, seq_len) long.
    """
    if seq_len < 1:
        raise ValueError("seq_len must be >= 1")
    # rows as lists of pieces (doc, seq, start, take); the tensors are filled once at the end
    # (why: a tuple per token cost ~2 ms per Chameleon quickstart batch)
    rows: list[list[tuple[int, list[int], int, int]]] = [[]]
    used = [0]  # tokens in each row
    for d, seq in enumerate(seqs):
        seq = list(seq)
        if len(seq) > seq_len and not split_long:
            raise ValueError(f"sequence {d} has {len(seq)} tokens > seq_len {seq_len}")
        start = 0
        while start < len(seq):
            room = seq_len - used[-1]
            chunk = len(seq) - start
            if chunk > room and (chunk <= seq_len or room == 0):
                rows.append([])  # start the document (or its next chunk) on a fresh row
                used.append(0)
                room = seq_len
            take = min(room, chunk)
            rows[-1].append((d, seq, start, take))
            used[-1] += take
            start += take
    if not rows[-1]:
        rows.pop()
    ids, docs, pos = [], [], []
    for row in rows:
        t, dd, p = [], [], []
        for d, seq, start, take in row:
            t += seq[start:start + take]
            dd += [d] * take
            p += range(start, start + take)
        pad = seq_len - len(t)
        ids.append(t + [pad_id] * pad)
        docs.append(dd + [-1] * pad)
        pos.append(p + [0] * pad)
    input_ids = torch.tensor(ids, dtype=torch.long).view(len(rows), seq_len)
    doc_ids = torch.tensor(docs, dtype=torch.long).view(len(rows), seq_len)
    position_ids = torch.tensor(pos, dtype=torch.long).view(len(rows), seq_len)
    return {"input_ids": input_ids, "doc_ids": doc_ids, "position_ids": position_ids}


def doc_attention_mask(doc_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """(R, L) doc ids -> (R, 1, L, L) bool mask, True where attention is allowed: same
    document (padding attends only to itself, so no row is all-False) and, if causal, j <= i."""
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    L = doc_ids.shape[1]
    eye = torch.eye(L, dtype=torch.bool, device=doc_ids.device)[None]
    pad = (doc_ids < 0)[:, :, None]
    mask = torch.where(pad, eye, same)
    if causal:
        mask = mask & torch.ones(L, L, dtype=torch.bool, device=doc_ids.device).tril()[None]
    return mask[:, None]


def cu_seqlens(doc_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative segment boundaries over the flattened rows (varlen attention kernels):
    a new segment wherever the doc id changes or a row starts; padding forms its own segments."""
    flat = doc_ids.reshape(-1)
    L = doc_ids.shape[1]
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::L] = True
    idx = torch.nonzero(starts).flatten()
    return torch.cat([idx, torch.tensor([flat.numel()])]).to(torch.int32)
