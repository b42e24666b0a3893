//! `posattn shaders --out DIR [--lang …] [--filter …]` end to end: every variant written, one
//! file per variant named by its key, the WGSL exactly what wgpu compiles; a filtered set as
//! SPIR-V modules (tests/portability.rs translates every variant); bad arguments are errors with
//! exit code 2. Needs no adapter.

use posattn::kernel::export::{self, Lang};

use crate::common::posattn;

fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn shaders_writes_every_variant() {
    let keys = export::all_variants();
    // Distinct keys, distinct names: one file per variant, none overwritten.
    let mut names: Vec<String> = keys.iter().map(|k| k.name()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), keys.len(), "two variants share a name");

    let root = std::env::temp_dir().join(format!("posattn-shaders-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);

    let wgsl = root.join("wgsl");
    let (code, text) = posattn(&["shaders", "--out", wgsl.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!("{} variants written", keys.len())),
        "{text}"
    );
    let mut want: Vec<String> = keys
        .iter()
        .map(|k| export::file_name(k, Lang::Wgsl))
        .collect();
    want.sort();
    assert_eq!(files_in(&wgsl), want);
    for k in &keys {
        let got = std::fs::read_to_string(wgsl.join(export::file_name(k, Lang::Wgsl))).unwrap();
        assert_eq!(got, k.wgsl(), "{}", k.name());
    }

    // SPIR-V of the variants matching a filter, on two threads: the head-size-64 decode kernels
    // and one unfused stage.
    let spv = root.join("spv");
    let patterns = [
        "decode_d64".to_string(),
        "unfused_rope_apply_d64".to_string(),
    ];
    let subset = export::matching(&keys, &patterns);
    assert!(subset.len() > 2 && subset.len() < keys.len() / 4);
    let (code, text) = posattn(&[
        "shaders",
        "--out",
        spv.to_str().unwrap(),
        "--lang",
        "spv",
        "--filter",
        &patterns.join(","),
        "--threads",
        "2",
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!("{} variants written", subset.len())),
        "{text}"
    );
    let mut want: Vec<String> = subset
        .iter()
        .map(|k| export::file_name(k, Lang::Spv))
        .collect();
    want.sort();
    assert_eq!(files_in(&spv), want);
    for k in &subset {
        let bytes = std::fs::read(spv.join(export::file_name(k, Lang::Spv))).unwrap();
        assert_eq!(bytes[..4], 0x0723_0203u32.to_le_bytes(), "{}", k.name());
        assert_eq!(bytes.len() % 4, 0, "{}", k.name());
    }
    // A filter that matches nothing, and no threads.
    for bad in [
        &["--filter", "no_such_variant"][..],
        &["--threads", "0"][..],
    ] {
        let mut args = vec!["shaders", "--out", spv.to_str().unwrap()];
        args.extend_from_slice(bad);
        let (code, text) = posattn(&args);
        assert_eq!(code, 2, "{text}");
        assert!(text.contains(bad[0]), "{text}");
    }

    // An unknown language, and a file where the directory should be.
    let (code, text) = posattn(&["shaders", "--out", spv.to_str().unwrap(), "--lang", "dxil"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("dxil"), "{text}");
    let file = spv.join(export::file_name(&subset[0], Lang::Spv));
    let (code, text) = posattn(&["shaders", "--out", file.to_str().unwrap()]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("error"), "{text}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Each language's translation of one variant carries the entry point under its own name.
#[test]
fn every_language_names_the_entry_point() {
    for key in [
        export::all_variants()[0],
        *export::all_variants().last().unwrap(),
    ] {
        let module = export::Module::new(key).unwrap();
        for lang in Lang::ALL {
            let bytes = module.emit(lang).unwrap();
            if lang == Lang::Spv {
                continue;
            }
            let text = String::from_utf8(bytes).unwrap();
            let entry = if lang == Lang::Glsl {
                "void main()"
            } else {
                key.entry_point()
            };
            assert!(text.contains(entry), "{} {lang:?}", key.name());
        }
    }
}
