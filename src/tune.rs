//! Per-adapter tuning: the fused kernel's query rows per invocation, lanes per row and query
//! placement (registers or workgroup memory), and the
//! decode kernel's lanes per key and keys per softmax step, measured on the adapter by `posattn tune` and stored in a small
//! JSON file, which [`crate::Context`] reads when it is made.
//!
//! **The file.** `POSATTN_TUNE_FILE` if set (an empty value turns tuning off), else
//! `$XDG_CACHE_HOME/posattn/tune.json`, else the platform's cache folder: `~/.cache` on Linux,
//! `~/Library/Caches` on macOS, `%LOCALAPPDATA%` on Windows ([`default_path`]). It holds one entry
//! per adapter, keyed by the adapter's name, backend, vendor and device ids, driver and driver
//! info, and this crate's version: a new driver or a new release of the crate needs a new
//! `posattn tune`, and until then the built-in heuristic applies
//! (`kernel::multi_row_device`: several rows on CPU adapters, one on GPUs).
//!
//! **What is read.** Only rows and lanes a plan can be built with (`kernel::ROWS_CHOICES` and
//! `kernel::ROW_LANES_CHOICES`: 1, 2, 4, 8 each; decode lanes from
//! `kernel::DECODE_LANES_CHOICES`: 1, 2, 4, 8, 16; decode keys per step from
//! `kernel::DECODE_KEYS_PER_STEP_CHOICES`: 1, 2, 4); a file that cannot be read or parsed, or an
//! entry for another adapter, leaves the heuristic in place (the context reports which applies:
//! [`crate::Context::rows_source`], [`crate::Context::decode_lanes_source`]). A file of an older
//! format (format 1 held rows only, format 2 no decode choice, format 3 no query placement,
//! format 4 no decode keys per step) reads as empty, so the next `posattn tune` replaces it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The tuning file's format version.
pub const TUNE_FORMAT: u32 = 5;

/// Everything the stored choice depends on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuneKey {
    /// `AdapterInfo::name`.
    pub adapter: String,
    /// `AdapterInfo::backend`, as its debug name.
    pub backend: String,
    /// `AdapterInfo::vendor`.
    pub vendor: u32,
    /// `AdapterInfo::device`.
    pub device: u32,
    /// `AdapterInfo::driver`.
    pub driver: String,
    /// `AdapterInfo::driver_info` (the driver's version).
    pub driver_info: String,
    /// This crate's version.
    pub crate_version: String,
}

impl TuneKey {
    /// The key of `info` with this crate's version.
    pub fn of(info: &wgpu::AdapterInfo) -> Self {
        TuneKey {
            adapter: info.name.clone(),
            backend: format!("{:?}", info.backend),
            vendor: info.vendor,
            device: info.device,
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
            crate_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// One adapter's choices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuneEntry {
    /// The adapter, driver and crate version measured.
    pub key: TuneKey,
    /// Fused-kernel rows per invocation by head size.
    pub rows: BTreeMap<u32, u32>,
    /// Fused-kernel lanes per query row by head size (1: one invocation per row slot).
    pub lanes: BTreeMap<u32, u32>,
    /// Fused-kernel query placement by head size: `true` keeps the queries in workgroup
    /// memory ([`crate::kernel::KernelKey::with_q_shared`]), `false` in registers.
    pub q_shared: BTreeMap<u32, bool>,
    /// The measurements behind the choice: per head size, (rows, lanes, queries in workgroup
    /// memory, median ms) of every candidate.
    pub measured: BTreeMap<u32, Vec<(u32, u32, bool, f64)>>,
    /// The shape measured: (heads, seq).
    pub shape: (u32, u32),
    /// Decode-kernel lanes per key by head size.
    pub decode_lanes: BTreeMap<u32, u32>,
    /// Decode-kernel keys per softmax step by head size.
    pub decode_keys: BTreeMap<u32, u32>,
    /// The decode measurements behind those choices: per head size, (lanes, keys per step,
    /// median µs per step) of every candidate.
    pub decode_measured: BTreeMap<u32, Vec<(u32, u32, f64)>>,
    /// The decode shape measured: (query heads, KV heads, batch, cache keys).
    pub decode_shape: (u32, u32, u32, u32),
}

/// An adapter's stored choices, by head size (empty maps where nothing is stored).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tuned {
    /// Fused-kernel rows per invocation.
    pub rows: BTreeMap<u32, u32>,
    /// Fused-kernel lanes per query row.
    pub lanes: BTreeMap<u32, u32>,
    /// Fused-kernel queries in workgroup memory (`true`) or registers.
    pub q_shared: BTreeMap<u32, bool>,
    /// Decode-kernel lanes per key.
    pub decode_lanes: BTreeMap<u32, u32>,
    /// Decode-kernel keys per softmax step.
    pub decode_keys: BTreeMap<u32, u32>,
}

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuneFile {
    /// [`TUNE_FORMAT`].
    pub format: u32,
    /// One entry per adapter key.
    pub entries: Vec<TuneEntry>,
}

/// The platform's cache folder for this crate's tuning file (see the module docs), `None` when
/// `POSATTN_TUNE_FILE` is set but empty or no home folder is known.
pub fn default_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("POSATTN_TUNE_FILE") {
        return (!p.is_empty()).then(|| PathBuf::from(p));
    }
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let base = if let Some(x) = var("XDG_CACHE_HOME") {
        x
    } else if cfg!(target_os = "windows") {
        var("LOCALAPPDATA")?
    } else if cfg!(target_os = "macos") {
        var("HOME")?.join("Library").join("Caches")
    } else {
        var("HOME")?.join(".cache")
    };
    Some(base.join("posattn").join("tune.json"))
}

