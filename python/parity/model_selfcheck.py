"""Self-check of `desam forward` against segment-anything 1.0 modules and a PyTorch PIMM written from the
spec (§5), with the same seeded random weights. Exits 1 if any output differs by more than 1e-6 relative
(measured: PIMM logits bit-identical, SAM masks ~1e-7).
usage: model_selfcheck.py DESAM_BIN tiny|vit_b OUTDIR   (vit_b takes ~3 min on 2 CPU cores)"""
import sys, subprocess, functools
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from safetensors.torch import save_file, load_file
from segment_anything.modeling import ImageEncoderViT, PromptEncoder, MaskDecoder, TwoWayTransformer

bin_, arch, out = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
if arch == "tiny":
    S, E, depth, heads, win, glob, D, twh, mlp, iouh, U = 128, 64, 8, 4, 3, (1, 3, 5, 7), 64, 2, 256, 64, 64
else:
    S, E, depth, heads, win, glob, D, twh, mlp, iouh, U = 1024, 768, 12, 12, 14, (2, 5, 8, 11), 256, 8, 2048, 256, 256
g = S // 16

enc = ImageEncoderViT(img_size=S, patch_size=16, embed_dim=E, depth=depth, num_heads=heads, mlp_ratio=4, out_chans=D,
                      qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                      window_size=win, global_attn_indexes=glob, rel_pos_zero_init=True)
pe = PromptEncoder(embed_dim=D, image_embedding_size=(g, g), input_image_size=(S, S), mask_in_chans=16)
md = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=D, mlp_dim=mlp, num_heads=twh),
                 transformer_dim=D, iou_head_depth=3, iou_head_hidden_dim=iouh)

def se_block(cin, cout):
    m = nn.Module()
    m.conv1 = nn.Module(); m.conv1.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    m.conv2 = nn.Module(); m.conv2.conv = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
    m.conv3 = nn.Module(); m.conv3.conv = nn.Conv2d(cin, cout, 1, bias=False)
    m.se = nn.Module(); m.se.fc = nn.Sequential(nn.Linear(cout, cout // 16, bias=False), nn.ReLU(), nn.Linear(cout // 16, cout, bias=False), nn.Sigmoid())
    m.proj = cin != cout
    return m

def srb(m, x):
    inorm = lambda t: F.instance_norm(t, eps=1e-5)
    y = F.leaky_relu(inorm(m.conv1.conv(x)), 0.01)
    y = inorm(m.conv2.conv(y))
    w = m.se.fc(y.mean((2, 3)))
    y = y * w[:, :, None, None]
    r = inorm(m.conv3.conv(x)) if m.proj else x
    return F.leaky_relu(y + r, 0.01)

def tconv(cin, cout):
    m = nn.Module(); m.conv = nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False); return m

pimm = nn.Module()
lad = [U, U // 2, U // 4]
pimm.conv_blocks_context = nn.ModuleList()
for d in range(3):
    b = nn.Module(); b.block_init = se_block(E, lad[d])
    if d > 0:
        b.residual_block = nn.ModuleList([nn.Sequential(tconv(lad[d], lad[d]), se_block(lad[d], lad[d])) for _ in range(d)])
    pimm.conv_blocks_context.append(b)
pimm.mask_embedding_fusion = se_block(2 * U, U)
pimm.conv_blocks_localization = nn.ModuleList()
for i in range(2):
    b = nn.Module(); b.transp_conv = tconv(lad[i], lad[i + 1]); b.res_block = se_block(2 * lad[i + 1], lad[i + 1])
    pimm.conv_blocks_localization.append(b)
pimm.seg_outputs = nn.ModuleList([nn.Conv2d(lad[1], 1, 1, bias=False), nn.Conv2d(lad[2], 1, 1, bias=False)])
md.pimm = pimm

def pimm_fwd(taps, M):
    ctx = []
    for d in range(3):
        b = pimm.conv_blocks_context[d]
        x = srb(b.block_init, taps[2 - d])
        if d > 0:
            for r in b.residual_block:
                x = srb(r[1], r[0].conv(x))
        ctx.append(x)
    x = srb(pimm.mask_embedding_fusion, torch.cat([M, ctx[0].expand(M.shape[0], -1, -1, -1)], 1))
    for i in range(2):
        b = pimm.conv_blocks_localization[i]
        u = b.transp_conv.conv(x)
        x = srb(b.res_block, torch.cat([u, ctx[i + 1].expand(u.shape[0], -1, -1, -1)], 1))
    return pimm.seg_outputs[1](x)

model = nn.Module(); model.image_encoder = enc; model.prompt_encoder = pe; model.mask_decoder = md
# randomise the zero-initialised tensors and LN affine so that every term is exercised
with torch.no_grad():
    for k, v in model.state_dict().items():
        if "rel_pos" in k or "pos_embed" in k:
            v.normal_(0, 0.1)
        if ("norm" in k or "neck.1" in k or "neck.3" in k or "upscaling.1" in k) and v.dim() == 1:
            v.add_(torch.randn_like(v) * 0.1)
sd = {k: v.contiguous() for k, v in model.state_dict().items()}
save_file(sd, f"{out}/w.safetensors")
print("tensors", len(sd), "values", sum(v.numel() for v in sd.values()))

img = torch.randn(1, 3, S, S)
np.save(f"{out}/img.npy", img.numpy().astype(np.float32))

def reference(points=None, box=None):
    with torch.no_grad():
        taps = []
        hooks = [enc.blocks[i].register_forward_hook(lambda m, i, o: taps.append(o.permute(0, 3, 1, 2))) for i in glob[:-1]]
        neck = enc(img)
        for h in hooks: h.remove()
        sparse, dense = pe(points=points, boxes=box, masks=None)
        got = {}
        hook = md.transformer.register_forward_hook(lambda m, i, o: got.update(hs=o[0], src=o[1]))
        masks, iou = md(image_embeddings=neck, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                        dense_prompt_embeddings=dense, multimask_output=False)
        hook.remove()
        b = sparse.shape[0]
        M = got["src"].transpose(1, 2).reshape(b, D, g, g)
        logits = pimm_fwd(taps, M)
        r = {f"tap.{i}": t for i, t in enumerate(taps)}
        r.update(neck=neck, iou=iou, mask_embedding=M, logits=logits, sam_masks=masks)
        return r

def compare(name, ref, extra):
    subprocess.run([bin_, "forward", "--arch", arch, "--checkpoint", f"{out}/w.safetensors", "--image", f"{out}/img.npy",
                    "--out", f"{out}/{name}.safetensors"] + extra, check=True)
    ours = load_file(f"{out}/{name}.safetensors")
    worst = 0
    for k, v in ref.items():
        o = ours[k]
        assert tuple(o.shape) == tuple(v.shape), (k, o.shape, v.shape)
        rel = ((o - v).abs().max() / v.abs().max()).item()
        worst = max(worst, rel)
        print(f"  {name:6s} {k:15s} {str(tuple(v.shape)):20s} rel {rel:.2e}")
    print(name, "worst", worst)
    return worst

w = compare("point", reference(points=(torch.tensor([[[40.0, 50.0]]]) * S / 128, torch.tensor([[1.0]]))),
            ["--point", str(40 * S / 128), str(50 * S / 128), "1"])
w = max(w, compare("box", reference(box=torch.tensor([[10.0, 20.0, 90.0, 100.0]]) * S / 128),
                   ["--box"] + [str(v * S / 128) for v in (10, 20, 90, 100)]))
print("WORST", w)
sys.exit(0 if w <= 1e-6 else 1)
