"""Max relative error of one `desam forward` output file against another (e.g. bf16 against f32).

Usage: compare_outputs.py REFERENCE.safetensors OTHER.safetensors
Prints `<name> <max|other-ref|/max|ref|>` for every tensor present in both, then `max_relative_error <e>`
over the encoder/SAM outputs and `logits_relative_error <e>` for the PIMM logits.
"""
import sys

import numpy as np
from safetensors.numpy import load_file


def main():
    ref, other = load_file(sys.argv[1]), load_file(sys.argv[2])
    worst = 0.0
    for name in sorted(ref):
        if name not in other:
            continue
        r, o = ref[name].astype(np.float64), other[name].astype(np.float64)
        e = float(np.abs(o - r).max() / max(np.abs(r).max(), 1e-30))
        print(f"  {name:16s} {e:.3e}")
        if name != "logits":
            worst = max(worst, e)
        else:
            print(f"logits_relative_error {e:.3e}")
    print(f"max_relative_error {worst:.3e}")


if __name__ == "__main__":
    main()
