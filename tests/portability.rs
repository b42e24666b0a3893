//! Every kernel variant the crate can build, translated by naga to SPIR-V, MSL, HLSL and GLSL
//! (the languages wgpu hands to Vulkan, Metal, DX12 and GL drivers; the translation is
//! posattn::kernel::export, which `posattn shaders --lang` also uses), and the SPIR-V checked with
//! `spirv-val` from SPIRV-Tools. This is the evidence for Metal and DX12 on a machine with neither.
//! `spirv-val` missing is reported; with `POSATTN_REQUIRE_SPIRV_VAL` set (CI) it is a failure.
//! Tint's verdict on the same variants is tests/dawn.rs.

use std::process::Command;

use posattn::kernel::export::{self, Lang, Module};

fn spirv_val() -> Option<&'static str> {
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

#[test]
fn every_variant_translates_for_every_backend() {
    let val = spirv_val();
    let dir = std::env::temp_dir().join(format!("posattn-spv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = export::all_variants();
    let mut validated = 0;
    for key in &keys {
        let module = Module::new(*key).unwrap_or_else(|e| panic!("{e}"));
        let mut spv = Vec::new();
        for lang in [Lang::Spv, Lang::Msl, Lang::Hlsl, Lang::Glsl] {
            let out = module.emit(lang).unwrap_or_else(|e| panic!("{e}"));
            if lang == Lang::Spv {
                spv = out;
            }
        }
        if let Some(val) = val {
            let name = key.name();
            let path = dir.join(export::file_name(key, Lang::Spv));
            std::fs::write(&path, spv).unwrap();
            let out = Command::new(val)
                .args(["--target-env", "vulkan1.1"])
                .arg(&path)
                .output()
                .expect("run spirv-val");
            assert!(
                out.status.success(),
                "{name}: spirv-val: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            validated += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{} variants translated to SPIR-V, MSL, HLSL and GLSL ES 3.10; {validated} SPIR-V modules passed spirv-val",
        keys.len()
    );
}
