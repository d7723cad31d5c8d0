"""Generation speed: mmkit's sampler vs transformers' `generate`, same weights, one run.

The bench model of the Chameleon issue (hidden 512, 8 layers, 8 heads, SwiGLU 1408, vocab
16384 with 8192 image codes) is built as a transformers `ChameleonForConditionalGeneration`,
saved, and loaded back with `mmkit.load_model` (the transformers-checkpoint path). Measured
in one process, alternating mmkit and transformers repetitions (median of `--reps`):

1. batch-1 greedy decode tokens/s, fp32 and bf16 (tokens checked identical);
2. one 32x32-code image (1024 tokens + eoi) with classifier-free guidance (2 streams batched),
   seconds (transformers' Chameleon cannot generate images: no reference);
3. batch-8 sampling throughput (T 1.0, top-k 50, top-p 0.9), tokens/s.

    .venv/bin/python benchmarks/generation.py [--quick] [--threads N] [--reps N] [--device cpu|cuda] [--compile]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

BENCH = dict(vocab_size=16384, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=4096)
N_IMAGE = 8192  # image codes at ids [4, 4 + N_IMAGE), Chameleon's layout
BOI, EOI, IMG = N_IMAGE + 5, N_IMAGE + 4, N_IMAGE + 6
TEXT_LO = N_IMAGE + 16


def build(tmp: Path, device: str):
    """transformers model (random init) -> saved dir -> mmkit.load_model; same weights."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    import mmkit
    from mmkit.models.chameleon.load import image_code_name

    vm = {image_code_name(c): 4 + c for c in range(N_IMAGE)}
    vm.update({"<racm3:break>": BOI, "<eoss>": EOI, "<image>": IMG, "<s>": 1, "</s>": 2, "<pad>": 3})
    vq = dict(embed_dim=32, num_embeddings=N_IMAGE, latent_channels=32, resolution=32, base_channels=32,
              channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[])
    cfg = ChameleonConfig(**BENCH, vocabulary_map=vm, vq_config=vq, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # trained-like logit scale, so greedy text is not one repeated token
        hf.lm_head.weight.mul_(8.0)
    hf.save_pretrained(tmp / "hf")
    ours = mmkit.load_model(tmp / "hf").eval()
    return hf.to(device), ours.to(device)


CPU_TIMES: list[float] = []  # process CPU seconds of the latest `timed` call (steadier than wall on a busy machine)


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    CPU_TIMES.append(time.process_time() - c)
    return time.perf_counter() - t, out


def weight_floor(model, dtype, device, reps):
    """Seconds to multiply one token by every linear weight once (all linears + lm_head), the
    best of plain F.linear and oneDNN-packed weights (mmkit's CPU decode path): the floor of
    a decode step, which must read every weight."""
    from mmkit.generation.packing import packed_linear_fn

    lins = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, 1, w.shape[1], dtype=dtype, device=device) for w in lins]
    fns = {"F.linear": [lambda x, w=w: torch.nn.functional.linear(x, w) for w in lins]}
    if device == "cpu":
        fns["oneDNN packed"] = [packed_linear_fn(w) for w in lins]
    best = (float("inf"), "")
    for name, fs in fns.items():
        [f(x) for f, x in zip(fs, xs)]
        t = statistics.median(timed(lambda: [f(x) for f, x in zip(fs, xs)], device)[0] for _ in range(max(reps, 5)))
        best = min(best, (t, name))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repetitions")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="mmkit decode steps through torch.compile")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generation.json"))
    args = ap.parse_args()
    from mmkit.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # as the mmkit CLI does; process-wide, so the reference gets it too
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    reps = args.reps or (2 if args.quick else 3)
    n_text = 48 if args.quick else 128
    n_batch = 32 if args.quick else 64
    from functools import partial

    from mmkit.generation import generate

    generate = partial(generate, compile=args.compile)

    rows, res = [], {"device": device, "threads": torch.get_num_threads(), "machine": platform.processor(),
                     "config": BENCH, "quick": args.quick, "compile": args.compile}
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build(Path(tmp), device)
    g = torch.Generator().manual_seed(0)
    prompt = torch.cat([torch.tensor([[1]]), torch.randint(TEXT_LO, BENCH["vocab_size"], (1, 31), generator=g)], 1)
    prompt = prompt.to(device)

    # -- 1. batch-1 greedy decode ----------------------------------------------------------
    for dtype in (torch.float32, torch.bfloat16):
        hf.to(dtype)
        ours.to(dtype)
        with torch.inference_mode():
            run_hf = lambda: hf.generate(prompt, max_new_tokens=n_text, min_new_tokens=n_text,  # noqa: E731
                                         do_sample=False)[:, prompt.shape[1]:]
            run_ours = lambda: generate(ours, prompt, n_text, eos_token_id=[])  # noqa: E731
            run_hf()
            t0 = time.perf_counter()
            run_ours()  # warm-up (with --compile: the compilation, reported, not measured)
            compile_s = time.perf_counter() - t0
            t_hf, t_ours, c_hf, c_ours = [], [], [], []
            for _ in range(reps):
                dt, a = timed(run_hf, device)
                t_hf.append(dt)
                c_hf.append(CPU_TIMES[-1])
                dt, b = timed(run_ours, device)
                t_ours.append(dt)
                c_ours.append(CPU_TIMES[-1])
            # memory floor: every weight matrix read once for one token (all linears + lm_head)
            t_floor_s, floor_how = weight_floor(ours, dtype, device, reps)
            # prompt-lookup decoding (exact greedy): drafts copied from earlier text, verified k at a time
            run_pl = lambda st=None: generate(ours, prompt, n_text, eos_token_id=[], prompt_lookup=4,  # noqa: E731
                                              stats=st)
            run_pl()
            t_pl, st = [], {}
            for _ in range(reps):
                dt, c = timed(run_pl, device)
                t_pl.append(dt)
            run_pl(st)
        same = bool(torch.equal(a, b))
        same_pl = bool(torch.equal(a, c))
        name = str(dtype).replace("torch.", "")
        floor_tps = 1.0 / t_floor_s
        pl_tps = n_text / statistics.median(t_pl)
        hf_tps, ours_tps = n_text / statistics.median(t_hf), n_text / statistics.median(t_ours)
        res[f"greedy_b1_{name}"] = {"transformers_tok_s": hf_tps, "mmkit_tok_s": ours_tps,
                                    "speedup": ours_tps / hf_tps, "tokens_identical": same, "new_tokens": n_text,
                                    "weights_matvec_floor_tok_s": floor_tps, "floor_kernel": floor_how,
                                    "transformers_cpu_ms_per_token": 1e3 * statistics.median(c_hf) / n_text,
                                    "mmkit_cpu_ms_per_token": 1e3 * statistics.median(c_ours) / n_text,
                                    "mmkit_first_call_s": compile_s, "prompt_lookup_tok_s": pl_tps,
                                    "prompt_lookup_forwards": st.get("forwards"),
                                    "prompt_lookup_tokens_identical": same_pl}
        rows.append((f"batch-1 greedy decode, {name}", f"{hf_tps:.1f} tok/s", f"{ours_tps:.1f} tok/s",
                     f"{ours_tps / hf_tps:.2f}x", ("tokens identical" if same else "tokens differ") +
                     f"; weight-read floor {floor_tps:.0f} tok/s ({floor_how}); CPU ms/token "
                     f"{1e3 * statistics.median(c_hf) / n_text:.1f} vs {1e3 * statistics.median(c_ours) / n_text:.1f}" +
                     (f"; compile {compile_s:.0f} s" if args.compile else "")))
        rows.append((f"batch-1 greedy + prompt lookup k=4, {name}", f"{hf_tps:.1f} tok/s", f"{pl_tps:.1f} tok/s",
                     f"{pl_tps / hf_tps:.2f}x", ("tokens identical" if same_pl else "tokens differ") +
                     f"; {st.get('forwards')} forwards for {n_text} tokens"))
    r32, r16 = res["greedy_b1_float32"], res["greedy_b1_bfloat16"]
    res["greedy_b1_mmkit_bf16_vs_transformers_fp32"] = r16["mmkit_tok_s"] / r32["transformers_tok_s"]
    rows.append(("batch-1 greedy: mmkit bf16 vs transformers fp32 (default)", f"{r32['transformers_tok_s']:.1f} tok/s",
                 f"{r16['mmkit_tok_s']:.1f} tok/s", f"{res['greedy_b1_mmkit_bf16_vs_transformers_fp32']:.2f}x", ""))

    # -- 2. one 32x32 image with CFG -----------------------------------------------------------
    cond = torch.cat([prompt[:, :20], torch.tensor([[BOI]], device=device)], 1)
    uncond = torch.tensor([[1, TEXT_LO + 7, BOI]], device=device)
    for dtype in (torch.float32, torch.bfloat16):
        ours.to(dtype)
        run_img = lambda: generate(ours, cond, 1025, mode="image", cfg_scale=3.0,  # noqa: E731
                                   uncond_input_ids=uncond, seed=0)
        timed(lambda: generate(ours, cond, 16, mode="image", cfg_scale=3.0, uncond_input_ids=uncond), device)
        ts, cs, out = [], [], None
        for _ in range(max(1, reps - 1)):
            dt, out = timed(run_img, device)
            ts.append(dt)
            cs.append(CPU_TIMES[-1])
        n_codes = int(((out >= 4) & (out < 4 + N_IMAGE)).sum())
        name = str(dtype).replace("torch.", "")
        sec = statistics.median(ts)
        cpu_s = statistics.median(cs)
        res[f"image_32x32_cfg_{name}"] = {"seconds": sec, "codes": n_codes, "goal_seconds": 5.0, "cpu_seconds": cpu_s,
                                          "ms_per_step": 1e3 * sec / out.shape[1]}
        rows.append((f"one 32x32 image (1024 codes) with CFG, {name}", "n/a (cannot)", f"{sec:.2f} s",
                     "", f"{n_codes} codes, goal <= 5 s; {1e3 * sec / out.shape[1]:.1f} ms/step; CPU {cpu_s:.1f} s"))

    # -- 3. batch-8 sampling throughput ----------------------------------------------------------
    batch = torch.cat([prompt] * 8, 0)
    kw = dict(do_sample=True, temperature=1.0, top_k=50, top_p=0.9)
    for dtype in (torch.float32, torch.bfloat16):
        hf.to(dtype)
        ours.to(dtype)
        with torch.inference_mode():
            run_hf = lambda: hf.generate(batch, max_new_tokens=n_batch, min_new_tokens=n_batch, **kw)  # noqa: E731
            run_ours = lambda: generate(ours, batch, n_batch, eos_token_id=[], seed=list(range(8)), **kw)  # noqa: E731
            torch.manual_seed(0)
            run_hf(), run_ours()
            t_hf, t_ours = [], []
            for _ in range(max(1, reps - 1)):
                t_hf.append(timed(run_hf, device)[0])
                t_ours.append(timed(run_ours, device)[0])
        name = str(dtype).replace("torch.", "")
        hf_tps, ours_tps = 8 * n_batch / statistics.median(t_hf), 8 * n_batch / statistics.median(t_ours)
        res[f"sample_b8_{name}"] = {"transformers_tok_s": hf_tps, "mmkit_tok_s": ours_tps,
                                    "speedup": ours_tps / hf_tps, "new_tokens_per_row": n_batch}
        rows.append((f"batch-8 sampling (T 1, top-k 50, top-p 0.9), {name}", f"{hf_tps:.1f} tok/s",
                     f"{ours_tps:.1f} tok/s", f"{ours_tps / hf_tps:.2f}x", ""))

    print(f"\nGeneration, {device}, {torch.get_num_threads()} threads, bench model {BENCH}\n")
    print("| measurement | transformers | mmkit | ratio | note |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    res["table"] = rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
