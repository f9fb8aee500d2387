//! Training losses: soft Dice (MONAI `DiceLoss(sigmoid=True, squared_pred=True)`), BCE on logits,
//! L1/MSE on the predicted IoU. Pure tensor maths; no data, no model.

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

/// MONAI's default smoothing terms.
const SMOOTH: f64 = 1e-5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IouLoss {
    L1,
    Mse,
}

impl std::str::FromStr for IouLoss {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "l1" => Ok(IouLoss::L1),
            "mse" => Ok(IouLoss::Mse),
            o => Err(format!("unknown IoU loss {o:?} (l1 or mse)")),
        }
    }
}

/// Weights of (Dice, BCE, IoU). The official code's effective weights are (1, 0, 1): its CE term
/// is identically zero (single-channel softmax, spec §0.2). The paper review quotes (1, 1, 10).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossWeights {
    pub dice: f64,
    pub bce: f64,
    pub iou: f64,
}

impl std::str::FromStr for LossWeights {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let v: Vec<f64> = s
            .split(',')
            .map(|x| x.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{s:?}: {e}"))?;
        match v.as_slice() {
            [d, b, i] if v.iter().all(|x| x.is_finite() && *x >= 0.0) => Ok(LossWeights { dice: *d, bce: *b, iou: *i }),
            _ => Err(format!("--loss-weights wants three non-negative numbers dice,bce,iou (got {s:?})")),
        }
    }
}

/// Mean over the batch of 1 − (2Σpg + ε)/(Σp² + Σg² + ε), p = sigmoid(logits). logits, target: B×1×H×W.
pub fn soft_dice(logits: &Tensor, target: &Tensor) -> Tensor {
    let p = logits.sigmoid();
    let g = target.to_kind(p.kind());
    let dims: &[i64] = &[1, 2, 3];
    let inter = (&p * &g).sum_dim_intlist(dims, false, Kind::Float);
    let den = (&p * &p).sum_dim_intlist(dims, false, Kind::Float) + (&g * &g).sum_dim_intlist(dims, false, Kind::Float);
    let ratio: Tensor = (inter * 2.0 + SMOOTH) / (den + SMOOTH);
    (ratio.neg() + 1.0).mean(Kind::Float)
}

pub fn bce(logits: &Tensor, target: &Tensor) -> Tensor {
    logits.to_kind(Kind::Float).binary_cross_entropy_with_logits::<Tensor>(
        &target.to_kind(Kind::Float),
        None,
        None,
        Reduction::Mean,
    )
}

pub fn iou_loss(pred: &Tensor, target: &Tensor, which: IouLoss) -> Tensor {
    let p = pred.to_kind(Kind::Float).view([-1]);
    let t = target.to_kind(Kind::Float).view([-1]);
    match which {
        IouLoss::L1 => p.l1_loss(&t, Reduction::Mean),
        IouLoss::Mse => p.mse_loss(&t, Reduction::Mean),
    }
}

/// Per-sample hard Dice at threshold 0 on logits (1 when both masks are empty).
pub fn hard_dice(logits: &Tensor, target: &Tensor) -> Vec<f64> {
    let p = logits.gt(0.0).to_kind(Kind::Float);
    let g = target.gt(0).to_kind(Kind::Float);
    let dims: &[i64] = &[1, 2, 3];
    let inter = Vec::<f64>::try_from((&p * &g).sum_dim_intlist(dims, false, Kind::Double)).unwrap_or_default();
    let sp = Vec::<f64>::try_from(p.sum_dim_intlist(dims, false, Kind::Double)).unwrap_or_default();
    let sg = Vec::<f64>::try_from(g.sum_dim_intlist(dims, false, Kind::Double)).unwrap_or_default();
    inter.iter().zip(sp.iter().zip(&sg)).map(|(i, (a, b))| if a + b == 0.0 { 1.0 } else { 2.0 * i / (a + b) }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn dice_is_zero_for_confident_perfect_and_one_for_disjoint() {
        let g = Tensor::zeros([1, 1, 4, 4], (Kind::Float, Device::Cpu));
        let _ = g.narrow(2, 0, 2).fill_(1.0);
        let perfect = (&g * 2.0 - 1.0) * 50.0;
        assert!(soft_dice(&perfect, &g).double_value(&[]) < 1e-6);
        assert!((soft_dice(&(-perfect.shallow_clone()), &g).double_value(&[]) - 1.0).abs() < 1e-6);
        assert_eq!(hard_dice(&perfect, &g), vec![1.0]);
        // Uniform p = 0.5: 1 - 2·0.5·8 / (0.25·16 + 8) = 1/3.
        let half = Tensor::zeros([1, 1, 4, 4], (Kind::Float, Device::Cpu));
        assert!((soft_dice(&half, &g).double_value(&[]) - 1.0 / 3.0).abs() < 1e-5);
        assert!((bce(&half, &g).double_value(&[]) - std::f64::consts::LN_2).abs() < 1e-6);
    }

    #[test]
    fn parses_weights() {
        assert_eq!("1,1,10".parse::<LossWeights>().unwrap(), LossWeights { dice: 1.0, bce: 1.0, iou: 10.0 });
        assert!("1,1".parse::<LossWeights>().is_err());
        assert!("1,-1,1".parse::<LossWeights>().is_err());
    }
}
