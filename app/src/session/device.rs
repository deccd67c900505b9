//! Where a model runs: `cpu`, `cuda[:N]`, `metal[:N]` or `auto`, the same words for `run`,
//! `bench`, `serve`, `ocr` and the app's settings. A device this build or machine lacks is an
//! error that names it, never a silent fall back to the CPU.

use candle_core::Device;

/// A `--device` word that cannot be used here.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {spec}: `{index}` is not a device number")]
    BadIndex { spec: String, index: String },
    #[error("device {0}: expected cpu, cuda, cuda:N, metal, metal:N or auto")]
    Unknown(String),
    #[error("device {spec}: this qwenvl was built without {backend} support (rebuild with `--features {feature}`{on})",
        on = if *.backend == "Metal" { " on macOS" } else { "" })]
    NotBuilt {
        spec: String,
        backend: &'static str,
        feature: &'static str,
    },
    #[error("device {spec}: no usable {backend} device: {source}")]
    Unavailable {
        spec: String,
        backend: &'static str,
        source: candle_core::Error,
    },
}

/// The device a `--device` word names.
pub fn parse_device(spec: &str) -> Result<Device, DeviceError> {
    let (kind, index) = match spec.split_once(':') {
        Some((k, i)) => (
            k,
            i.parse::<usize>().map_err(|_| DeviceError::BadIndex {
                spec: spec.to_string(),
                index: i.to_string(),
            })?,
        ),
        None => (spec, 0),
    };
    let cuda = candle_core::utils::cuda_is_available();
    let metal = candle_core::utils::metal_is_available();
    let unavailable = |backend| {
        move |source| DeviceError::Unavailable {
            spec: spec.to_string(),
            backend,
            source,
        }
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "auto" if cuda => Device::new_cuda(index).map_err(unavailable("CUDA")),
        "auto" if metal => Device::new_metal(index).map_err(unavailable("Metal")),
        "auto" => Ok(Device::Cpu),
        "cuda" if !cuda => Err(DeviceError::NotBuilt {
            spec: spec.to_string(),
            backend: "CUDA",
            feature: "cuda",
        }),
        "cuda" => Device::new_cuda(index).map_err(unavailable("CUDA")),
        "metal" if !metal => Err(DeviceError::NotBuilt {
            spec: spec.to_string(),
            backend: "Metal",
            feature: "metal",
        }),
        "metal" => Device::new_metal(index).map_err(unavailable("Metal")),
        _ => Err(DeviceError::Unknown(spec.to_string())),
    }
}

/// The devices this build can use on this machine, as `--device` words, the CPU first: what the
/// app's settings offer.
pub fn available_devices() -> Vec<String> {
    let mut out = vec!["cpu".to_string()];
    if candle_core::utils::cuda_is_available() {
        // Cards are numbered from 0; the first that fails to open ends the list.
        out.extend(
            (0..16)
                .map_while(|i| Device::new_cuda(i).ok().map(|_| i))
                .map(|i| format!("cuda:{i}")),
        );
    }
    if candle_core::utils::metal_is_available() && Device::new_metal(0).is_ok() {
        out.push("metal:0".to_string());
    }
    out
}

/// A short human name for a device (`CPU`, `CUDA GPU 0`, `Metal GPU`).
pub fn describe(spec: &str) -> String {
    match spec.split_once(':') {
        Some(("cuda", i)) => format!("CUDA GPU {i}"),
        Some(("metal", _)) => "Metal GPU".to_string(),
        _ if spec == "cpu" => "CPU".to_string(),
        _ => spec.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_parse_or_name_the_problem() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(matches!(
            parse_device("cuda:x"),
            Err(DeviceError::BadIndex { .. })
        ));
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(
            e.contains("device tpu:") || e.contains("device tpu") && e.contains("expected cpu"),
            "{e}"
        );
        if !candle_core::utils::cuda_is_available() {
            let e = parse_device("cuda:1").unwrap_err().to_string();
            assert!(
                e.contains("device cuda:1:") && e.contains("without CUDA"),
                "{e}"
            );
            assert!(!available_devices().iter().any(|d| d.starts_with("cuda")));
        }
        if !candle_core::utils::metal_is_available() {
            let e = parse_device("metal").unwrap_err().to_string();
            assert!(e.contains("without Metal") && e.contains("on macOS"), "{e}");
        }
        assert_eq!(available_devices()[0], "cpu");
    }
}
