//! Run-time device choice: `--device cpu|cuda[:N]|wgpu[:N|:cpu]`, one generic code path per
//! backend.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::error::ModelError;

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// burn's pure-Rust CPU backend (flex).
    #[default]
    Cpu,
    /// CUDA device `N` (needs the `cuda` cargo feature).
    Cuda(usize),
    /// A device of burn's wgpu backend (needs the `wgpu` cargo feature).
    Wgpu(WgpuKind),
}

/// Which wgpu adapter: `wgpu` (the best one found, or `CUBECL_WGPU_DEFAULT_DEVICE`),
/// `wgpu:N` (the N-th discrete GPU), `wgpu:cpu` (a software device such as lavapipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgpuKind {
    /// The best adapter found.
    Default,
    /// The N-th discrete GPU.
    Discrete(usize),
    /// A CPU (software) adapter.
    Cpu,
}

impl FromStr for DeviceSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            ModelError::Invalid(format!(
                "bad device `{s}`: expected cpu, cuda, cuda:N, wgpu, wgpu:N or wgpu:cpu"
            ))
        };
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            "wgpu" => Ok(Self::Wgpu(WgpuKind::Default)),
            "wgpu:cpu" => Ok(Self::Wgpu(WgpuKind::Cpu)),
            _ => {
                if let Some(n) = s.strip_prefix("cuda:") {
                    n.parse().map(Self::Cuda).map_err(|_| bad())
                } else if let Some(n) = s.strip_prefix("wgpu:") {
                    n.parse()
                        .map(|n| Self::Wgpu(WgpuKind::Discrete(n)))
                        .map_err(|_| bad())
                } else {
                    Err(bad())
                }
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Wgpu(WgpuKind::Default) => write!(f, "wgpu"),
            Self::Wgpu(WgpuKind::Discrete(n)) => write!(f, "wgpu:{n}"),
            Self::Wgpu(WgpuKind::Cpu) => write!(f, "wgpu:cpu"),
        }
    }
}

/// A compute dtype named on the command line (`--dtype f32|f16|bf16`): the dtype of
/// [`crate::Llama::with_compute_dtype`]; the weights, optimizer state and loss reductions
/// stay f32 whatever it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeSpec {
    /// Everything in f32 (the default).
    #[default]
    F32,
    /// Projections, attention and MLP in f16.
    F16,
    /// Projections, attention and MLP in bf16.
    Bf16,
}

/// The process's compute dtype ([`DTypeSpec::use_for_process`]): 0 = f32, 1 = f16, 2 = bf16.
static PROCESS_DTYPE: AtomicU8 = AtomicU8::new(0);

impl DTypeSpec {
    /// Makes this the compute dtype of every model the process builds or loads from now on
    /// (students, teachers, the scorer, attacked copies: [`crate::LlamaConfig::init`] reads
    /// it), after checking that `device` can store and compute in it: a clear error naming
    /// the device otherwise (bf16 on lavapipe), never a panic. Like `torch.autocast`, a
    /// process-wide setting, so no model escapes it; called once, by a binary's `main` after
    /// parsing `--dtype` (a tidy test keeps it out of the libraries and the tests, which
    /// use [`crate::Llama::with_compute_dtype`]).
    pub fn use_for_process<B: burn::tensor::backend::Backend>(
        self,
        device: &B::Device,
    ) -> Result<(), ModelError> {
        // f32 is every backend's own dtype: nothing to check, and the device is not touched
        // before the first model is built.
        if self != Self::F32 {
            crate::llama::check_compute_dtype::<B>(device, self.float())?;
        }
        let code = match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Bf16 => 2,
        };
        PROCESS_DTYPE.store(code, Ordering::Relaxed);
        Ok(())
    }

    /// The process's compute dtype (f32 unless a binary chose another).
    pub fn process() -> Self {
        match PROCESS_DTYPE.load(Ordering::Relaxed) {
            1 => Self::F16,
            2 => Self::Bf16,
            _ => Self::F32,
        }
    }

    /// The process's compute dtype where it is not f32: what cache keys and input hashes
    /// add, since it changes the answers (f32 adds nothing, so keys made before `--dtype`
    /// existed stay current).
    pub fn process_key() -> Option<Self> {
        Some(Self::process()).filter(|d| *d != Self::F32)
    }

    /// burn's dtype.
    pub fn float(self) -> burn::tensor::FloatDType {
        match self {
            Self::F32 => burn::tensor::FloatDType::F32,
            Self::F16 => burn::tensor::FloatDType::F16,
            Self::Bf16 => burn::tensor::FloatDType::BF16,
        }
    }
}

