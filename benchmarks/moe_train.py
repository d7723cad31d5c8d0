"""MoE decoder training step: mmkit MoECausalLM vs transformers DeepseekV3ForCausalLM, same weights.

One run, side by side, alternating steps; CPU with bf16 autocast (fp32 master weights, AdamW).
A step = forward + loss + backward + optimizer step. Prints a markdown table and writes
benchmarks/results/moe_train.json.

    .venv/bin/python benchmarks/moe_train.py [--quick] [--steps N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

BENCH = dict(vocab_size=16384, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, n_shared_experts=1,
             n_routed_experts=16, num_experts_per_tok=4, first_k_dense_replace=1, kv_lora_rank=128,
             q_lora_rank=None, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64, n_group=1, topk_group=1,
             routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=4096)
QUICK = dict(BENCH, num_hidden_layers=3, vocab_size=4096)


def build_pair(hf_kwargs: dict, device: str):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from mmkit.models.kimivl.decoder import MoECausalLM, MoEDecoderConfig, convert_deepseek_v3_state_dict

    hf_cfg = DeepseekV3Config(**hf_kwargs, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf = DeepseekV3ForCausalLM(hf_cfg)
    with torch.no_grad():  # a non-trivial correction bias, as in a trained checkpoint
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.01)
    ours = MoECausalLM(MoEDecoderConfig.from_hf(hf_cfg))
    ours.load_state_dict(convert_deepseek_v3_state_dict(hf.state_dict(), hf_cfg.num_hidden_layers))
    return hf.to(device).train(), ours.to(device).train(), hf.config._experts_implementation


def make_step(model, ids, kind: str, device: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            if kind == "hf":
                loss = model(input_ids=ids, labels=ids).loss
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if kind == "mmkit":
            model.update_balancing_bias()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    return step


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (dev runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_train.json"))
    a = p.parse_args(argv)
    from mmkit.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # as the mmkit CLI does; process-wide, so the reference gets it too
    torch.manual_seed(0)
    cfg = dict(QUICK if a.quick else BENCH)
    if a.layers:
        cfg["num_hidden_layers"] = a.layers
    batch, seq = (2, 256) if a.quick else (4, 1024)
    steps = a.steps or (3 if a.quick else 4)
    hf, ours, hf_impl = build_pair(cfg, a.device)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device=a.device)
    runs = {"hf": make_step(hf, ids, "hf", a.device), "mmkit": make_step(ours, ids, "mmkit", a.device)}
    times = {k: [] for k in runs}
    losses = {k: [] for k in runs}
    for k, f in runs.items():  # warm-up (also: first losses must agree: same weights, same batch)
        losses[k].append(f())
    for _ in range(steps):  # alternate so machine noise hits both alike
        for k, f in runs.items():
            t0 = time.perf_counter()
            losses[k].append(f())
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    # headline: median over the alternating (hf, mmkit) step pairs of hf/mmkit; on a shared,
    # loaded machine a pair sees similar load, so this is steadier than a ratio of medians
    pair_ratios = [h / m for h, m in zip(times["hf"], times["mmkit"])]
    speedup = statistics.median(pair_ratios)
    res = {"name": "moe_train", "device": a.device, "quick": a.quick, "config": cfg, "batch": batch, "seq": seq,
           "steps": steps, "autocast": "bf16", "hf_experts_implementation": hf_impl,
           "hf_step_s": med["hf"], "mmkit_step_s": med["mmkit"], "speedup": speedup,
           "speedup_of_medians": med["hf"] / med["mmkit"], "speedup_of_mins": best["hf"] / best["mmkit"],
           "pair_ratios": pair_ratios,
           "first_loss": {k: v[0] for k, v in losses.items()}, "all_times": times,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor()}
    print(f"\nMoE training step ({a.device}, bf16 autocast, batch {batch}x{seq}, {cfg['num_hidden_layers']} layers, "
          f"{cfg['n_routed_experts']} experts top-{cfg['num_experts_per_tok']}; HF experts impl: {hf_impl})\n")
    print("| implementation | step (s, median) | step (s, min) | speedup (median of paired ratios) | first loss |")
    print("|---|---|---|---|---|")
    print(f"| transformers DeepseekV3ForCausalLM ({hf_impl}) | {med['hf']:.3f} | {best['hf']:.3f} | 1.00x | "
          f"{losses['hf'][0]:.4f} |")
    print(f"| mmkit MoECausalLM | {med['mmkit']:.3f} | {best['mmkit']:.3f} | {speedup:.2f}x | "
          f"{losses['mmkit'][0]:.4f} |")
    print(f"\npaired ratios: {', '.join(f'{r:.2f}' for r in pair_ratios)}; threads {torch.get_num_threads()}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
