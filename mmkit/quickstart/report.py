"""The quickstart's report: results.json (machine-readable), report.md and report.html (for people)."""

from __future__ import annotations

import html
import json
import os
from typing import Any

# (results.json key, label, goal text, predicate) — the goals of issue 9 on a 2-core CPU
GOALS = [
    ("wall_time_s", "whole run (s)", "<= 900", lambda v: v <= 900),
    ("vq.psnr", "VQ tokenizer PSNR (dB)", ">= 30", lambda v: v >= 30),
    ("vq.codebook_usage", "VQ codebook usage (%)", ">= 90", lambda v: v >= 90),
    ("vqa.chameleon.overall", "shapes-VQA, Chameleon-style (official metric)", ">= 75", lambda v: v >= 75),
    ("vqa.kimivl.overall", "shapes-VQA, Kimi-VL-style (official metric)", ">= 75", lambda v: v >= 75),
    ("vqa.majority_baseline", "shapes-VQA, majority-answer baseline", "<= 30", lambda v: v <= 30),
    ("caption.chameleon.CIDEr", "shapes-caption CIDEr, Chameleon-style", "", None),
    ("caption.kimivl.CIDEr", "shapes-caption CIDEr, Kimi-VL-style", "", None),
    ("t2i.chameleon.attribute_accuracy", "text-to-image attribute accuracy (%; eval/shapes-t2i.yaml: CFG 3, greedy)",
     ">= 60", lambda v: v >= 60),
    ("generation.image_seconds", "one image with CFG (s)", "", None),
]


def get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def collect(qs) -> dict:
    """Stage records -> the results.json layout issue 9 names."""
    from mmkit.quickstart import STAGES, stage_results

    recs = stage_results(qs)
    res: dict[str, Any] = {"smoke": qs.plan.smoke, "plan": qs.plan.key()}
    res["stages"] = {n: recs[n]["seconds"] for n in STAGES if n in recs and n != "report"}
    res["wall_time_s"] = round(_covered([(recs[n].get("start"), recs[n].get("end"), recs[n]["seconds"])
                                         for n in res["stages"]]), 1)
    r = {n: recs[n].get("results", {}) for n in recs}
    res["vq"] = {k: r.get("vq", {}).get(k) for k in ("psnr", "ssim", "codebook_usage", "perplexity")}
    ev = r.get("evaluate", {})
    res["vqa"] = {fam: ev.get("vqa", {}).get(fam) for fam in ("chameleon", "kimivl")}
    res["vqa"]["majority_baseline"] = ev.get("vqa", {}).get("majority_baseline")
    res["caption"] = {fam: ev.get("caption", {}).get(fam) for fam in ("chameleon", "kimivl")}
    res["t2i"] = {"chameleon": ev.get("t2i", {}).get("chameleon")}
    res["generation"] = r.get("generate", {}).get("generation", {})
    res["training"] = {fam: r.get(fam) for fam in ("vq", "chameleon", "kimivl")}
    res["samples"] = r.get("generate", {}).get("files", {})
    return res


def _covered(spans: list[tuple[float | None, float | None, float]]) -> float:
    """Seconds covered by the stages' (start, end) intervals: stages that ran side by side
    (the Kimi-VL lane) count once, gaps between re-runs not at all. Records without times
    (older runs) add their own seconds."""
    total = sum(seconds for start, end, seconds in spans if start is None or end is None)
    reached = float("-inf")  # the latest end so far; each interval adds only what lies beyond it
    for start, end in sorted((s, e) for s, e, _ in spans if s is not None and e is not None):
        total += max(0.0, end - max(start, reached))
        reached = max(reached, end)
    return total


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def goal_rows(res: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for key, label, goal, ok in GOALS:
        v = get(res, key)
        status = "" if ok is None or v is None or res.get("smoke") else ("met" if ok(v) else "NOT met")
        rows.append((label, _fmt(v), goal, status))
    return rows


def images(qs) -> list[tuple[str, str]]:
    """(caption, path relative to the report) of every picture worth showing."""
    out = []
    for fam in ("vq", "chameleon", "kimivl"):
        for name in ("loss.png", "loss_curve.png"):
            p = qs.out / fam / name
            if p.exists():
                out.append((f"{fam} training loss", os.path.relpath(p, qs.out)))
                break
    for p in sorted((qs.out / "samples").glob("*.png")) if (qs.out / "samples").exists() else []:
        out.append((p.stem.replace("_", " "), os.path.relpath(p, qs.out)))
    return out


def write_report(qs) -> dict:
    res = collect(qs)
    (qs.out / "results.json").write_text(json.dumps(res, indent=1))
    rows = goal_rows(res)
    pics = images(qs)
    title = "mmkit quickstart report" + (" (smoke run: wiring only, quality goals not checked)" if res["smoke"] else "")

    md = [f"# {title}", "", "| result | value | goal | |", "|---|---|---|---|"]
    md += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    md += ["", "## Stage times (s)", "", "| stage | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in res["stages"].items()]
    md += [""]
    for cap, rel in pics:
        md += [f"### {cap}", "", f"![{cap}]({rel})", ""]
    (qs.out / "report.md").write_text("\n".join(md) + "\n")

    e = html.escape
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>mmkit quickstart</title>",
         "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:4px 8px}.bad{color:#b00}.ok{color:#070}img{max-width:100%;"
         "image-rendering:pixelated}</style></head><body>", f"<h1>{e(title)}</h1>",
         "<table><tr><th>result</th><th>value</th><th>goal</th><th></th></tr>"]
    for a, b, c, d in rows:
        cls = "ok" if d == "met" else "bad" if d else ""
        h.append(f"<tr><td>{e(a)}</td><td>{e(b)}</td><td>{e(c)}</td><td class='{cls}'>{e(d)}</td></tr>")
    h.append("</table><h2>Stage times (s)</h2><table>")
    h += [f"<tr><td>{e(k)}</td><td>{v:.1f}</td></tr>" for k, v in res["stages"].items()]
    h.append("</table>")
    for cap, rel in pics:
        h.append(f"<h3>{e(cap)}</h3><img src='{e(rel)}' alt='{e(cap)}'>")
    h.append("</body></html>")
    (qs.out / "report.html").write_text("\n".join(h))
    return {"files": ["report.md", "report.html", "results.json"]}
