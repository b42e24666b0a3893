//! Errors are values: a caller's invalid request, what the device cannot do, and what went wrong
//! on the device are kept apart so that a caller can tell them apart.

use std::time::Duration;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is invalid: `field` does not hold what was expected.
    #[error("invalid `{field}`: expected {expected}, got {got}")]
    Invalid {
        /// The field, or its dotted path.
        field: &'static str,
        /// What it should hold.
        expected: String,
        /// What it held.
        got: String,
    },
    /// A JSON document (run spec, model config) is invalid at `path`, a dotted path from its
    /// root such as `position.theta`.
    #[error("invalid `{path}`: {message}")]
    InvalidAt {
        /// Dotted path from the document's root.
        path: String,
        /// What is wrong there.
        message: String,
    },
    /// A custom scheme's snippet or tables are invalid: `field` is `position.wgsl` (the
    /// snippet), a hook's name (its signature) or `position.tables.NAME`; `line` is the
    /// snippet's line when the problem has one.
    #[error("invalid `{field}`{}: expected {message}", line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    Scheme {
        /// The snippet (`position.wgsl`), a hook or a table.
        field: String,
        /// The snippet's line, when the problem has one.
        line: Option<u32>,
        /// What was expected.
        message: String,
    },
    /// The request is valid but this device cannot run it (a limit or a missing feature).
    #[error("unavailable on this device: `{what}` needs {needed}, the device allows {allowed}")]
    Unavailable {
        /// The limit or feature.
        what: &'static str,
        /// What the request needs.
        needed: String,
        /// What the device allows.
        allowed: String,
    },
    /// No adapter matched the request.
    #[error("no adapter found: {0}")]
    NoAdapter(String),
    /// The adapter refused to open a device.
    #[error("could not open a device on {adapter}: {source}")]
    RequestDevice {
        /// The adapter, described.
        adapter: String,
        #[source]
        /// wgpu's reason.
        source: wgpu::RequestDeviceError,
    },
    /// wgpu reported a validation, out-of-memory or internal error while this crate worked.
    #[error("wgpu reported an error during {during}: {message}")]
    Wgpu {
        /// What the crate was doing.
        during: &'static str,
        /// wgpu's message.
        message: String,
    },
    /// The device did not finish within the allowed time.
    #[error("timed out after {0:?} waiting for the device")]
    Timeout(Duration),
    /// The device was lost, or polling or mapping failed.
    #[error("device failure during {during}: {message}")]
    Device {
        /// What the crate was doing.
        during: &'static str,
        /// The failure.
        message: String,
    },
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Invalid`] for `field`.
    pub fn invalid(
        field: &'static str,
        expected: impl Into<String>,
        got: impl std::fmt::Display,
    ) -> Self {
        Error::Invalid {
            field,
            expected: expected.into(),
            got: got.to_string(),
        }
    }

    pub(crate) fn unavailable(
        what: &'static str,
        needed: impl std::fmt::Display,
        allowed: impl std::fmt::Display,
    ) -> Self {
        Error::Unavailable {
            what,
            needed: needed.to_string(),
            allowed: allowed.to_string(),
        }
    }

    /// The field or path an [`Error::Invalid`] or [`Error::InvalidAt`] names.
    pub fn path(&self) -> Option<&str> {
        match self {
            Error::InvalidAt { path, .. } | Error::Scheme { field: path, .. } => Some(path),
            other => other.field(),
        }
    }

    /// Whether this error is about the caller's request (its values or files), not the device.
    pub fn is_invalid(&self) -> bool {
        matches!(
            self,
            Error::Invalid { .. } | Error::InvalidAt { .. } | Error::Scheme { .. }
        )
    }

    /// The field an [`Error::Invalid`] names, for callers and tests that match on it.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Error::Invalid { field, .. } => Some(field),
            Error::Unavailable { what, .. } => Some(what),
            _ => None,
        }
    }
}

/// Runs `f` inside validation, out-of-memory and internal error scopes of `device` and returns
/// the first error wgpu reported, tagged with `during`. The scopes are popped asynchronously:
/// on the web the browser answers them later, on native wgpu the futures are ready at once.
pub(crate) async fn scoped_async<R>(
    device: &wgpu::Device,
    during: &'static str,
    f: impl FnOnce() -> R,
) -> Result<R> {
    let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let r = f();
    // Popped innermost first, then awaited.
    let pops = [validation.pop(), oom.pop(), internal.pop()];
    let mut first = None;
    for pop in pops {
        if let Some(e) = pop.await {
            first.get_or_insert(e.to_string());
        }
    }
    match first {
        Some(message) => Err(Error::Wgpu { during, message }),
        None => Ok(r),
    }
}

/// [`scoped_async`], waited for on this thread.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn scoped<R>(
    device: &wgpu::Device,
    during: &'static str,
    f: impl FnOnce() -> R,
) -> Result<R> {
    pollster::block_on(scoped_async(device, during, f))
}

/// On the web an error scope can only be read asynchronously, and a synchronous call cannot wait
/// for it: `f` runs without scopes, and an error it causes reaches the device's uncaptured-error
/// handler (recorded by [`crate::Context::take_uncaptured_errors`] on a device this crate opened,
/// the application's own handler on a device it passed in). The `_async` forms return it.
#[cfg(target_arch = "wasm32")]
pub(crate) fn scoped<R>(
    _device: &wgpu::Device,
    _during: &'static str,
    f: impl FnOnce() -> R,
) -> Result<R> {
    Ok(f())
}
