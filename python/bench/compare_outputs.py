"""Max relative error of one `desam forward` output file against another (e.g. bf16 against f32).

Usage: compare_outputs.py REFERENCE.safetensors OTHER.safetensors [--json]
Prints `<name> <max|other-ref|/max|ref|>` for every tensor present in both, then `max_relative_error <e>`
over the encoder/SAM outputs and `logits_relative_error <e>` for the PIMM logits. With --json, prints
one JSON object instead: {"errors": {name: e}, "max_relative_error", "logits_relative_error",
"mask_dice"} (Dice between the masks logits > 0 of both files).
"""
import json
import sys

import numpy as np
from safetensors.numpy import load_file


def compare(ref_path, other_path):
    ref, other = load_file(ref_path), load_file(other_path)
    errors = {}
    for name in sorted(ref):
        if name in other:
            r, o = ref[name].astype(np.float64), other[name].astype(np.float64)
            errors[name] = float(np.abs(o - r).max() / max(np.abs(r).max(), 1e-30))
    a, b = ref["logits"] > 0, other["logits"] > 0
    dice = 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0) if (a.any() or b.any()) else 1.0
    return {"errors": errors, "max_relative_error": max((e for n, e in errors.items() if n != "logits"), default=0.0),
            "logits_relative_error": errors.get("logits"), "mask_dice": dice}


def main():
    res = compare(sys.argv[1], sys.argv[2])
    if "--json" in sys.argv[3:]:
        print(json.dumps(res))
        return
    for name, e in res["errors"].items():
        print(f"  {name:16s} {e:.3e}")
        if name == "logits":
            print(f"logits_relative_error {e:.3e}")
    print(f"max_relative_error {res['max_relative_error']:.3e}")


if __name__ == "__main__":
    main()
