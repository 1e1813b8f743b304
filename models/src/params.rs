use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// Serialises uses of torch's global random generator within this process.
pub static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What a parameter is, for methods that treat kinds differently (DSP-Reg excludes norm affine
/// parameters and, optionally, biases).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Weight,
    Bias,
    NormWeight,
    NormBias,
}

/// How a parameter is initialised (torchvision's choices).
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// kaiming_normal_(mode="fan_out", nonlinearity="relu"), torchvision's conv init.
    KaimingNormalFanOut,
    /// U(-1/sqrt(fan_in), 1/sqrt(fan_in)), torch.nn.Linear/Conv default for weight and bias.
    UniformFanIn(i64),
    Const(f64),
}

/// Handle to a parameter declared in a [`ParamBuilder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamId(pub usize);

/// One trainable parameter: a view of the store's flat buffer.
#[derive(Debug)]
pub struct Param {
    /// torchvision-style state-dict name, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    pub shape: Vec<i64>,
    pub kind: ParamKind,
    /// Offset and length in the flat buffer, in elements.
    pub offset: usize,
    pub numel: usize,
    /// A 4-D weight stored channels-last: its chunk of the flat buffer holds the elements in
    /// `[O, H, W, I]` order and `tensor` is an NCHW-shaped view with NHWC strides, so cuDNN picks
    /// its NHWC kernels while the parameter still aliases the flat buffer.
    pub channels_last: bool,
    pub tensor: Tensor,
}

/// `[O, I, H, W]` -> `[O, H, W, I]`: the element order of a channels-last weight in its chunk.
const NCHW_TO_NHWC: [i64; 4] = [0, 2, 3, 1];
/// The inverse permutation.
const NHWC_TO_NCHW: [i64; 4] = [0, 3, 1, 2];

impl Param {
    /// `flat_like`'s chunk of this parameter (any tensor in the layout of [`ParamStore::flat`]) as
    /// a tensor of the parameter's logical NCHW shape, aliasing `flat_like`.
    pub fn unflatten(&self, flat_like: &Tensor) -> Tensor {
        let chunk = flat_like.narrow(0, self.offset as i64, self.numel as i64);
        if self.channels_last {
            let s = &self.shape;
            chunk.view([s[0], s[2], s[3], s[1]]).permute(NHWC_TO_NCHW)
        } else {
            chunk.view(self.shape.as_slice())
        }
    }

    /// `t` (of the parameter's logical shape, any strides) as 1-D, in the element order of the
    /// parameter's chunk of the flat buffer.
    fn flatten_like_chunk(&self, t: &Tensor) -> Tensor {
        if self.channels_last {
            t.permute(NCHW_TO_NHWC).reshape([-1])
        } else {
            t.reshape([-1])
        }
    }
}

struct Decl {
    name: String,
    shape: Vec<i64>,
    kind: ParamKind,
    init: Init,
}

/// Collects parameter and buffer declarations, then allocates them in one flat buffer.
#[derive(Default)]
pub struct ParamBuilder {
    params: Vec<Decl>,
    buffers: Vec<(String, Tensor)>,
}

impl ParamBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn param(&mut self, name: &str, shape: &[i64], kind: ParamKind, init: Init) -> ParamId {
        self.params.push(Decl { name: name.to_string(), shape: shape.to_vec(), kind, init });
        ParamId(self.params.len() - 1)
    }

    /// A non-trainable tensor of the model's state (e.g. BN running statistics); returns its index.
    pub fn buffer(&mut self, name: &str, value: Tensor) -> usize {
        self.buffers.push((name.to_string(), value));
        self.buffers.len() - 1
    }

    /// Allocates the flat buffer on `device` and initialises every parameter, deterministically
    /// for a given `seed` (initialisation runs on the CPU, then moves).
    pub fn build(self, device: Device, seed: i64) -> Result<ParamStore> {
        self.build_with_layout(device, seed, false)
    }

    /// As [`ParamBuilder::build`]; with `channels_last`, every 4-D weight is stored channels-last
    /// (see [`Param::channels_last`]). The logical values are the same for a given `seed`.
    pub fn build_with_layout(self, device: Device, seed: i64, channels_last: bool) -> Result<ParamStore> {
        // Initialisation draws from torch's global generator: hold a process-wide lock so that
        // models built concurrently (threads, tests) each get the values of their own seed.
        let _rng = GLOBAL_RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        tch::manual_seed(seed);
        let _guard = tch::no_grad_guard();
        let mut chunks = Vec::with_capacity(self.params.len());
        for d in &self.params {
            let t = match d.init {
                Init::KaimingNormalFanOut => {
                    if d.shape.len() < 2 {
                        bail!("{}: kaiming init needs a weight of rank >= 2", d.name);
                    }
                    let receptive: i64 = d.shape[2..].iter().product();
                    let fan_out = d.shape[0] * receptive;
                    let std = (2.0 / fan_out as f64).sqrt();
                    Tensor::randn(d.shape.as_slice(), (Kind::Float, Device::Cpu)) * std
                }
                Init::UniformFanIn(fan_in) => {
                    let bound = 1.0 / (fan_in as f64).sqrt();
                    Tensor::empty(d.shape.as_slice(), (Kind::Float, Device::Cpu)).uniform_(-bound, bound)
                }
                Init::Const(v) => Tensor::full(d.shape.as_slice(), v, (Kind::Float, Device::Cpu)),
            };
            let stored_channels_last = channels_last && d.shape.len() == 4;
            chunks.push(if stored_channels_last { t.permute(NCHW_TO_NHWC).reshape([-1]) } else { t.reshape([-1]) });
        }
        let flat = if chunks.is_empty() {
            Tensor::zeros([0], (Kind::Float, device))
        } else {
            Tensor::cat(&chunks, 0).to_device(device)
        };
        let mut params = Vec::with_capacity(self.params.len());
        let mut offset = 0usize;
        for d in self.params {
            let numel: usize = d.shape.iter().product::<i64>() as usize;
            let mut param = Param {
                name: d.name,
                channels_last: channels_last && d.shape.len() == 4,
                shape: d.shape,
                kind: d.kind,
                offset,
                numel,
                tensor: Tensor::new(),
            };
            param.tensor = param.unflatten(&flat).set_requires_grad(true);
            params.push(param);
            offset += numel;
        }
        let buffers = self.buffers.into_iter().map(|(n, t)| (n, t.to_device(device))).collect();
        // Every parameter's .grad is a view of one flat gradient buffer (in the flat buffer's
        // layout), so backward accumulates straight into it: zeroing is one kernel and the flat
        // gradient is one copy, instead of one kernel per parameter and a concatenation.
        let grad = Tensor::zeros_like(&flat);
        for p in &mut params {
            let mut view = p.unflatten(&grad);
            mgrun_torch_shim::set_grad(&mut p.tensor, &mut view)
                .map_err(|e| anyhow::anyhow!("parameter {}: {e:#}", p.name))?;
        }
        Ok(ParamStore { flat, params, buffers, grad })
    }
}

