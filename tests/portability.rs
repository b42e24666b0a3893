//! Every kernel variant the crate can build, translated by naga to SPIR-V, MSL, HLSL and GLSL
//! (the languages wgpu hands to Vulkan, Metal, DX12 and GL drivers), and the SPIR-V checked with
//! `spirv-val` from SPIRV-Tools. This is the evidence for Metal and DX12 on a machine with neither.
//! `spirv-val` missing is reported; with `POSATTN_REQUIRE_SPIRV_VAL` set (CI) it is a failure.

use std::process::Command;

use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use posattn::kernel::KernelKey;

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
    let keys: Vec<KernelKey> = KernelKey::all_fused()
        .into_iter()
        .chain(KernelKey::all_unfused())
        .collect();
    let mut validated = 0;
    for key in &keys {
        let name = key.name();
        let src = key.wgsl();
        let module = naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| panic!("{name}: {e}"));
        let info = Validator::new(ValidationFlags::all(), Capabilities::empty())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}: {e}"));

        let words = spv::write_vec(&module, &info, &spv::Options::default(), None)
            .unwrap_or_else(|e| panic!("{name}: SPIR-V: {e}"));
        msl::write_string(
            &module,
            &info,
            &msl::Options::default(),
            &msl::PipelineOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{name}: MSL: {e}"));
        let mut hlsl_out = String::new();
        let hlsl_opts = hlsl::Options::default();
        let hlsl_pipe = hlsl::PipelineOptions::default();
        hlsl::Writer::new(&mut hlsl_out, &hlsl_opts, &hlsl_pipe)
            .write(&module, &info, None)
            .unwrap_or_else(|e| panic!("{name}: HLSL: {e}"));
        let mut glsl_out = String::new();
        let glsl_opts = glsl::Options {
            version: glsl::Version::new_gles(310),
            ..glsl::Options::default()
        };
        let glsl_pipe = glsl::PipelineOptions {
            shader_stage: naga::ShaderStage::Compute,
            entry_point: key.entry_point().to_string(),
            multiview: None,
        };
        glsl::Writer::new(
            &mut glsl_out,
            &module,
            &info,
            &glsl_opts,
            &glsl_pipe,
            naga::proc::BoundsCheckPolicies::default(),
        )
        .and_then(|mut w| w.write())
        .unwrap_or_else(|e| panic!("{name}: GLSL: {e}"));

        if let Some(val) = val {
            let path = dir.join(format!("{name}.spv"));
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            std::fs::write(&path, bytes).unwrap();
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
