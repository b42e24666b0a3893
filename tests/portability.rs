//! Kernel variants translated by naga to SPIR-V, MSL, HLSL and GLSL (the languages wgpu hands to
//! Vulkan, Metal, DX12 and GL drivers; the translation is posattn::kernel::export, which
//! `posattn shaders --lang` also uses), and the SPIR-V checked with `spirv-val` from
//! SPIRV-Tools. This is the evidence for Metal and DX12 on a machine with neither. Every listed
//! variant is translated in tests/shaders.rs, in the pass that validates it (naga parses each
//! variant once); this file holds the cooperative-matrix variants. `spirv-val` missing is
//! reported; with `POSATTN_REQUIRE_SPIRV_VAL` set (CI) it is a failure. Tint's verdict on the
//! same variants is tests/dawn.rs.

use std::process::Command;

use posattn::kernel::export::{self, Lang, Module};

/// Runs `val` on the SPIR-V module at `path` for `target_env`: whether it passed, and its output.
pub(crate) fn run_spirv_val(val: &str, path: &std::path::Path, target_env: &str) -> (bool, String) {
    let out = Command::new(val)
        .args(["--target-env", target_env])
        .arg(path)
        .output()
        .expect("run spirv-val");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

pub(crate) fn spirv_val() -> Option<&'static str> {
    let found = Command::new("spirv-val").arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("POSATTN_REQUIRE_SPIRV_VAL").is_none(),
            "spirv-val not found (Debian: apt-get install spirv-tools)"
        );
        println!("spirv-val not found: SPIR-V was emitted but not validated by SPIRV-Tools");
        return None;
    }
    Some("spirv-val")
}

/// The cooperative-matrix score-tile variants, which no adapter here runs: naga validates them,
/// writes SPIR-V (checked by `spirv-val` for Vulkan 1.3, the version wgpu asks for where it
/// enables the feature) and MSL (Metal's simdgroup matrices). HLSL and GLSL have no cooperative
/// matrices, and the variants are never built for those backends.
#[test]
fn cooperative_matrix_variants_translate_to_spirv_and_msl() {
    let val = spirv_val();
    let dir = std::env::temp_dir().join(format!("posattn-coop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = posattn::kernel::KernelKey::coop_examples();
    assert!(!keys.is_empty());
    let mut validated = 0;
    let mut too_old = false;
    for key in &keys {
        let module = Module::new(*key).unwrap_or_else(|e| panic!("{e}"));
        let spv = module.emit(Lang::Spv).unwrap_or_else(|e| panic!("{e}"));
        let msl = module.emit(Lang::Msl).unwrap_or_else(|e| panic!("{e}"));
        let msl = String::from_utf8(msl).unwrap();
        assert!(
            msl.contains("simdgroup"),
            "{}: no simdgroup matrix in the MSL",
            key.name()
        );
        if let Some(val) = val {
            let path = dir.join(export::file_name(key, Lang::Spv));
            std::fs::write(&path, spv).unwrap();
            let (passed, text) = run_spirv_val(val, &path, "vulkan1.3");
            // SPIRV-Tools before 2023.4 (Debian 12 ships 2023.1) does not know the
            // CooperativeMatrixKHR capability (6022): reported, not passed.
            if !passed && text.contains("Invalid capability operand: 6022") {
                too_old = true;
                continue;
            }
            assert!(passed, "{}: spirv-val: {text}", key.name());
            validated += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{} cooperative-matrix variants translated to SPIR-V and MSL; {validated} passed spirv-val",
        keys.len()
    );
    if too_old {
        println!(
            "spirv-val here predates SPV_KHR_cooperative_matrix (SPIRV-Tools 2023.4): the \
             cooperative-matrix SPIR-V was emitted by naga but not validated by SPIRV-Tools"
        );
    }
}
