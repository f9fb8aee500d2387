"""JSON and Markdown of benches/gpu.sh (standard library only: runs on the GPU host's python3 too).

  gpu_report.py add SECTIONS.jsonl NAME STATUS REASON [FIGURES_JSON]   append one section record
  gpu_report.py render OUTDIR                                          OUTDIR/sections.jsonl → gpu.json, gpu.md
  gpu_report.py train WORKDIR         figures of the runs WORKDIR/{amp,f32,half} of `desam-train fit`
A record is {"name", "status": ok|skipped|failed, "reason", "figures": {...}}.
"""
import json
import os
import sys


def add(path, name, status, reason, figures="{}"):
    assert status in ("ok", "skipped", "failed"), status
    rec = {"name": name, "status": status, "reason": reason, "figures": json.loads(figures or "{}")}
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def fmt(v):
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return " ".join(f"{k}={fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def render(out):
    sections = [json.loads(l) for l in open(os.path.join(out, "sections.jsonl")) if l.strip()]
    doc = {"format": 1, "sections": sections}
    with open(os.path.join(out, "gpu.json"), "w") as f:
        json.dump(doc, f, indent=1)
    lines = ["| section | status | reason | figures |", "|---|---|---|---|"]
    for s in sections:
        figs = s["figures"]
        rows = figs.get("rows") if isinstance(figs, dict) else None
        short = {k: v for k, v in figs.items() if k != "rows"}
        lines.append(f"| {s['name']} | {s['status']} | {s['reason']} | {'; '.join(f'{k} {fmt(v)}' for k, v in short.items())} |")
    for s in sections:
        rows = s["figures"].get("rows")
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["", f"**{s['name']}**", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    with open(os.path.join(out, "gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def train(work):
    """Loss per 25 steps and validation Dice per epoch of the amp and f32 runs; whether f32 resumed
    (half the steps, then --resume) ends on bit-identical weights to the straight f32 run."""
    import hashlib

    def lines(run, name):
        p = os.path.join(work, run, name)
        return [json.loads(l) for l in open(p) if l.strip()] if os.path.exists(p) else []

    def sha(run):
        # hash of every tensor's name, dtype, shape and bytes except state_json (the run's
        # bookkeeping, which holds wall-clock times), read straight from the safetensors layout
        p = os.path.join(work, run, "checkpoint_latest.safetensors")
        if not os.path.exists(p):
            return None
        blob = open(p, "rb").read()
        n = int.from_bytes(blob[:8], "little")
        header, data, h = json.loads(blob[8:8 + n]), blob[8 + n:], hashlib.sha256()
        for name in sorted(k for k in header if k not in ("__metadata__", "state_json")):
            t = header[name]
            a, b = t["data_offsets"]
            h.update(json.dumps([name, t["dtype"], t["shape"]]).encode() + data[a:b])
        return h.hexdigest()

    rows = []
    for run in ("amp", "f32"):
        steps = lines(run, "steps.jsonl")
        curve = [round(sum(x["loss"] for x in steps[i:i + 25]) / len(steps[i:i + 25]), 4) for i in range(0, len(steps), 25)]
        rows.append({"run": run, "steps": len(steps), "skipped_steps": sum(1 for x in steps if x.get("skipped")),
                     "loss_per_25_steps": curve,
                     "val_dice_per_epoch": [round(e["val_dice"], 4) for e in lines(run, "log.jsonl") if "val_dice" in e]})
    print(json.dumps({"rows": rows, "resume_bit_exact_f32": sha("f32") is not None and sha("f32") == sha("half")}))


if __name__ == "__main__":
    {"add": add, "render": render, "train": train}[sys.argv[1]](*sys.argv[2:])
