"""How much of an object's shape can a reader get from the Chameleon recipe's image tokens?

Each object of the shapes world sits in one cell of the 3x3 grid; in a 48 px square image a
cell is 16x16 px = one 2x2 block of 8 px VQ codes. A small MLP is trained to name the shape
(4 classes) from one cell, given as
  pixels      the rendered pixels (the ceiling of any reader),
  recon       the VQ's reconstruction of the whole image, cropped to the cell,
  codes       the 4 code ids (learned embeddings),
  centroids   each code's mean source patch over the training images (what a code "means"),
  isolated    each code decoded on its own (VQ decode of a 2x2 grid of that code).
It reads caption shards with stored square codes (`mmkit data tokenize-images --square 48`)
and their scene graphs; held-out objects come from the eval shards.

  .venv/bin/python benchmarks/code_shape_probe.py --train runs/qs/data/train_codes \
      --eval runs/qs/data/eval_codes --vq runs/qs/vq/final
"""

from __future__ import annotations

import argparse
import glob
import json

import numpy as np
import torch


def cells(pattern: str, limit: int, vq=None):
    """-> (codes (N, 4), pixels (N, 768), recon (N, 768) or None, shape labels (N,)) per object."""
    from mmkit.data.reader import decode_sample, iter_shard_raw
    from mmkit.data.shapes import SHAPES, XS, YS
    from mmkit.vq.tokenize_shards import square_image

    X, P, R, Y = [], [], [], []
    for path in sorted(glob.glob(pattern)):
        for raw in iter_shard_raw(path):
            doc, _ = decode_sample(raw, decode_images=True)
            if doc is None:
                continue
            meta = doc.get("meta") or {}
            for i, (scene, c) in enumerate(zip(meta.get("scenes") or [], meta.get("image_codes") or [])):
                if not scene or not c or (c["h"], c["w"]) != (6, 6):
                    continue
                grid = np.array(c["codes"]).reshape(6, 6)
                img = np.asarray(square_image(doc["images"][i].convert("RGB"), 48), dtype=np.float32) / 255.0
                rec = None
                if vq is not None:
                    with torch.no_grad():
                        rec = ((vq.decode(torch.tensor(grid)[None]) [0] + 1) / 2).permute(1, 2, 0).numpy()
                for o in scene["objects"]:
                    x, y = XS.index(o["x"]), YS.index(o["y"])
                    X.append(grid[2 * y:2 * y + 2, 2 * x:2 * x + 2].reshape(-1))
                    P.append(img[16 * y:16 * y + 16, 16 * x:16 * x + 16].reshape(-1))
                    if rec is not None:
                        R.append(rec[16 * y:16 * y + 16, 16 * x:16 * x + 16].reshape(-1))
                    Y.append(SHAPES.index(o["shape"]))
            if len(Y) >= limit:
                break
        if len(Y) >= limit:
            break
    t = lambda a, dt=torch.float32: torch.tensor(np.array(a), dtype=dt)  # noqa: E731
    return t(X, torch.long), t(P), (t(R) if R else None), t(Y, torch.long)


def centroids(pattern: str, n_codes: int, max_images: int) -> torch.Tensor:
    """(n_codes, 192): mean 8x8 RGB source patch of each code over the training images."""
    from mmkit.data.reader import decode_sample, iter_shard_raw
    from mmkit.vq.tokenize_shards import square_image

    s, n, seen = np.zeros((n_codes, 192)), np.zeros(n_codes), 0
    for path in sorted(glob.glob(pattern)):
        for raw in iter_shard_raw(path):
            doc, _ = decode_sample(raw, decode_images=True)
            for i, c in enumerate(((doc or {}).get("meta") or {}).get("image_codes") or []):
                if not c or (c["h"], c["w"]) != (6, 6):
                    continue
                img = np.asarray(square_image(doc["images"][i].convert("RGB"), 48), dtype=np.float32) / 255.0
                patches = img.reshape(6, 8, 6, 8, 3).transpose(0, 2, 1, 3, 4).reshape(36, 192)
                np.add.at(s, np.array(c["codes"]), patches)
                np.add.at(n, np.array(c["codes"]), 1)
                seen += 1
            if seen >= max_images:
                return torch.tensor(s / np.maximum(n, 1)[:, None], dtype=torch.float32)
    return torch.tensor(s / np.maximum(n, 1)[:, None], dtype=torch.float32)


def fit(model, xtr, ytr, xte, yte, steps: int = 3000, seed: int = 0) -> tuple[float, float]:
    """Adam, batch 256 -> (held-out accuracy, train accuracy) in percent."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(ytr), (256,))
        loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = lambda x, y: round(100 * float((model(x).argmax(-1) == y).float().mean()), 1)  # noqa: E731
        return acc(xte, yte), acc(xtr[:5000], ytr[:5000])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", required=True, help="dir of caption-*.tar shards with square 48 px codes")
    ap.add_argument("--eval", required=True, help="held-out dir of the same kind")
    ap.add_argument("--vq", required=True, help="the VQ tokenizer dir the codes came from")
    ap.add_argument("--n-train", type=int, default=16000)
    ap.add_argument("--out", default="benchmarks/results/code_shape_probe.json")
    args = ap.parse_args(argv)
    from mmkit.vq.model import VQModel

    torch.set_num_threads(1)
    vq = VQModel.from_pretrained(args.vq).eval()
    Xtr, Ptr, Rtr, ytr = cells(f"{args.train}/caption-*.tar", args.n_train, vq)
    Xte, Pte, Rte, yte = cells(f"{args.eval}/caption-*.tar", 2000, vq)
    mlp = lambda d: torch.nn.Sequential(torch.nn.Linear(d, 256), torch.nn.GELU(), torch.nn.Linear(256, 4))  # noqa: E731

    class Codes(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(n, 64), mlp(4 * 64)

        def forward(self, x):  # (B, 4) -> (B, 4)
            return self.head(self.emb(x).flatten(1))

    n = vq.config.codebook_size
    cent = centroids(f"{args.train}/*.tar", n, 12000)
    with torch.no_grad():
        iso = ((vq.decode(torch.arange(n)[:, None, None].expand(n, 2, 2)) + 1) / 2)  # (n, 3, 16, 16)
        iso = iso.permute(0, 2, 3, 1)[:, :8, :8].reshape(n, -1)  # the code's own 8x8 corner, (n, 192)
    res = {"n_train": len(ytr), "n_eval": len(yte),
           "pixels": fit(mlp(768), Ptr, ytr, Pte, yte),
           "recon": fit(mlp(768), Rtr, ytr, Rte, yte),
           "codes": fit(Codes(n), Xtr, ytr, Xte, yte),
           "centroids": fit(mlp(768), cent[Xtr].flatten(1), ytr, cent[Xte].flatten(1), yte),
           "isolated": fit(mlp(768), iso[Xtr].flatten(1), ytr, iso[Xte].flatten(1), yte)}
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**res, "command": "benchmarks/code_shape_probe.py", "train": args.train, "eval": args.eval,
                       "vq": args.vq, "format": "(held-out %, train %) per input"}, f, indent=1)


if __name__ == "__main__":
    main()