impl TuneFile {
    /// Reads `path`; a missing file is an empty one.
    pub fn read(path: &Path) -> crate::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(TuneFile {
                    format: TUNE_FORMAT,
                    entries: Vec::new(),
                });
            }
            Err(e) => {
                return Err(crate::Error::invalid(
                    "tune file",
                    "a readable file",
                    format!("{}: {e}", path.display()),
                ));
            }
        };
        let bad = |e: serde_json::Error| {
            crate::Error::invalid(
                "tune file",
                "a posattn tuning file",
                format!("{}: {e}", path.display()),
            )
        };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(bad)?;
        if let Some(old) = value.get("format").and_then(|f| f.as_u64())
            && old < TUNE_FORMAT as u64
        {
            return Ok(TuneFile {
                format: TUNE_FORMAT,
                entries: Vec::new(),
            });
        }
        let file: TuneFile = serde_json::from_value(value).map_err(|e| {
            crate::Error::invalid(
                "tune file",
                "a posattn tuning file",
                format!("{}: {e}", path.display()),
            )
        })?;
        if file.format != TUNE_FORMAT {
            return Err(crate::Error::invalid(
                "tune file.format",
                TUNE_FORMAT.to_string(),
                file.format,
            ));
        }
        for e in &file.entries {
            for (field, map, choices) in [
                ("tune file.rows", &e.rows, crate::kernel::ROWS_CHOICES),
                (
                    "tune file.lanes",
                    &e.lanes,
                    crate::kernel::ROW_LANES_CHOICES,
                ),
                (
                    "tune file.decode_lanes",
                    &e.decode_lanes,
                    crate::kernel::DECODE_LANES_CHOICES,
                ),
                (
                    "tune file.decode_keys",
                    &e.decode_keys,
                    crate::kernel::DECODE_KEYS_PER_STEP_CHOICES,
                ),
            ] {
                for (&d, &r) in map {
                    if !choices.contains(&r) {
                        return Err(crate::Error::invalid(
                            field,
                            format!("one of {choices:?} (head_dim {d})"),
                            r,
                        ));
                    }
                }
            }
        }
        Ok(file)
    }

    /// The entry for `key`.
    pub fn find(&self, key: &TuneKey) -> Option<&TuneEntry> {
        self.entries.iter().find(|e| &e.key == key)
    }

    /// Replaces the entry with the same key, or adds it.
    pub fn upsert(&mut self, entry: TuneEntry) {
        self.entries.retain(|e| e.key != entry.key);
        self.entries.push(entry);
    }

    /// Writes the file, creating its folder.
    pub fn write(&self, path: &Path) -> crate::Result<()> {
        let fail = |e: std::io::Error| {
            crate::Error::invalid(
                "tune file",
                "a writable file",
                format!("{}: {e}", path.display()),
            )
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| crate::Error::invalid("tune file", "serialisable", e))?;
        std::fs::write(path, text).map_err(fail)
    }
}

