"""VQ tokenizers: VQ (cosine + EMA) vs FSQ vs LFQ on the shapes preset, and CPU throughput.

1. Quality: trains `tokenizers/vq-shapes.yaml` through the engine three times, changing only
   the quantizer (vq / fsq levels 8,8,8,4 / lfq 2^11: all 2048 codes), then evaluates each on
   held-out shapes images (PSNR, SSIM, codebook usage, perplexity) and reports train time
   (wall and process CPU seconds of the whole `train` call: main loop, codebook refit, decoder
   fine-tune). Every row keeps the recipe's steps, crops, bf16 and decoder fine-tune; only vq
   has a codebook to refit, so fsq and lfq run without the refit.
2. Throughput: encode and decode images/s for `shapes-f8` (64 px) and `f16-8192` (512 px;
   256 px with --quick), random weights, eval mode, batched. Reference in the same run:
   transformers' `ChameleonVQVAE.encode` at Chameleon's own config against mmkit's encoder
   loaded from those very weights (codes checked equal).

    python benchmarks/vq_compare.py [--quick] [--data DIR] [--threads 2]
    OMP_NUM_THREADS=1 python benchmarks/vq_compare.py --threads 1 --data /tmp/qs_final2/data   # docs/tokenizers.md

Without --data it synthesises shapes shards into a temp dir (`mmkit data synth`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# All three at the recipe's 2048 codes (FSQ levels multiply to 2048; LFQ: 11 bits).
QUANTIZERS = {
    "vq (cosine+EMA)": ["model.quantizer=vq"],
    # the codebook k-means refit exists only for vq
    "fsq 8,8,8,4": ["model.quantizer=fsq", "model.fsq_levels=[8,8,8,4]", "model.loss.codebook_refit_batches=0"],
    "lfq 2^11": ["model.quantizer=lfq", "model.loss.codebook_refit_batches=0"],
}


def train_and_eval(data: Path, out: Path, overrides: list[str], max_steps: int | None) -> dict:
    from mmkit.cli.train import load_recipe
    from mmkit.train.engine import train
    from mmkit.vq.evaluate import evaluate

    recipe = load_recipe(str(ROOT / "tokenizers/vq-shapes.yaml"), overrides, data=str(data / "train"),
                         max_steps=max_steps)
    t0, c0 = time.time(), time.process_time()
    train(recipe, out, progress=False)
    train_s, cpu_s = time.time() - t0, time.process_time() - c0  # cpu_s: all threads of this process
    res = evaluate(out / "final", str(data / "eval"))
    return {"steps": recipe.train.max_steps, "train_s": round(train_s, 1), "cpu_s": round(cpu_s, 1), **res}


def _throughput(fn, x, min_time: float) -> float:
    fn(x[:1])  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        n += len(x)
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return n / dt


@torch.no_grad()
def throughput_rows(quick: bool) -> list[dict]:
    from mmkit.vq.model import VQModel, preset_config

    import yaml

    from mmkit.vq.task import parse_model_section

    recipe_cfg = parse_model_section(yaml.safe_load((ROOT / "tokenizers/vq-shapes.yaml").read_text())["model"])[0]
    rows = []
    for preset, res, bs in [("shapes-f8", 64, 32), ("f16-8192", 256 if quick else 512, 1 if quick else 2)]:
        torch.manual_seed(0)
        # shapes-f8 as tokenizers/vq-shapes.yaml builds it (2048 codes, no mid attention)
        m = VQModel(recipe_cfg if preset == "shapes-f8" else preset_config(preset)).eval()
        x = torch.rand(bs, 3, res, res) * 2 - 1
        codes = m.encode(x)
        mt = 1.0 if quick else 5.0
        rows.append({"model": f"mmkit {preset}", "resolution": res, "codes": f"{codes.shape[1]}x{codes.shape[2]}",
                     "params_M": round(m.num_parameters() / 1e6, 2),
                     "encode_img_s": round(_throughput(m.encode, x, mt), 2),
                     "decode_img_s": round(_throughput(m.decode, codes, mt), 2)})
    return rows


@torch.no_grad()
def chameleon_reference(quick: bool) -> dict:
    from transformers import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    from mmkit.vq.chameleon import from_chameleon_vqvae

    res = 128 if quick else 256
    cfg = ChameleonVQVAEConfig(resolution=res)  # Chameleon's widths: ch 128, mult 1,1,2,2,4, 8192 x 256
    torch.manual_seed(0)
    hf = ChameleonVQVAE(cfg).eval()
    ours = from_chameleon_vqvae(hf)
    x = torch.rand(1, 3, res, res) * 2 - 1
    same = bool(torch.equal(hf.encode(x).image_tokens.view(1, res // 16, res // 16), ours.encode(x)))
    mt = 1.0 if quick else 3.0
    ref = mine = 0.0
    for _ in range(3):  # alternate and keep the best of each: fair under a noisy shared machine
        ref = max(ref, _throughput(lambda t: hf.encode(t).image_tokens, x, mt))
        mine = max(mine, _throughput(ours.encode, x, mt))
    return {"resolution": res, "codes_equal": same, "transformers_encode_img_s": round(ref, 3),
            "mmkit_encode_img_s": round(mine, 3), "ratio_mmkit_over_transformers": round(mine / ref, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer training steps, smaller images")
    ap.add_argument("--data", default=None, help="shapes data dir with train/ and eval/ (default: synthesise)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps if args.steps is not None else (100 if args.quick else None)
    tmp = Path(tempfile.mkdtemp(prefix="vq_compare_"))
    data = Path(args.data) if args.data else tmp / "data"
    if not args.data and not args.skip_train:
        from mmkit.data.synth import synth

        synth(str(data), 300 if args.quick else 1000, 0, None, ["interleaved", "caption", "vqa"], 1000, 1,
              progress=False)

    quality = []
    if not args.skip_train:
        for name, ov in QUANTIZERS.items():
            r = train_and_eval(data, tmp / name.split()[0], ov, steps)
            quality.append({"quantizer": name, **r})
    speed = throughput_rows(args.quick)
    ref = chameleon_reference(args.quick)

    cmd = " ".join(["python benchmarks/vq_compare.py", *sys.argv[1:]])
    print(f"### VQ quantizers on shapes-f8 ({torch.get_num_threads()} CPU threads)\n")
    if quality:
        print("| quantizer | steps | train s | train CPU s | PSNR dB | SSIM | usage % | perplexity |")
        print("|---|---|---|---|---|---|---|---|")
        for q in quality:
            print(f"| {q['quantizer']} | {q['steps']} | {q['train_s']} | {q['cpu_s']} | {q['psnr']:.2f} | {q['ssim']:.4f} | "
                  f"{q['codebook_usage']:.1f} | {q['perplexity']:.1f} |")
    print("\n| model | input | codes | params M | encode img/s | decode img/s |")
    print("|---|---|---|---|---|---|")
    for r in speed:
        print(f"| {r['model']} | {r['resolution']}px | {r['codes']} | {r['params_M']} | {r['encode_img_s']} | "
              f"{r['decode_img_s']} |")
    print(f"\nChameleon VQ encoder at {ref['resolution']}px, same weights (codes equal: {ref['codes_equal']}): "
          f"transformers {ref['transformers_encode_img_s']} img/s, mmkit {ref['mmkit_encode_img_s']} img/s, "
          f"ratio {ref['ratio_mmkit_over_transformers']}x\n\n`{cmd}`")
    out = {"benchmark": "vq_compare", "command": cmd, "quick": args.quick, "threads": torch.get_num_threads(),
           "machine": {"platform": platform.platform(), "python": platform.python_version()},
           "quality": quality, "throughput": speed, "chameleon_reference": ref}
    (ROOT / "benchmarks/results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks/results/vq_compare.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
