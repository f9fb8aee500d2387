"""PyTorch reference outputs of Meta's SAM ViT-B (segment-anything 1.0) with random weights, for parity.

Usage: make_sam_reference.py OUT_DIR [--seed N] [--threads N] [--time] [--prompts box,point]
Builds the real vit_b configuration (build_sam_vit_b(checkpoint=None)), randomises every weight
(including the relative-position tables and pos_embed, which SAM initialises to zero), saves
`torch.save(model.state_dict(), OUT_DIR/sam_vit_b_random.pth)` (Meta's checkpoint format) and a random
normalised image OUT_DIR/image.npy (1x3x1024x1024 float32). For each prompt P writes
OUT_DIR/reference_P.npz with float32 arrays:
  tap.0..tap.2 (1,768,64,64)  outputs of blocks 2, 5, 8 (channels-first)
  neck (1,256,64,64)          iou (1,1)       mask_embedding (1,256,64,64) (two-way transformer image tokens)
  sam_masks (1,1,256,256)     SAM low-res mask logits of token 0 (multimask_output=False)
and OUT_DIR/prompts.json: box [x0,y0,x1,y1] and point [x,y,label] in the 1024 input frame.
With --time, prints `reference_encoder_seconds <s>` and `reference_seconds <s>` (encoder + prompt
encoder + SAM mask decoder with the box) for the first, cold pass, as `desam forward` measures its own.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from segment_anything import build_sam_vit_b

BOX = [212.0, 300.0, 700.0, 810.0]
POINT = [512.0, 480.0, 1.0]


def randomise(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "rel_pos" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("pos_embed"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif leaf == "weight" and p.dim() == 1:  # norm scales
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif leaf == "bias":
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:  # keep PyTorch's fan-in scale, but draw from our seed
                std = p.std().item() if p.numel() > 1 and p.std().item() > 0 else 0.05
                p.copy_(std * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if "gaussian" in name:
                b.copy_(torch.randn(b.shape, generator=gen))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--prompts", default="box,point")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)

    sam = build_sam_vit_b(checkpoint=None)
    randomise(sam, gen)
    sam.eval()
    torch.save(sam.state_dict(), args.out / "sam_vit_b_random.pth")
    image = torch.randn(1, 3, 1024, 1024, generator=gen)
    np.save(args.out / "image.npy", image.numpy())
    (args.out / "prompts.json").write_text(json.dumps({"box": BOX, "point": POINT}))

    captured = {}

    def keep(name, fn):
        def hook(_module, _inputs, output):
            captured[name] = fn(output)

        return hook

    for i, block in enumerate([2, 5, 8]):
        sam.image_encoder.blocks[block].register_forward_hook(keep(f"tap.{i}", lambda t: t.permute(0, 3, 1, 2)))
    sam.mask_decoder.transformer.register_forward_hook(
        keep("mask_embedding", lambda out: out[1].transpose(1, 2).reshape(out[1].shape[0], 256, 64, 64))
    )

    def decode(neck, prompt):
        if prompt == "box":
            sparse, dense = sam.prompt_encoder(points=None, boxes=torch.tensor([BOX]), masks=None)
        else:
            pts = (torch.tensor([[POINT[:2]]]), torch.tensor([[POINT[2]]]))
            sparse, dense = sam.prompt_encoder(points=pts, boxes=None, masks=None)
        masks, iou = sam.mask_decoder(
            image_embeddings=neck,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return masks, iou

    with torch.no_grad():
        t0 = time.perf_counter()
        neck = sam.image_encoder(image)
        t_enc = time.perf_counter() - t0
        taps = {k: v for k, v in captured.items() if k.startswith("tap.")}
        for prompt in args.prompts.split(","):
            masks, iou = decode(neck, prompt)
            if prompt == "box" and args.time:
                print(f"reference_encoder_seconds {t_enc:.4f}", flush=True)
                print(f"reference_seconds {time.perf_counter() - t0:.4f}", flush=True)
            out = dict(taps)
            out.update(neck=neck, iou=iou[:, 0:1], sam_masks=masks[:, 0:1], mask_embedding=captured["mask_embedding"])
            np.savez(
                args.out / f"reference_{prompt}.npz",
                **{k: np.ascontiguousarray(v.float().numpy()) for k, v in out.items()},
            )


if __name__ == "__main__":
    main()