/// All trainable parameters of a model in one flat f32 buffer, plus the model's buffers.
#[derive(Debug)]
pub struct ParamStore {
    flat: Tensor,
    params: Vec<Param>,
    buffers: Vec<(String, Tensor)>,
    /// Flat gradient buffer, same layout as `flat`; each parameter's .grad is a view of it.
    grad: Tensor,
}

impl ParamStore {
    /// The flat parameter buffer. Writing to it (under `no_grad`) updates every parameter.
    pub fn flat(&self) -> &Tensor {
        &self.flat
    }
    pub fn params(&self) -> &[Param] {
        &self.params
    }
    /// The parameter declared as `id`, as a tensor usable in a forward pass.
    pub fn get(&self, id: ParamId) -> &Tensor {
        &self.params[id.0].tensor
    }
    pub fn buffer(&self, index: usize) -> &Tensor {
        &self.buffers[index].1
    }
    pub fn buffers(&self) -> &[(String, Tensor)] {
        &self.buffers
    }
    pub fn numel(&self) -> usize {
        self.flat.numel()
    }
    pub fn device(&self) -> tch::Device {
        self.flat.device()
    }

    /// The current gradients as one flat tensor (zeros where a parameter has none), in the
    /// layout of [`ParamStore::flat`] (channels-last weights' gradients are reordered to their
    /// chunk's element order, whatever strides backward gave them).
    pub fn flat_grad(&self) -> Tensor {
        if self.grads_are_flat_views() {
            return self.grad.copy();
        }
        // Something replaced a .grad (e.g. a double-backward): gather them one by one.
        let grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| {
                let g = p.tensor.grad();
                if g.defined() {
                    p.flatten_like_chunk(&g)
                } else {
                    Tensor::zeros([p.numel as i64], (Kind::Float, self.flat.device()))
                }
            })
            .collect();
        if grads.is_empty() {
            return Tensor::zeros([0], (Kind::Float, self.flat.device()));
        }
        Tensor::cat(&grads, 0)
    }

    /// The current gradients as one flat tensor without a copy: the gradient buffer itself while every
    /// .grad is a view of it (else what [`ParamStore::flat_grad`] gathers). The next `zero_grad` or
    /// backward overwrites it: a caller that keeps a gradient across backward passes copies it.
    pub fn flat_grad_alias(&self) -> Tensor {
        match self.flat_grad_view() {
            Some(grad) => grad.shallow_clone(),
            None => self.flat_grad(),
        }
    }

    /// The flat gradient buffer itself, without a copy, while every .grad is a view of it.
    pub fn flat_grad_view(&self) -> Option<&Tensor> {
        self.grads_are_flat_views().then_some(&self.grad)
    }

    /// Zeroes the gradients so that the next backward starts from zero.
    pub fn zero_grad(&mut self) {
        if self.grads_are_flat_views() {
            let _ = self.grad.zero_();
            return;
        }
        for p in &mut self.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
    }

    /// True while every parameter's .grad still is its view of the flat gradient buffer.
    pub fn grads_are_flat_views(&self) -> bool {
        let base = self.grad.data_ptr() as usize;
        let elt = self.grad.kind().elt_size_in_bytes();
        self.params.iter().all(|p| {
            let g = p.tensor.grad();
            g.defined() && g.data_ptr() as usize == base + p.offset * elt && g.stride() == p.tensor.stride()
        })
    }

    /// Copies `values` (same layout as [`ParamStore::flat`]) into the parameters.
    pub fn set_flat(&self, values: &Tensor) -> Result<()> {
        if values.size() != self.flat.size() {
            bail!("parameter buffer has {:?} elements, got {:?}", self.flat.size(), values.size());
        }
        let _guard = tch::no_grad_guard();
        self.flat.shallow_clone().copy_(values);
        Ok(())
    }

    /// (name, tensor) of every parameter and buffer, with state-dict names.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self.params.iter().map(|p| (p.name.clone(), p.tensor.detach())).collect();
        out.extend(self.buffers.iter().map(|(n, t)| (n.clone(), t.shallow_clone())));
        out
    }
}
