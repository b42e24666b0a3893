//! Every kernel variant the crate builds, written out as WGSL or translated by naga to the
//! languages wgpu hands to drivers (SPIR-V for Vulkan, MSL for Metal, HLSL for DX12, GLSL ES for
//! GL). `posattn shaders` and the portability tests use it; behind the `cli` feature, since
//! embedders never need it.

use std::fmt;
use std::path::{Path, PathBuf};

use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};

use crate::kernel::KernelKey;

/// An output language.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lang {
    /// The module as the crate hands it to wgpu.
    Wgsl,
    /// SPIR-V 1.0 binary (naga's default options), as wgpu gives Vulkan drivers.
    Spv,
    /// Metal Shading Language (naga's default options).
    Msl,
    /// HLSL shader model 5.1 (naga's default options).
    Hlsl,
    /// GLSL ES 3.10, the compute entry point only.
    Glsl,
}

impl Lang {
    /// Every language, WGSL first.
    pub const ALL: [Lang; 5] = [Lang::Wgsl, Lang::Spv, Lang::Msl, Lang::Hlsl, Lang::Glsl];

    /// The file extension (also the name `posattn shaders --lang` takes).
    pub fn extension(self) -> &'static str {
        match self {
            Lang::Wgsl => "wgsl",
            Lang::Spv => "spv",
            Lang::Msl => "msl",
            Lang::Hlsl => "hlsl",
            Lang::Glsl => "glsl",
        }
    }
}

/// A variant naga could not parse, validate or translate (a bug in the kernel source or in naga).
#[derive(Debug, Clone)]
pub struct TranslateError {
    /// The variant's name ([`KernelKey::name`]).
    pub variant: String,
    /// What failed: "parse", "validate", or the output language.
    pub stage: &'static str,
    /// The translator's message.
    pub message: String,
}

impl fmt::Display for TranslateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.variant, self.stage, self.message)
    }
}

impl std::error::Error for TranslateError {}

/// Every variant: the fused kernels, the unfused baseline's, then the decode kernels.
pub fn all_variants() -> Vec<KernelKey> {
    let mut keys = KernelKey::all_fused();
    keys.extend(KernelKey::all_unfused());
    keys.extend(KernelKey::all_decode());
    keys
}

/// The naga capabilities a variant needs: f16 conversions in f32 code for half storage
/// (`pack2x16float` and friends; every WebGPU adapter has them), f16 itself for native f16, and
/// subgroup operations for the decode kernel's subgroup forms.
pub fn capabilities(key: &KernelKey) -> Capabilities {
    crate::kernel::pipeline::naga_capabilities(key)
}

/// A variant parsed and validated by naga, ready to be written in any language.
pub struct Module {
    key: KernelKey,
    source: String,
    module: naga::Module,
    info: naga::valid::ModuleInfo,
}

impl Module {
    /// Parses and validates `key`'s WGSL with naga.
    pub fn new(key: KernelKey) -> Result<Self, TranslateError> {
        let source = key.wgsl();
        let err = |stage, message: String| TranslateError {
            variant: key.name(),
            stage,
            message,
        };
        let module = naga::front::wgsl::parse_str(&source)
            .map_err(|e| err("parse", e.emit_to_string(&source)))?;
        let info = Validator::new(ValidationFlags::all(), capabilities(&key))
            .validate(&module)
            .map_err(|e| err("validate", e.emit_to_string(&source)))?;
        Ok(Module {
            key,
            source,
            module,
            info,
        })
    }

    /// The variant.
    pub fn key(&self) -> KernelKey {
        self.key
    }

    /// The WGSL naga parsed (without the `enable` directives; see [`Lang::Wgsl`]).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// naga's module, validated.
    pub fn naga(&self) -> &naga::Module {
        &self.module
    }

