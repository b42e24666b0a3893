//! Figures of what each position scheme does, as PNGs: the logit against relative distance
//! (RoPE and its scalings, ALiBi, xPos, T5, KERPLE, Sandwich, FIRE) and one head's attention
//! weights over a long sequence with and without each extrapolation method. The curves come
//! from the crate's f64 reference (`posattn::plot`); no adapter is needed.
//!
//! Run: `cargo run --release --example plot -- [OUT_DIR] [SCHEME ...]` (default: target/plots,
//! every scheme). The same figure, one scheme at a time: `posattn plot --scheme yarn --out f.png`.

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "target/plots".into()));
    let mut schemes: Vec<String> = args.collect();
    if schemes.is_empty() {
        schemes = posattn::plot::SCHEMES
            .iter()
            .map(|s| s.to_string())
            .collect();
    }
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("plot: cannot create {}: {e}", dir.display());
        std::process::exit(1);
    }
    for scheme in &schemes {
        let out = dir.join(format!("{scheme}.png"));
        let start = std::time::Instant::now();
        match posattn::plot::draw(scheme, &out) {
            Ok(()) => println!("{} ({:.1} s)", out.display(), start.elapsed().as_secs_f64()),
            Err(e) => {
                eprintln!("plot: {scheme}: {e}");
                std::process::exit(1);
            }
        }
    }
}