/// The stored choices for `info` from the default file (empty when there is none or it cannot
/// be read: the heuristics apply).
pub fn stored(info: &wgpu::AdapterInfo) -> Tuned {
    default_path()
        .and_then(|p| TuneFile::read(&p).ok())
        .and_then(|f| {
            f.find(&TuneKey::of(info)).map(|e| Tuned {
                rows: e.rows.clone(),
                lanes: e.lanes.clone(),
                q_shared: e.q_shared.clone(),
                decode_lanes: e.decode_lanes.clone(),
                decode_keys: e.decode_keys.clone(),
            })
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(adapter: &str, rows: u32) -> TuneEntry {
        TuneEntry {
            key: TuneKey {
                adapter: adapter.into(),
                backend: "Vulkan".into(),
                vendor: 1,
                device: 2,
                driver: "d".into(),
                driver_info: "i".into(),
                crate_version: env!("CARGO_PKG_VERSION").into(),
            },
            rows: BTreeMap::from([(64, rows)]),
            lanes: BTreeMap::from([(64, 4)]),
            q_shared: BTreeMap::from([(64, true)]),
            measured: BTreeMap::from([(64, vec![(1, 1, false, 2.0), (rows, 4, true, 1.0)])]),
            shape: (8, 512),
            decode_lanes: BTreeMap::from([(128, 16)]),
            decode_keys: BTreeMap::from([(128, 4)]),
            decode_measured: BTreeMap::from([(128, vec![(8, 1, 2.0), (16, 4, 1.0)])]),
            decode_shape: (32, 8, 1, 2048),
        }
    }

    #[test]
    fn round_trip_upsert_and_bad_rows() {
        let dir = std::env::temp_dir().join(format!("posattn-tune-{}", std::process::id()));
        let path = dir.join("tune.json");
        let mut f = TuneFile::read(&path).unwrap();
        assert!(f.entries.is_empty());
        f.upsert(entry("a", 8));
        f.upsert(entry("b", 2));
        f.upsert(entry("a", 4));
        f.write(&path).unwrap();
        let g = TuneFile::read(&path).unwrap();
        assert_eq!(g.entries.len(), 2);
        assert_eq!(g.find(&entry("a", 0).key).unwrap().rows[&64], 4);
        assert_eq!(g.find(&entry("a", 0).key).unwrap().lanes[&64], 4);
        // Rows no plan can be built with, an unknown key and another format are errors.
        std::fs::write(
            &path,
            serde_json::to_string(&TuneFile {
                format: TUNE_FORMAT,
                entries: vec![entry("a", 3)],
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            TuneFile::read(&path).unwrap_err().field(),
            Some("tune file.rows")
        );
        let mut bad_lanes = entry("a", 4);
        bad_lanes.lanes.insert(128, 3);
        std::fs::write(
            &path,
            serde_json::to_string(&TuneFile {
                format: TUNE_FORMAT,
                entries: vec![bad_lanes],
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            TuneFile::read(&path).unwrap_err().field(),
            Some("tune file.lanes")
        );
        let mut bad_decode = entry("a", 4);
        bad_decode.decode_lanes.insert(64, 32);
        std::fs::write(
            &path,
            serde_json::to_string(&TuneFile {
                format: TUNE_FORMAT,
                entries: vec![bad_decode],
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            TuneFile::read(&path).unwrap_err().field(),
            Some("tune file.decode_lanes")
        );
        let mut bad_keys = entry("a", 4);
        bad_keys.decode_keys.insert(64, 3);
        std::fs::write(
            &path,
            serde_json::to_string(&TuneFile {
                format: TUNE_FORMAT,
                entries: vec![bad_keys],
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            TuneFile::read(&path).unwrap_err().field(),
            Some("tune file.decode_keys")
        );
        std::fs::write(&path, r#"{"format": 5, "entries": [], "extra": 0}"#).unwrap();
        assert_eq!(
            TuneFile::read(&path).unwrap_err().field(),
            Some("tune file")
        );
        // An older format (rows only) reads as empty: the next tune replaces it.
        std::fs::write(
            &path,
            r#"{"format": 1, "entries": [{"rows": {"64": 4}, "shape": [8, 512]}]}"#,
        )
        .unwrap();
        assert!(TuneFile::read(&path).unwrap().entries.is_empty());
        // Format 2 (no decode choice) too.
        std::fs::write(
            &path,
            r#"{"format": 2, "entries": [{"rows": {"64": 4}, "lanes": {}, "shape": [8, 512]}]}"#,
        )
        .unwrap();
        assert!(TuneFile::read(&path).unwrap().entries.is_empty());
        // Format 3 (no query placement) too.
        std::fs::write(
            &path,
            r#"{"format": 3, "entries": [{"rows": {"64": 4}, "measured": {"64": [[4, 1, 2.0]]}}]}"#,
        )
        .unwrap();
        assert!(TuneFile::read(&path).unwrap().entries.is_empty());
        // Format 4 (no decode keys per step) too.
        std::fs::write(
            &path,
            r#"{"format": 4, "entries": [{"rows": {"64": 4}, "decode_measured": {"128": [[8, 2.0]]}}]}"#,
        )
        .unwrap();
        assert!(TuneFile::read(&path).unwrap().entries.is_empty());
        std::fs::write(&path, r#"{"format": 6, "entries": []}"#).unwrap();
        assert_eq!(
            TuneFile::read(&path).unwrap_err().field(),
            Some("tune file.format")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