    /// The module in `lang`: text, or for SPIR-V the little-endian words.
    pub fn emit(&self, lang: Lang) -> Result<Vec<u8>, TranslateError> {
        let err = |message: String| TranslateError {
            variant: self.key.name(),
            stage: lang.extension(),
            message,
        };
        let (m, info) = (&self.module, &self.info);
        Ok(match lang {
            // With the `enable` directives naga does without (Tint requires them).
            Lang::Wgsl => format!(
                "{}{}",
                crate::kernel::source::enable_directives(&self.key),
                self.source
            )
            .into_bytes(),
            // Cooperative matrices need SPIR-V 1.6 (Vulkan 1.3, what wgpu writes for such a
            // device) and MSL 2.3 (simdgroup matrices).
            Lang::Spv => spv::write_vec(m, info, &spv_options(&self.key), None)
                .map_err(|e| err(e.to_string()))?
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect(),
            Lang::Msl => msl::write_string(
                m,
                info,
                &msl::Options {
                    lang_version: if self.key.scores.coop() {
                        (2, 3)
                    } else {
                        msl::Options::default().lang_version
                    },
                    ..msl::Options::default()
                },
                &msl::PipelineOptions::default(),
            )
            .map_err(|e| err(e.to_string()))?
            .0
            .into_bytes(),
            Lang::Hlsl => {
                let mut out = String::new();
                let (opts, pipe) = (hlsl::Options::default(), hlsl::PipelineOptions::default());
                hlsl::Writer::new(&mut out, &opts, &pipe)
                    .write(m, info, None)
                    .map_err(|e| err(e.to_string()))?;
                out.into_bytes()
            }
            Lang::Glsl => {
                let mut out = String::new();
                let opts = glsl::Options {
                    version: glsl::Version::new_gles(310),
                    ..glsl::Options::default()
                };
                let pipe = glsl::PipelineOptions {
                    shader_stage: naga::ShaderStage::Compute,
                    entry_point: self.key.entry_point().to_string(),
                    multiview: None,
                };
                glsl::Writer::new(
                    &mut out,
                    m,
                    info,
                    &opts,
                    &pipe,
                    naga::proc::BoundsCheckPolicies::default(),
                )
                .and_then(|mut w| w.write())
                .map_err(|e| err(e.to_string()))?;
                out.into_bytes()
            }
        })
    }
}

/// naga's SPIR-V options for `key`: the defaults, at SPIR-V 1.6 for cooperative matrices.
fn spv_options(key: &KernelKey) -> spv::Options<'static> {
    let mut o = spv::Options::default();
    if key.scores.coop() {
        o.lang_version = (1, 6);
    }
    o
}

/// The file name of a variant in a language: `<name>.<extension>`.
pub fn file_name(key: &KernelKey, lang: Lang) -> String {
    format!("{}.{}", key.name(), lang.extension())
}

/// Writes every variant in `lang` into `dir` (created if missing), one file per variant named by
/// [`file_name`]; returns the paths in [`all_variants`] order.
pub fn write_all(dir: &Path, lang: Lang) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    write_variants(dir, lang, &all_variants(), default_threads())
}

/// Threads [`write_variants`] uses by default: the machine's available parallelism.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The variants of `keys` whose names contain any of `patterns` (all of them when `patterns`
/// is empty), in order.
pub fn matching(keys: &[KernelKey], patterns: &[String]) -> Vec<KernelKey> {
    keys.iter()
        .copied()
        .filter(|k| {
            let name = k.name();
            patterns.is_empty() || patterns.iter().any(|p| name.contains(p.as_str()))
        })
        .collect()
}

/// Writes `keys` in `lang` into `dir` (created if missing), one file per variant named by
/// [`file_name`], translating on `threads` threads (naga parses one module per thread); returns
/// the paths in `keys`' order. The first error stops the remaining variants of its thread and is
/// returned.
pub fn write_variants(
    dir: &Path,
    lang: Lang,
    keys: &[KernelKey],
    threads: usize,
) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let write = |key: KernelKey| -> Result<PathBuf, String> {
        let bytes = if lang == Lang::Wgsl {
            key.wgsl().into_bytes()
        } else {
            Module::new(key)
                .and_then(|m| m.emit(lang))
                .map_err(|e| e.to_string())?
        };
        let path = dir.join(file_name(&key, lang));
        std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    };
    let threads = threads.clamp(1, keys.len().max(1));
    // Thread t takes variants t, t + threads, ...: the large head sizes sit together in the
    // list, and striding shares them out.
    let parts: Vec<Result<Vec<(usize, PathBuf)>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let write = &write;
                scope.spawn(move || {
                    (t..keys.len())
                        .step_by(threads)
                        .map(|i| write(keys[i]).map(|p| (i, p)))
                        .collect::<Result<Vec<_>, String>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a writer thread panicked".into()))
            })
            .collect()
    });
    let mut paths: Vec<Option<PathBuf>> = vec![None; keys.len()];
    for part in parts {
        for (i, p) in part? {
            paths[i] = Some(p);
        }
    }
    Ok(paths.into_iter().flatten().collect())
}
