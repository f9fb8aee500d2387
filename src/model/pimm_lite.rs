//! The PIMM layout for LiteMedSAM's TinyViT: which stage outputs feed which branch. The decoder
//! itself is the generic [`super::pimm::Pimm`]; this file owns only the TinyViT-specific layout.
//!
//! TinyViT taps (shallow → deep): layers[0] out 128ch@128², layers[1] out 160ch@64²,
//! layers[2] out 320ch@64²; mask embedding 256@64², logits 256².
//! Branch 0 (256 ch @ 64²)  ← layers[2] (320@64², no upsampling), fused with M;
//! branch 1 (128 ch @ 128²) ← layers[1] (160@64², one ×2 step);
//! branch 2 (64 ch @ 256²)  ← layers[0] (128@128², one ×2 step).

/// TinyViT tap shapes (channels, side), shallow → deep, as exposed by `TinyVit::tap_shapes`.
pub const LITE_TAP_SHAPES: [(i64, i64); 3] = [(128, 128), (160, 64), (320, 64)];

#[cfg(test)]
mod tests {
    use super::super::pimm::Pimm;
    use super::*;
    use tch::{nn, Device, Kind, Tensor};

    #[test]
    fn lite_layout_builds_and_outputs_256() {
        // Scaled-down widths (same sides) keep the test fast on CPU.
        let vs = nn::VarStore::new(Device::Cpu);
        let shapes: Vec<(i64, i64)> = LITE_TAP_SHAPES.iter().map(|&(c, s)| (c / 8, s / 4)).collect();
        let pimm = Pimm::new(&vs.root(), &shapes, 64, 16).unwrap();
        assert_eq!(pimm.output_size(), 64);
        let taps: Vec<Tensor> =
            shapes.iter().map(|&(c, s)| Tensor::randn([1, c, s, s], (Kind::Float, Device::Cpu))).collect();
        let m = Tensor::randn([2, 64, 16, 16], (Kind::Float, Device::Cpu));
        assert_eq!(pimm.forward(&taps, &m).size(), vec![2, 1, 64, 64]);
        // Branches 1 and 2 have one transposed conv each; branch 0 none.
        let names: Vec<String> = vs.variables().into_keys().collect();
        assert!(names.iter().any(|n| n == "conv_blocks_context.2.residual_block.0.0.conv.weight"));
        assert!(!names.iter().any(|n| n.starts_with("conv_blocks_context.2.residual_block.1")));
        assert!(!names.iter().any(|n| n.starts_with("conv_blocks_context.0.residual_block")));
    }
}
