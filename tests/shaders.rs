//! Every kernel variant the crate can build composes, parses and validates with naga (no device
//! needed), no loop marked for unrolling survives, and each variant's reflected interface (its
//! bindings and the uniform block's layout) is exactly the host's contract in
//! `posattn::kernel::abi`, from which the bind-group layouts are built. In the same pass (naga
//! parses each variant once), every listed variant is translated to SPIR-V, MSL, HLSL and GLSL
//! and its SPIR-V checked by `spirv-val` (tests/portability.rs says why).

use posattn::kernel::KernelKey;
use posattn::kernel::abi::{Access, Params};
use posattn::kernel::export::{self, Lang, Module};
use posattn::kernel::source::UNROLL_MARK;

fn all_keys() -> Vec<KernelKey> {
    posattn::kernel::export::all_variants()
}

#[test]
fn every_variant_is_listed_once_under_its_own_name() {
    let mut keys = all_keys();
    keys.extend(KernelKey::subgroup_examples());
    let names: std::collections::HashSet<String> = keys.iter().map(|k| k.name()).collect();
    assert_eq!(
        names.len(),
        keys.len(),
        "a variant is listed twice or two share a name"
    );
}

/// `key` composed, parsed and validated, with no marked loop left.
fn validate(key: &KernelKey) -> Module {
    key.try_wgsl()
        .unwrap_or_else(|e| panic!("{}: {e}", key.name()));
    let module = Module::new(*key).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !module.source().lines().any(|l| l.trim() == UNROLL_MARK),
        "{}: a marked loop survived composition",
        key.name()
    );
    module
}

/// `module` in every language wgpu hands to a driver, its SPIR-V checked by `val`.
fn translate(module: &Module, val: Option<&str>, dir: &std::path::Path) {
    let key = module.key();
    let mut spv = Vec::new();
    for lang in [Lang::Spv, Lang::Msl, Lang::Hlsl, Lang::Glsl] {
        let out = module.emit(lang).unwrap_or_else(|e| panic!("{e}"));
        if lang == Lang::Spv {
            spv = out;
        }
    }
    if let Some(val) = val {
        let path = dir.join(export::file_name(&key, Lang::Spv));
        std::fs::write(&path, spv).unwrap();
        let (passed, text) = crate::portability::run_spirv_val(val, &path, "vulkan1.1");
        assert!(passed, "{}: spirv-val: {text}", key.name());
    }
}

/// The WGSL spelling naga gives a type, for comparison with the contract's.
fn type_name(module: &naga::Module, ty: naga::Handle<naga::Type>) -> String {
    let t = &module.types[ty];
    if let Some(name) = &t.name {
        return name.clone();
    }
    let scalar = |s: naga::Scalar| match (s.kind, s.width) {
        (naga::ScalarKind::Float, 4) => "f32".to_string(),
        (naga::ScalarKind::Float, 2) => "f16".to_string(),
        (naga::ScalarKind::Sint, 4) => "i32".to_string(),
        (naga::ScalarKind::Uint, 4) => "u32".to_string(),
        other => format!("{other:?}"),
    };
    match &t.inner {
        naga::TypeInner::Scalar(s) => scalar(*s),
        naga::TypeInner::Vector { size, scalar: s } => {
            format!("vec{}<{}>", *size as u8, scalar(*s))
        }
        naga::TypeInner::Array {
            base,
            size: naga::ArraySize::Dynamic,
            ..
        } => format!("array<{}>", type_name(module, *base)),
        other => format!("{other:?}"),
    }
}

#[test]
fn every_variant_validates_matches_the_contract_and_translates() {
    let listed = all_keys();
    let mut keys = listed.clone();
    keys.extend(KernelKey::native_f16_examples());
    keys.extend(KernelKey::subgroup_examples());
    assert!(!keys.is_empty());
    let val = crate::portability::spirv_val();
    let dir = std::env::temp_dir().join(format!("posattn-spv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Two threads, variants strided between them (the large head sizes sit together).
    std::thread::scope(|scope| {
        for t in 0..2 {
            let (keys, listed, dir) = (&keys, &listed, &dir);
            scope.spawn(move || {
                for key in keys.iter().skip(t).step_by(2) {
                    let module = validate(key);
                    check_contract(key, module.naga());
                    if listed.contains(key) {
                        translate(&module, val, dir);
                    }
                }
            });
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{} kernel variants validated with naga; bindings and Params match the host; {} \
         translated to SPIR-V, MSL, HLSL and GLSL ES 3.10{}",
        keys.len(),
        listed.len(),
        if val.is_some() {
            ", their SPIR-V passing spirv-val"
        } else {
            ""
        }
    );
}

/// The reflected bindings and uniform block of `key`'s module against the host's contract.
fn check_contract(key: &KernelKey, module: &naga::Module) {
    // Bindings: number, name, address space, access and type.
    let mut got: Vec<(u32, String, Access, String)> = module
        .global_variables
        .iter()
        .filter_map(|(_, g)| {
            let b = g.binding.as_ref()?;
            assert_eq!(b.group, 0, "{}: group", key.name());
            let access = match g.space {
                naga::AddressSpace::Uniform if type_name(module, g.ty) == "DecodeParams" => {
                    Access::DecodeUniform
                }
                naga::AddressSpace::Uniform => Access::Uniform,
                naga::AddressSpace::Storage { access } => {
                    if access.contains(naga::StorageAccess::STORE) {
                        Access::ReadWrite
                    } else {
                        Access::Read
                    }
                }
                other => panic!("{}: binding in {other:?}", key.name()),
            };
            Some((
                b.binding,
                g.name.clone().unwrap_or_default(),
                access,
                type_name(module, g.ty),
            ))
        })
        .collect();
    got.sort_by_key(|b| b.0);
    let want: Vec<(u32, String, Access, String)> = key
        .bindings()
        .iter()
        .enumerate()
        .map(|(i, b)| (i as u32, b.name.to_string(), b.access, b.ty.to_string()))
        .collect();
    assert_eq!(got, want, "{}: bindings", key.name());

    // The uniform block: size, member names, offsets and types.
    let (_, ty) = module
        .types
        .iter()
        .find(|(_, t)| t.name.as_deref() == Some("Params"))
        .expect("struct Params");
    let naga::TypeInner::Struct { members, span } = &ty.inner else {
        panic!("Params is not a struct")
    };
    assert_eq!(
        *span as usize,
        std::mem::size_of::<Params>(),
        "{}: Params size",
        key.name()
    );
    let got: Vec<(String, String, usize)> = members
        .iter()
        .map(|m| {
            (
                m.name.clone().unwrap_or_default(),
                type_name(module, m.ty),
                m.offset as usize,
            )
        })
        .collect();
    let want: Vec<(String, String, usize)> = Params::FIELDS
        .iter()
        .map(|(n, t, o)| (n.to_string(), t.to_string(), *o))
        .collect();
    assert_eq!(got, want, "{}: Params members", key.name());
}
