//! The environment variables that choose an adapter, read strictly: a misspelt backend is an
//! error naming the variable, never an empty set of backends or a silently dropped name.

use crate::error::{Error, Result};

/// `WGPU_BACKEND`: a comma-separated list of backend names (wgpu's spellings: `vulkan`/`vk`,
/// `gl`/`gles`/`opengl`, `metal`/`mtl`, `dx12`/`d3d12`, `webgpu`), or `None` when unset.
/// Every name must be known, and the list must not be empty.
pub fn backends_from_env() -> Result<Option<wgpu::Backends>> {
    match std::env::var("WGPU_BACKEND") {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(Error::invalid(
            "WGPU_BACKEND",
            "a comma-separated list of backend names",
            format!("{v:?} (not UTF-8)"),
        )),
        Ok(text) => parse_backends(&text).map(Some),
    }
}

/// Parses a comma-separated list of backend names (see [`backends_from_env`]).
pub fn parse_backends(text: &str) -> Result<wgpu::Backends> {
    let mut all = wgpu::Backends::empty();
    for name in text.split(',').map(str::trim) {
        let b = match name.to_lowercase().as_str() {
            "vulkan" | "vk" => wgpu::Backends::VULKAN,
            "gl" | "gles" | "opengl" => wgpu::Backends::GL,
            "metal" | "mtl" => wgpu::Backends::METAL,
            "dx12" | "d3d12" => wgpu::Backends::DX12,
            "webgpu" => wgpu::Backends::BROWSER_WEBGPU,
            _ => {
                return Err(Error::invalid(
                    "WGPU_BACKEND",
                    "backend names separated by commas (vulkan, gl, metal, dx12, webgpu)",
                    format!("{name:?} in {text:?}"),
                ));
            }
        };
        all |= b;
    }
    Ok(all)
}

/// `WGPU_ADAPTER_NAME`, or `None` when unset or empty.
pub fn adapter_name_from_env() -> Result<Option<String>> {
    match std::env::var("WGPU_ADAPTER_NAME") {
        Ok(s) if s.is_empty() => Ok(None),
        Ok(s) => Ok(Some(s)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(Error::invalid(
            "WGPU_ADAPTER_NAME",
            "a UTF-8 part of an adapter's name",
            format!("{v:?}"),
        )),
    }
}

/// What to do when no adapter was found on `backends`: a software driver where one exists for
/// this platform, and a plain statement when a backend does not exist on it at all.
pub fn no_adapter_hint(backends: wgpu::Backends) -> String {
    let mut notes = Vec::new();
    let apple = cfg!(any(target_os = "macos", target_os = "ios"));
    let windows = cfg!(windows);
    if backends.contains(wgpu::Backends::METAL) && !apple {
        notes.push("Metal exists only on Apple platforms".to_string());
    }
    if backends.contains(wgpu::Backends::DX12) && !windows {
        notes.push("DirectX 12 exists only on Windows".to_string());
    }
    if backends.contains(wgpu::Backends::BROWSER_WEBGPU) {
        notes.push("WebGPU is for builds that run in a browser".to_string());
    }
    if cfg!(target_os = "linux") {
        if backends.contains(wgpu::Backends::VULKAN) {
            notes.push(
                "without a GPU, install a software Vulkan driver (Debian/Ubuntu: \
                 mesa-vulkan-drivers)"
                    .into(),
            );
        } else if backends.contains(wgpu::Backends::GL) {
            notes.push("without a GPU, install Mesa's EGL and GL drivers (llvmpipe)".into());
        }
    }
    if notes.is_empty() {
        "no adapter on the chosen backends".into()
    } else {
        notes.join("; ")
    }
}

/// A switch in the environment read strictly: unset, empty or `0` is off, `1` is on, anything
/// else an error naming the variable.
pub fn flag_from_env(var: &'static str) -> Result<bool> {
    match std::env::var(var) {
        Err(_) => Ok(false),
        Ok(v) if v.is_empty() || v == "0" => Ok(false),
        Ok(v) if v == "1" => Ok(true),
        Ok(v) => Err(crate::error::Error::invalid(var, "0 or 1", v)),
    }
}