impl FromStr for DTypeSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "fp32" => Ok(Self::F32),
            "f16" | "fp16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            _ => Err(ModelError::Invalid(format!(
                "bad dtype `{s}`: expected f32, f16 or bf16"
            ))),
        }
    }
}

impl fmt::Display for DTypeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

/// The CPU inference backend.
pub type Cpu = burn::backend::Flex;
/// The CPU training backend.
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;
/// The CUDA inference backend.
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda;
/// The CUDA training backend.
#[cfg(feature = "cuda")]
pub type GpuAutodiff = burn::backend::Autodiff<Gpu>;
/// The wgpu inference backend (f32).
#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu;
/// The wgpu training backend.
#[cfg(feature = "wgpu")]
pub type WgpuAutodiff = burn::backend::Autodiff<Wgpu>;

/// Runs `probe`, turning a panic into an error. burn's CUDA runtime panics where there is no
/// driver or no such device, on its device thread (`Unable to dynamically load the "cuda"
/// shared library ...`) and then on the caller's (`RecvError`); the panic hook collects every
/// thread's message meanwhile instead of printing it, and the error reports the first, the
/// cause, once.
pub fn probe_device(
    what: &str,
    probe: impl FnOnce() + std::panic::UnwindSafe,
) -> Result<(), ModelError> {
    use std::sync::{Arc, Mutex};
    let messages = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = Arc::clone(&messages);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info.payload_as_str().unwrap_or("(no message)").to_owned();
        if let Ok(mut m) = sink.lock() {
            m.push(text);
        }
    }));
    let result = std::panic::catch_unwind(probe);
    std::panic::set_hook(hook);
    result.map_err(|_| {
        let messages = messages.lock().map(|m| m.clone()).unwrap_or_default();
        let cause = messages.first().map_or("(no message)", String::as_str);
        // cudarc's message lists every library name it tried: its first clause says it all.
        let cause = cause.split(" - ").next().unwrap_or(cause);
        ModelError::Invalid(format!(
            "{what} cannot be used: {cause} (is the NVIDIA driver installed, libcuda.so on the \
             library path and the device index in range?)"
        ))
    })
}

/// burn's CUDA device `n`, after one tiny allocation and read on it that proves the driver
/// loads and the device exists: a clean error instead of burn's panic otherwise.
#[cfg(feature = "cuda")]
pub fn cuda_device(n: usize) -> Result<burn::backend::cuda::CudaDevice, ModelError> {
    let device = burn::backend::cuda::CudaDevice::new(n);
    let probe = device.clone();
    probe_device(
        &format!("CUDA device cuda:{n}"),
        std::panic::AssertUnwindSafe(move || {
            let _ = burn::tensor::Tensor::<Gpu, 1>::zeros([1], &probe).into_data();
        }),
    )?;
    Ok(device)
}

/// burn's device for a wgpu adapter choice.
#[cfg(feature = "wgpu")]
pub fn wgpu_device(kind: WgpuKind) -> burn::backend::wgpu::WgpuDevice {
    use burn::backend::wgpu::WgpuDevice;
    match kind {
        WgpuKind::Default => WgpuDevice::DefaultDevice,
        WgpuKind::Discrete(n) => WgpuDevice::DiscreteGpu(n),
        WgpuKind::Cpu => WgpuDevice::Cpu,
    }
}

