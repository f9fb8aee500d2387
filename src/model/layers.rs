//! Small building blocks shared by the model files (PyTorch-default initialisation, LayerNorm2d,
//! SAM's MLP). No forward logic of any particular network lives here.

use tch::nn::{self, init::FanInOut, init::NonLinearity, init::NormalOrUniform, Init};
use tch::Tensor;

/// PyTorch's default weight init for Linear/Conv (kaiming_uniform with a=√5): U(±1/√fan_in).
pub(crate) const TORCH_DEFAULT_WEIGHT: Init = Init::Kaiming {
    dist: NormalOrUniform::Uniform,
    fan: FanInOut::FanIn,
    non_linearity: NonLinearity::ExplicitGain(0.577_350_269_189_625_8), // 1/√3
};

fn bias_init(fan_in: i64) -> Init {
    let b = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

/// A Linear layer (`weight` [out,in], optional `bias`), initialised like `torch.nn.Linear`.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(p: &nn::Path, input: i64, output: i64, bias: bool) -> Linear {
        let weight = p.var("weight", &[output, input], TORCH_DEFAULT_WEIGHT);
        let bias = bias.then(|| p.var("bias", &[output], bias_init(input)));
        Linear { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// A 2-D convolution (`weight` [out,in,k,k]), initialised like `torch.nn.Conv2d`.
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    pub fn new(p: &nn::Path, input: i64, output: i64, k: i64, stride: i64, padding: i64, bias: bool) -> Conv2d {
        let weight = p.var("weight", &[output, input, k, k], TORCH_DEFAULT_WEIGHT);
        let bias = bias.then(|| p.var("bias", &[output], bias_init(input * k * k)));
        Conv2d { weight, bias, stride, padding }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.weight, self.bias.as_ref(), [self.stride], [self.padding], [1], 1)
    }
}

/// A 2×2 stride-2 transposed convolution (`weight` [in,out,2,2]), like `torch.nn.ConvTranspose2d`.
#[derive(Debug)]
pub struct ConvTranspose2x {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl ConvTranspose2x {
    pub fn new(p: &nn::Path, input: i64, output: i64, bias: bool) -> ConvTranspose2x {
        // PyTorch's fan_in for a transposed weight is size(1)·k·k = output·4.
        let weight = p.var("weight", &[input, output, 2, 2], TORCH_DEFAULT_WEIGHT);
        let bias = bias.then(|| p.var("bias", &[output], bias_init(output * 4)));
        ConvTranspose2x { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv_transpose2d(&self.weight, self.bias.as_ref(), [2], [0], [0], 1, [1])
    }
}

/// LayerNorm over the last axis (`weight`, `bias`).
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
    dim: i64,
}

impl LayerNorm {
    pub fn new(p: &nn::Path, dim: i64, eps: f64) -> LayerNorm {
        LayerNorm {
            weight: p.var("weight", &[dim], Init::Const(1.0)),
            bias: p.var("bias", &[dim], Init::Const(0.0)),
            eps,
            dim,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.weight), Some(&self.bias), self.eps, false)
    }
}

/// SAM's LayerNorm2d: normalises across channels at each pixel of a B×C×H×W map (affine).
#[derive(Debug)]
pub struct LayerNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm2d {
    pub fn new(p: &nn::Path, channels: i64, eps: f64) -> LayerNorm2d {
        LayerNorm2d {
            weight: p.var("weight", &[channels], Init::Const(1.0)),
            bias: p.var("bias", &[channels], Init::Const(0.0)),
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let u = x.mean_dim(1, true, None);
        let centred = x - &u;
        let s = centred.square().mean_dim(1, true, None);
        let xn = centred / (s + self.eps).sqrt();
        xn * self.weight.view([-1, 1, 1]) + self.bias.view([-1, 1, 1])
    }
}

/// SAM's `MLP(input, hidden, output, num_layers)`: `layers.{i}` Linear with ReLU between.
#[derive(Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    pub fn new(p: &nn::Path, input: i64, hidden: i64, output: i64, num_layers: usize) -> Mlp {
        let lp = p / "layers";
        let layers = (0..num_layers)
            .map(|i| {
                let a = if i == 0 { input } else { hidden };
                let b = if i + 1 == num_layers { output } else { hidden };
                Linear::new(&(&lp / i), a, b, true)
            })
            .collect();
        Mlp { layers }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let n = self.layers.len();
        let mut x = x.shallow_clone();
        for (i, l) in self.layers.iter().enumerate() {
            x = l.forward(&x);
            if i + 1 < n {
                x = x.relu();
            }
        }
        x
    }
}

/// Exact (erf) GELU, as `torch.nn.GELU()`.
pub fn gelu(x: &Tensor) -> Tensor {
    x.gelu("none")
}
