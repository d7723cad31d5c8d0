"""Task "toy": a tiny byte-level transformer LM on deterministic synthetic text.

The engine's own tests and benchmark use it, so they never depend on a model family. The
corpus is sentences about shapes from a fixed grammar (learnable: the loss falls fast);
the stream draws windows with a generator seeded by (seed, step), so its whole resume
state is one integer. With `data.sources` set (or `--data DIR`), it reads the texts of
mmkit shards through `mmkit.data.build_stream` instead.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mmkit.config import from_dict
from mmkit.errors import UsageError
from mmkit.nn import RMSNorm
from mmkit.train.task import register_task


@dataclass
class ToyModelConfig:
    vocab_size: int = 256  # bytes
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 64
    mlp_ratio: int = 4
    dropout: float = 0.0
    tie_embeddings: bool = True


@dataclass
class ToyDataConfig:
    sources: Any = None  # shards (dir, list, {pattern: weight}); None -> synthetic corpus
    corpus_bytes: int = 1 << 16  # size of the synthetic corpus
    corpus_seed: int = 0


# --------------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, cfg: ToyModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.attn_norm = RMSNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.mlp_norm = RMSNorm(cfg.dim)
        self.up = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim, bias=True)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim, bias=True)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, T, 3, self.n_heads, D // self.n_heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.dropout(self.proj(y.transpose(1, 2).reshape(B, T, D)))
        return x + self.dropout(self.down(F.gelu(self.up(self.mlp_norm(x)))))


class ToyLM(nn.Module):
    """GPT-style byte LM: learned positions, pre-norm blocks, (tied) LM head."""

    def __init__(self, cfg: ToyModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.seq_len, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> logits (B, T, V)
        T = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos(torch.arange(T, device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def save_pretrained(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"model_type": "mmkit_toy", **asdict(self.cfg)}, indent=2))
        sd = {k: v for k, v in self.state_dict().items() if not (self.cfg.tie_embeddings and k == "head.weight")}
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ToyLM":
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        cfg.pop("model_type", None)
        model = cls(ToyModelConfig(**cfg))
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=not model.cfg.tie_embeddings)
        return model


# --------------------------------------------------------------------------- data
SHAPES = ["circle", "square", "triangle", "star", "hexagon"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
RELATIONS = ["left of", "right of", "above", "below", "next to"]


def synthetic_corpus(n_bytes: int, seed: int) -> torch.Tensor:
    """Deterministic text like 'a red circle is left of a blue star. ' as uint8 bytes."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        a, b = rng.choice(SHAPES), rng.choice(SHAPES)
        s = f"a {rng.choice(COLORS)} {a} is {rng.choice(RELATIONS)} a {rng.choice(COLORS)} {b}. "
        parts.append(s)
        size += len(s)
    data = "".join(parts).encode()[:n_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class ToyStream:
    """Endless batches of random windows; rank r of w takes rows [r*B, (r+1)*B) of the global
    batch of B*w rows drawn from generator(seed, step), so any world size sees the same
    global batches and the resume state is just the step."""

    def __init__(self, corpus: torch.Tensor, seq_len: int, batch_size: int, rank: int, world_size: int, seed: int):
        if len(corpus) <= seq_len + 1:
            raise UsageError(f"toy task: corpus of {len(corpus)} bytes is shorter than seq_len {seq_len} + 2")
        self.corpus, self.seq_len, self.batch_size = corpus, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.step = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        offsets = torch.arange(self.seq_len + 1)
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
            starts = torch.randint(0, len(self.corpus) - self.seq_len - 1, (self.batch_size * self.world_size,), generator=g)
            starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            windows = self.corpus[starts[:, None] + offsets]  # (B, T + 1)
            self.step += 1
            yield {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class TextWindows:
    """map_fn for shards: a document's texts -> one (seq_len + 1) byte window (or None)."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def __call__(self, doc):
        text = " ".join(t for t in doc.get("texts", []) if t)
        data = text.encode()[: self.seq_len + 1]
        if len(data) < 2:
            return None
        data = data + b" " * (self.seq_len + 1 - len(data))
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def collate_windows(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    w = torch.stack(items)  # (B, T + 1)
    return {"input_ids": w[:, :-1], "labels": w[:, 1:]}


# --------------------------------------------------------------------------- task
@register_task("toy")
class ToyTask:
    """See mmkit.train.task.Task."""

    def __init__(self, model_cfg: dict, data_cfg: dict, *, seed: int = 0, out_dir: str = "."):
        self.model_cfg = from_dict(ToyModelConfig, model_cfg, where="model")
        self.data_cfg = from_dict(ToyDataConfig, data_cfg, where="data")
        self.seed, self.out_dir = seed, out_dir

    def build_model(self) -> nn.Module:
        return ToyLM(self.model_cfg)

    def batches(self, *, rank: int = 0, world_size: int = 1, batch_size: int, num_workers: int = 0):
        T = self.model_cfg.seq_len
        if self.data_cfg.sources is not None:
            try:
                from mmkit.data import build_stream
            except ImportError:
                raise UsageError("toy task: data.sources needs mmkit.data.build_stream (not available)") from None
            return build_stream(self.data_cfg.sources, batch_size=batch_size, collate_fn=collate_windows,
                                map_fn=TextWindows(T), seed=self.seed, rank=rank, world_size=world_size,
                                num_workers=num_workers, decode_images=False, infinite=True)
        corpus = synthetic_corpus(self.data_cfg.corpus_bytes, self.data_cfg.corpus_seed)
        return ToyStream(corpus, T, batch_size, rank, world_size, self.seed)

    def compile_example(self, rows: int = 4) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """The model and a batch of the training's shapes, for `mmkit train --compile-only`."""
        ids = torch.randint(0, self.model_cfg.vocab_size, (rows, self.model_cfg.seq_len))
        return ToyLM(self.model_cfg), {"input_ids": ids, "labels": ids}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch["input_ids"])  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        return loss, {"tokens": batch["labels"].numel()}

    def on_optimizer_step(self, model: nn.Module) -> None:
        pass

    @torch.no_grad()
    def sample(self, model: nn.Module, step: int, out_dir: str) -> None:
        """Greedy continuation of a fixed prompt, appended to samples.md."""
        device = next(model.parameters()).device
        ids = torch.tensor([list(b"a red circle is ")], device=device)
        for _ in range(32):
            nxt = model(ids[:, -self.model_cfg.seq_len:])[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
        text = bytes(ids[0].tolist()).decode(errors="replace")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(out_dir) / "samples.md", "a") as f:
            f.write(f"- step {step}: `{text!r}`\n")

    def save_final(self, model: nn.Module, out_dir: str) -> None:
        model.save_pretrained(out_dir)
