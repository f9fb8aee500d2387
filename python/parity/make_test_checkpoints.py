"""Write real torch.save checkpoints (and the values they must decode to) for tests/checkpoint.rs.

Usage: make_test_checkpoints.py OUT_DIR
Each CASE.pth comes with CASE.expected.npz holding every tensor as float64/int64 (bf16 and f16 are
widened exactly), keyed like the state dict, plus `__order__` listing the keys in file order and `__shapes__` their shapes.
"""
import collections
import sys
from pathlib import Path

import numpy as np
import torch


def expected(sd, path):
    arrays = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        if v.dtype.is_floating_point:
            arrays[k] = np.ascontiguousarray(v.detach().to(torch.float64).numpy())
        elif v.dtype == torch.bool:
            arrays[k] = np.ascontiguousarray(v.numpy().astype(np.uint8))
        else:
            arrays[k] = np.ascontiguousarray(v.to(torch.int64).numpy())
    order = "\n".join(k for k, v in sd.items() if torch.is_tensor(v))
    arrays["__order__"] = np.frombuffer(order.encode(), dtype=np.uint8)
    # tch's npz reader widens 0-d arrays to 1-d, so shapes travel separately.
    shapes = "\n".join(",".join(map(str, v.shape)) for v in sd.values() if torch.is_tensor(v))
    arrays["__shapes__"] = np.frombuffer(shapes.encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1234)

    # 1. A real module's state dict (an OrderedDict carrying _metadata), with BatchNorm buffers.
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        net[1].running_mean.copy_(torch.randn(4, generator=g))
        net[1].num_batches_tracked.fill_(7)
    sd = net.state_dict()
    torch.save(sd, out / "ordered.pth")
    expected(sd, out / "ordered.expected.npz")

    # 2. The same nested under "model", next to non-tensor values and another dict.
    torch.save({"epoch": 3, "model": sd, "optimizer": {"lr": 0.1, "state": {}}, "note": "x"}, out / "nested.pth")
    expected(sd, out / "nested.expected.npz")
    torch.save({"state_dict": sd, "args": [1, 2.5, None, True]}, out / "nested_sd.pth")
    expected(sd, out / "nested_sd.expected.npz")

    # 3. Reduced precision and other dtypes, including a scalar and an empty tensor.
    mixed = collections.OrderedDict()
    mixed["half"] = torch.randn(3, 5, generator=g).half()
    mixed["bf16"] = torch.randn(2, 7, generator=g).bfloat16()
    mixed["double"] = torch.randn(4, generator=g, dtype=torch.float64)
    mixed["long"] = torch.arange(-5, 6, dtype=torch.int64)
    mixed["int"] = torch.arange(6, dtype=torch.int32).view(2, 3)
    mixed["uint8"] = torch.arange(250, 256, dtype=torch.uint8)
    mixed["bool"] = torch.tensor([True, False, True])
    mixed["scalar"] = torch.tensor(2.5)
    mixed["empty"] = torch.zeros(0, 3)
    mixed["big.int"] = torch.tensor([2**40, -(2**40)], dtype=torch.int64)
    torch.save(mixed, out / "mixed.pth")
    expected(mixed, out / "mixed.expected.npz")

    # 4. Views: transposed, sliced with an offset, stride-0 expansion, shared storage.
    base = torch.randn(6, 8, generator=g)
    views = collections.OrderedDict()
    views["base"] = base
    views["transposed"] = base.t()
    views["slice"] = base[2:5, 1:7:2]
    views["row"] = base[4]
    views["expanded"] = torch.randn(1, 3, generator=g).expand(4, 3)
    views["perm"] = torch.randn(2, 3, 4, 5, generator=g).permute(3, 1, 0, 2)
    torch.save(views, out / "views.pth")
    expected(views, out / "views.expected.npz")

    # 5. An odd top folder name (torch names it after the file stem).
    torch.save(sd, out / "Odd name-v1.2.final.pth")
    expected(sd, out / "Odd name-v1.2.final.expected.npz")

    # 6. A plain dict (not OrderedDict) saved with pickle protocol 4.
    torch.save(dict(mixed), out / "proto4.pth", pickle_protocol=4)
    expected(mixed, out / "proto4.expected.npz")

    # 7. Legacy (non-zip) serialisation: must be refused with a clear message.
    torch.save(sd, out / "legacy.pth", _use_new_zipfile_serialization=False)

    # 8. A torch.save of something that is not a state dict.
    torch.save([1, 2, 3], out / "not_a_state_dict.pth")


if __name__ == "__main__":
    main()
