"""Chameleon training step: mmkit MmkitChameleonForCausalLM vs transformers ChameleonForConditionalGeneration.

Same config, same weights (converted with mmkit's own key mapping), same batch, one run,
alternating steps so machine noise hits both alike. A step = forward + loss + backward +
AdamW step, bf16 autocast (fp32 master weights). Also reports MFU against a bf16 matmul
peak measured in the same run. Prints a markdown table and writes
benchmarks/results/chameleon_train.json.

    .venv/bin/python benchmarks/chameleon_train.py [--quick] [--steps N] [--device cpu|cuda] [--compile] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

BENCH = dict(vocab_size=16384, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=4096)
QUICK = dict(BENCH, num_hidden_layers=4, vocab_size=8192)
N_IMAGE = 4096  # image codes at ids [4, 4 + N_IMAGE), as in Chameleon's vocabulary layout


def build_pair(cfg: dict, device: str):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from mmkit.models.chameleon.load import config_from_transformers, image_code_name, state_from_transformers
    from mmkit.models.chameleon.model import MmkitChameleonForCausalLM

    vm = {image_code_name(c): 4 + c for c in range(N_IMAGE)}
    vm.update({"<racm3:break>": N_IMAGE + 5, "<eoss>": N_IMAGE + 4, "<image>": N_IMAGE + 6})
    vq = dict(embed_dim=32, num_embeddings=N_IMAGE, latent_channels=32, resolution=32, base_channels=32,
              channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[])
    hf_cfg = ChameleonConfig(**cfg, vocabulary_map=vm, vq_config=vq,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf_cfg._attn_implementation = "sdpa"
    hf = ChameleonForConditionalGeneration(hf_cfg)
    ours_cfg = config_from_transformers(hf_cfg.to_dict())
    ours = MmkitChameleonForCausalLM(ours_cfg)
    ours.load_state_dict(state_from_transformers(hf.state_dict(), ours_cfg))
    return hf.to(device).train(), ours.to(device).train()


def make_step(model, ids, device: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cpu" or None)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    return step


def matmul_peak(device: str, n: int = 2048, reps: int = 5) -> float:
    """Best bf16 matmul FLOP/s of an n x n x n product, measured here and now."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(reps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def train_flops_per_token(cfg: dict, seq: int) -> float:
    """6 x matmul params (incl. lm_head, excl. embedding) + causal attention (6 L T D)."""
    d, i, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * i
    return 6 * (L * per_layer + d * v) + 6 * L * seq * d


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args(argv)
    from mmkit.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # as the mmkit CLI does; process-wide, so the reference gets it too
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = QUICK if a.quick else BENCH
    batch, seq = (2, 256) if a.quick else (4, 1024)
    steps = a.steps or (3 if a.quick else 3)
    hf, ours = build_pair(cfg, a.device)
    if a.compile:
        hf, ours = torch.compile(hf), torch.compile(ours)
    # text-range ids (above the image codes and specials): both models see ordinary targets,
    # so the first losses agree (a same-weights check); transformers' image-logit masking
    # still runs (it is part of its forward), it just does not hit the targets.
    ids = torch.randint(N_IMAGE + 8, cfg["vocab_size"], (batch, seq), device=a.device)
    runs = {"hf": make_step(hf, ids, a.device), "mmkit": make_step(ours, ids, a.device)}
    times = {k: [] for k in runs}
    cpu_times = {k: [] for k in runs}
    losses = {k: [] for k in runs}
    for k, f in runs.items():  # warm-up
        losses[k].append(f())
    peak = matmul_peak(a.device)
    for _ in range(steps):  # alternate so machine noise hits both alike
        for k, f in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            losses[k].append(f())
            times[k].append(time.perf_counter() - t0)
            cpu_times[k].append(time.process_time() - c0)
    peak = max(peak, matmul_peak(a.device))
    med = {k: statistics.median(v) for k, v in times.items()}
    tok_s = {k: batch * seq / v for k, v in med.items()}
    fpt = train_flops_per_token(cfg, seq)
    mfu = {k: tok_s[k] * fpt / peak for k in runs}
    speedup = tok_s["mmkit"] / tok_s["hf"]
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
    cpu_speedup = cpu_med["hf"] / cpu_med["mmkit"]  # process CPU seconds per step: robust to a busy machine
    name = "chameleon_train" + ("_compile" if a.compile else "") + ("_cuda" if a.device == "cuda" else "")
    res = {"name": name, "device": a.device, "quick": a.quick, "compile": a.compile, "config": cfg,
           "batch": batch, "seq": seq, "steps": steps, "autocast": "bf16",
           "hf_step_s": med["hf"], "mmkit_step_s": med["mmkit"], "hf_tokens_per_s": tok_s["hf"],
           "mmkit_tokens_per_s": tok_s["mmkit"], "speedup": speedup, "goal_speedup": 1.3,
           "hf_cpu_s": cpu_med["hf"], "mmkit_cpu_s": cpu_med["mmkit"], "cpu_time_speedup": cpu_speedup,
           "all_cpu_times": cpu_times,
           "matmul_peak_tflops": peak / 1e12, "train_flops_per_token": fpt, "hf_mfu": mfu["hf"],
           "mmkit_mfu": mfu["mmkit"], "first_loss": {k: v[0] for k, v in losses.items()}, "all_times": times,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor()}
    print(f"\nChameleon training step ({a.device}, bf16 autocast, batch {batch}x{seq}, hidden {cfg['hidden_size']}, "
          f"{cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}{', torch.compile' if a.compile else ''}, "
          f"{torch.get_num_threads()} thread(s); "
          f"bf16 matmul peak {peak / 1e9:.0f} GFLOP/s)\n")
    print("| implementation | step (s, median) | tokens/s | speedup | MFU | first loss |")
    print("|---|---|---|---|---|---|")
    print(f"| transformers ChameleonForConditionalGeneration | {med['hf']:.3f} | {tok_s['hf']:.0f} | 1.00x | "
          f"{mfu['hf']:.1%} | {losses['hf'][0]:.3f} |")
    print(f"| mmkit MmkitChameleonForCausalLM | {med['mmkit']:.3f} | {tok_s['mmkit']:.0f} | {speedup:.2f}x | "
          f"{mfu['mmkit']:.1%} | {losses['mmkit'][0]:.3f} |")
    print(f"\nCPU seconds per step (median): transformers {cpu_med['hf']:.2f}, mmkit {cpu_med['mmkit']:.2f} "
          f"-> {cpu_speedup:.2f}x (wall-clock figures above; CPU time is the steadier one on a shared machine)")
    out = Path(a.out or Path(__file__).parent / "results" / f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
