"""An official-DeSAM-format ViT-B state dict with random values, for the checkpoint round-trip test.

Usage: make_desam_state_dict.py OUT.pth [--seed N]
SAM ViT-B keys (segment-anything's build_sam_vit_b) plus the 52 `mask_decoder.pimm.*` weights of the
DeSAM spec §7.2 (names and shapes written out here independently of the Rust model), saved with
torch.save(state_dict) like the official `desam_model_best.pth`. 366 tensors.
"""
import argparse
import collections
from pathlib import Path

import torch
from segment_anything import build_sam_vit_b

ENCODER_WIDTH = 768  # ViT-B


def pimm_shapes(e=ENCODER_WIDTH):
    shapes = collections.OrderedDict()

    def srb(prefix, cin, cout):
        shapes[f"{prefix}.conv1.conv.weight"] = (cout, cin, 3, 3)
        shapes[f"{prefix}.conv2.conv.weight"] = (cout, cout, 3, 3)
        shapes[f"{prefix}.conv3.conv.weight"] = (cout, cin, 1, 1)
        shapes[f"{prefix}.se.fc.0.weight"] = (cout // 16, cout)
        shapes[f"{prefix}.se.fc.2.weight"] = (cout, cout // 16)

    srb("mask_embedding_fusion", 512, 256)
    srb("conv_blocks_context.0.block_init", e, 256)
    srb("conv_blocks_context.1.block_init", e, 128)
    shapes["conv_blocks_context.1.residual_block.0.0.conv.weight"] = (128, 128, 2, 2)
    srb("conv_blocks_context.1.residual_block.0.1", 128, 128)
    srb("conv_blocks_context.2.block_init", e, 64)
    for r in range(2):
        shapes[f"conv_blocks_context.2.residual_block.{r}.0.conv.weight"] = (64, 64, 2, 2)
        srb(f"conv_blocks_context.2.residual_block.{r}.1", 64, 64)
    shapes["conv_blocks_localization.0.transp_conv.conv.weight"] = (256, 128, 2, 2)
    srb("conv_blocks_localization.0.res_block", 256, 128)
    shapes["conv_blocks_localization.1.transp_conv.conv.weight"] = (128, 64, 2, 2)
    srb("conv_blocks_localization.1.res_block", 128, 64)
    shapes["seg_outputs.0.weight"] = (1, 128, 1, 1)
    shapes["seg_outputs.1.weight"] = (1, 64, 1, 1)
    return collections.OrderedDict((f"mask_decoder.pimm.{k}", v) for k, v in shapes.items())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    sd = build_sam_vit_b(checkpoint=None).state_dict()
    for k in sd:
        sd[k] = torch.randn(sd[k].shape, generator=gen)
    pimm = pimm_shapes()
    assert len(pimm) == 52, len(pimm)
    for k, shape in pimm.items():
        sd[k] = torch.randn(shape, generator=gen)
    assert len(sd) == 366, len(sd)
    torch.save(sd, args.out)


if __name__ == "__main__":
    main()
