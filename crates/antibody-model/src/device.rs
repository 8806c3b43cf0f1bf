//! Run-time device choice: `--device cpu|cuda[:N]`, one generic code path per backend.

use std::fmt;
use std::str::FromStr;

use crate::error::ModelError;

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// burn's pure-Rust CPU backend (flex).
    #[default]
    Cpu,
    /// CUDA device `N` (needs the `cuda` cargo feature).
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    ModelError::Invalid(format!("bad device `{s}`: expected cpu, cuda or cuda:N"))
                }),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
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

/// Calls `$body` with the type alias `$B` bound to the backend `$spec` names and `$device`
/// bound to its device, so binaries are written once, generic over the backend.
/// `$inner` picks the inference (`Cpu`/`Gpu`) or training (`CpuAutodiff`/`GpuAutodiff`) pair.
#[macro_export]
macro_rules! with_backend {
    ($spec:expr, autodiff, |$B:ident, $device:ident| $body:expr) => {
        $crate::with_backend!(@dispatch $spec, $crate::device::CpuAutodiff, GpuAutodiff, |$B, $device| $body)
    };
    ($spec:expr, |$B:ident, $device:ident| $body:expr) => {
        $crate::with_backend!(@dispatch $spec, $crate::device::Cpu, Gpu, |$B, $device| $body)
    };
    (@dispatch $spec:expr, $cpu:ty, $gpu:ident, |$B:ident, $device:ident| $body:expr) => {{
        match $spec {
            $crate::device::DeviceSpec::Cpu => {
                type $B = $cpu;
                let $device = Default::default();
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::device::DeviceSpec::Cuda(n) => {
                type $B = $crate::device::$gpu;
                let $device = burn::backend::cuda::CudaDevice::new(n);
                $body
            }
            #[cfg(not(feature = "cuda"))]
            $crate::device::DeviceSpec::Cuda(_) => {
                Err(anyhow::anyhow!("this build has no CUDA support: rebuild with `--features cuda`"))
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!("gpu".parse::<DeviceSpec>().is_err());
    }
}