/// Calls `$body` with the type alias `$B` bound to the backend `$spec` names and `$device`
/// bound to its device, so binaries are written once, generic over the backend.
/// `autodiff` picks the training backends (`CpuAutodiff`, `GpuAutodiff`, `WgpuAutodiff`),
/// its absence the inference ones (`Cpu`, `Gpu`, `Wgpu`). On the CPU it also sets the
/// process's inference shards ([`crate::shards::cpu_shards`]: greedy generation and
/// forward-only log-probabilities in parts, one per core, each part's products on one
/// thread); an invalid `ANTIBODY_CPU_SHARDS` is an error naming it.
#[macro_export]
macro_rules! with_backend {
    ($spec:expr, autodiff, |$B:ident, $device:ident| $body:expr) => {
        $crate::with_backend!(@dispatch $spec, $crate::device::CpuAutodiff, GpuAutodiff, WgpuAutodiff, |$B, $device| $body)
    };
    ($spec:expr, |$B:ident, $device:ident| $body:expr) => {
        $crate::with_backend!(@dispatch $spec, $crate::device::Cpu, Gpu, Wgpu, |$B, $device| $body)
    };
    (@dispatch $spec:expr, $cpu:ty, $gpu:ident, $wgpu:ident, |$B:ident, $device:ident| $body:expr) => {{
        match $spec {
            $crate::device::DeviceSpec::Cpu => {
                type $B = $cpu;
                let $device = Default::default();
                match $crate::shards::cpu_shards() {
                    Ok(shards) => {
                        $crate::shards::set_inference_shards(shards);
                        $body
                    }
                    Err(e) => Err(anyhow::Error::from(e)),
                }
            }
            #[cfg(feature = "cuda")]
            $crate::device::DeviceSpec::Cuda(n) => {
                type $B = $crate::device::$gpu;
                match $crate::device::cuda_device(n) {
                    Ok($device) => $body,
                    Err(e) => Err(anyhow::Error::from(e)),
                }
            }
            #[cfg(not(feature = "cuda"))]
            $crate::device::DeviceSpec::Cuda(_) => {
                Err(anyhow::anyhow!("this build has no CUDA support: rebuild with `--features cuda`"))
            }
            #[cfg(feature = "wgpu")]
            $crate::device::DeviceSpec::Wgpu(kind) => {
                type $B = $crate::device::$wgpu;
                let $device = $crate::device::wgpu_device(kind);
                $body
            }
            #[cfg(not(feature = "wgpu"))]
            $crate::device::DeviceSpec::Wgpu(_) => {
                Err(anyhow::anyhow!("this build has no wgpu support: rebuild with `--features wgpu`"))
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_that_panics_on_first_use_is_a_clean_error() {
        // As burn's CUDA runtime fails: its device thread panics with the cause, then the
        // caller's wait for the answer panics with `RecvError`.
        let err = probe_device("CUDA device cuda:7", || {
            let device_thread = std::thread::spawn(|| {
                panic!(
                    "Unable to dynamically load the \"cuda\" shared library - searched for \
                     library names: [\"libcuda.so\"]"
                )
            });
            let answer: Result<(), _> = device_thread.join();
            answer
                .map_err(|_| "RecvError")
                .expect("the device's answer");
        })
        .expect_err("the probe panicked");
        let text = err.to_string();
        assert_eq!(
            text,
            "CUDA device cuda:7 cannot be used: Unable to dynamically load the \"cuda\" shared \
             library (is the NVIDIA driver installed, libcuda.so on the library path and the \
             device index in range?)"
        );
        probe_device("the CPU", || {}).expect("a probe that returns is fine");
        // The hook is restored: a later panic is reported as usual (and caught here).
        assert!(std::panic::catch_unwind(|| panic!("after")).is_err());
    }

    #[test]
    fn device_names_parse() {
        assert_eq!("cpu".parse::<DeviceSpec>().expect("cpu"), DeviceSpec::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceSpec>().expect("cuda"),
            DeviceSpec::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceSpec>().expect("cuda:3"),
            DeviceSpec::Cuda(3)
        );
        assert_eq!(
            "wgpu".parse::<DeviceSpec>().expect("wgpu"),
            DeviceSpec::Wgpu(WgpuKind::Default)
        );
        assert_eq!(
            "wgpu:1".parse::<DeviceSpec>().expect("wgpu:1"),
            DeviceSpec::Wgpu(WgpuKind::Discrete(1))
        );
        assert_eq!(
            "wgpu:cpu".parse::<DeviceSpec>().expect("wgpu:cpu"),
            DeviceSpec::Wgpu(WgpuKind::Cpu)
        );
        for s in ["cpu", "cuda:2", "wgpu", "wgpu:3", "wgpu:cpu"] {
            assert_eq!(s.parse::<DeviceSpec>().expect(s).to_string(), s);
        }
        for bad in ["gpu", "cuda:x", "wgpu:", "wgpu:gpu"] {
            let e = bad.parse::<DeviceSpec>().expect_err(bad).to_string();
            assert!(e.contains(bad) && e.contains("wgpu:cpu"), "{e}");
        }
    }
}
