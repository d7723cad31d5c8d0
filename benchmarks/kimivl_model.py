"""Whole Kimi-VL-style model, fwd+bwd: mmkit vs transformers' Kimi-K2.5 class, same weights.

Vision-heavy pack (5 images of 96 .. 1120 patches in one sequence, 6-layer 384-wide ViT,
grids larger than the 32x32 position table) + a small MoE decoder; CPU, bf16 autocast.
Both models are timed alternately in one run (median of N); the ratio is what counts.

    .venv/bin/python benchmarks/kimivl_model.py [--quick] [--threads N]

Prints a markdown table and writes benchmarks/results/kimivl_model.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = dict(grids=[(8, 12), (16, 16), (20, 24), (24, 32), (28, 40)], vision_layers=6, vision_dim=384,
            vision_heads=6, pos=32, text_dim=256, text_layers=2, experts=8, topk=2, vocab=4096, text_tokens=128,
            iters=9)
QUICK = dict(grids=[(8, 12), (12, 16), (16, 20)], vision_layers=2, vision_dim=192, vision_heads=3, pos=16,
             text_dim=128, text_layers=2, experts=8, topk=2, vocab=2048, text_tokens=64, iters=3)


def build(cfg):
    from transformers.models.kimi_k25 import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    from mmkit.models.kimivl.load import load_model

    image_token = cfg["vocab"] - 1
    text = dict(model_type="deepseek_v3", vocab_size=cfg["vocab"], hidden_size=cfg["text_dim"],
                intermediate_size=2 * cfg["text_dim"], moe_intermediate_size=cfg["text_dim"] // 2,
                num_hidden_layers=cfg["text_layers"], num_attention_heads=4, num_key_value_heads=4,
                n_shared_experts=1, n_routed_experts=cfg["experts"], num_experts_per_tok=cfg["topk"],
                first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=64, q_lora_rank=None,
                qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, routed_scaling_factor=2.446)
    vision = dict(patch_size=14, pos_emb_height=cfg["pos"], pos_emb_width=cfg["pos"],
                  num_attention_heads=cfg["vision_heads"], num_hidden_layers=cfg["vision_layers"],
                  hidden_size=cfg["vision_dim"], intermediate_size=4 * cfg["vision_dim"],
                  rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    hf_cfg = Kimi_K25Config(text_config=text, vision_config=vision, projection_hidden_size=cfg["vision_dim"],
                            tie_word_embeddings=False, image_token_id=image_token, video_token_id=cfg["vocab"])
    torch.manual_seed(0)
    hf = Kimi_K25ForConditionalGeneration(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, save_original_format=False)
        ours = load_model(d)  # the same weights through mmkit's kimi_k25 loader
    return hf.train(), ours.train(), image_token


def inputs(cfg, image_token):
    g = torch.Generator().manual_seed(0)
    grids = torch.tensor([[1, h, w] for h, w in cfg["grids"]])
    n_patches = int(grids.prod(-1).sum())
    pv = torch.randn(n_patches, 3, 14, 14, generator=g)
    ids = []
    per_gap = cfg["text_tokens"] // (len(cfg["grids"]) + 1)
    for h, w in cfg["grids"]:
        ids += torch.randint(10, image_token - 1, (per_gap,), generator=g).tolist() + [image_token] * (h * w // 4)
    ids += torch.randint(10, image_token - 1, (per_gap,), generator=g).tolist()
    ids = torch.tensor([ids])
    labels = ids.masked_fill(ids == image_token, -100)
    return ids, pv, grids, labels


def step(model, ids, pv, grids, labels):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, pixel_values=pv, image_grid_thw=grids, labels=labels)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return out.loss.detach().float()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller pack and model (seconds)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/kimivl_model.json)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="skip mmkit.runtime.tune_cpu_allocator (applied to both models otherwise)")
    args = ap.parse_args(argv)
    from mmkit.runtime import tune_cpu_allocator

    tuned = False if args.default_malloc else tune_cpu_allocator()  # process-wide: both models alike
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    if args.iters:
        cfg["iters"] = args.iters
    hf, ours, image_token = build(cfg)
    batch = inputs(cfg, image_token)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # same weights -> same loss
        l_ref = hf(input_ids=batch[0], pixel_values=batch[1], image_grid_thw=batch[2], labels=batch[3]).loss
        l_ours = ours(input_ids=batch[0], pixel_values=batch[1], image_grid_thw=batch[2], labels=batch[3]).loss
    times = {"transformers": [], "mmkit": []}
    cpu = {"transformers": [], "mmkit": []}  # process CPU seconds: steadier than wall on a shared machine
    for name, model in (("transformers", hf), ("mmkit", ours)):  # warm-up
        step(model, *batch)
    for _ in range(cfg["iters"]):
        for name, model in (("transformers", hf), ("mmkit", ours)):  # alternate: noise hits both alike
            t, c = time.perf_counter(), time.process_time()
            step(model, *batch)
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    n_patches = int(batch[2].prod(-1).sum())
    res = {
        "benchmark": "kimivl_model", "quick": args.quick, "device": "cpu", "dtype": "bf16 autocast",
        "threads": torch.get_num_threads(), "malloc_tuned": tuned, "images": len(cfg["grids"]), "patches": n_patches,
        "sequence": int(batch[0].shape[1]), "config": {k: v for k, v in cfg.items() if k != "grids"},
        "grids": cfg["grids"], "loss_transformers": float(l_ref), "loss_mmkit": float(l_ours),
        "fwd_bwd_s": med, "all_s": times, "speedup": med["transformers"] / med["mmkit"],
        "fwd_bwd_cpu_s": cpu_med, "all_cpu_s": cpu, "cpu_time_speedup": cpu_med["transformers"] / cpu_med["mmkit"],
        "command": "python benchmarks/kimivl_model.py" + (" --quick" if args.quick else "")
                   + (" --default-malloc" if args.default_malloc else ""),
    }
    print(f"\n| model ({n_patches} patches in {len(cfg['grids'])} images, seq {res['sequence']}, "
          f"{res['threads']} thread(s), malloc tuned: {tuned}) | fwd+bwd (s) | speedup | CPU s | CPU-time speedup |")
    print("|---|---|---|---|---|")
    print(f"| transformers Kimi_K25ForConditionalGeneration | {med['transformers']:.3f} | 1.00x | "
          f"{cpu_med['transformers']:.3f} | 1.00x |")
    print(f"| mmkit MmkitKimiVLForConditionalGeneration | {med['mmkit']:.3f} | {res['speedup']:.2f}x | "
          f"{cpu_med['mmkit']:.3f} | {res['cpu_time_speedup']:.2f}x |")
    print(f"\nloss (same weights): transformers {float(l_ref):.4f}, mmkit {float(l_ours):.4f}")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "kimivl_model.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
