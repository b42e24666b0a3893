//! A stored tuning reaches the context: with POSATTN_TUNE_FILE naming a file that holds an entry
//! for the adapter, `Context` takes its rows, lanes and decode lanes for that head size and the
//! heuristic for the others; an entry for another crate version is ignored. No kernel is compiled. (One test in its own
//! binary, since it sets an environment variable.)

use std::collections::BTreeMap;

use posattn::tune::{TuneEntry, TuneFile, TuneKey};
use posattn::{Context, ContextOptions};

#[test]
fn stored_rows_reach_the_context_for_their_adapter_only() {
    let dir = std::env::temp_dir().join(format!("posattn-tune-test-{}", std::process::id()));
    let path = dir.join("tune.json");
    // SAFETY: this binary's only test; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("POSATTN_TUNE_FILE", &path) };
    let Some(adapter) = posattn::enumerate_adapters(&ContextOptions::default())
        .into_iter()
        .next()
    else {
        println!("no adapter: the tuning test did not run");
        return;
    };
    let info = adapter.get_info();
    let heuristic = Context::from_adapter(&adapter).unwrap();
    assert_eq!(heuristic.rows_source(64), "heuristic");
    // A rows count the heuristic does not pick at head_dim 64 on this adapter.
    let pick = if heuristic.rows_per_invocation(64) == 2 {
        4
    } else {
        2
    };
    let mut other_version = TuneKey::of(&info);
    other_version.crate_version = "0.0.0-other".into();
    let mut file = TuneFile {
        format: posattn::tune::TUNE_FORMAT,
        entries: Vec::new(),
    };
    for (key, rows) in [(TuneKey::of(&info), pick), (other_version.clone(), 1)] {
        file.upsert(TuneEntry {
            key,
            rows: BTreeMap::from([(64, rows)]),
            lanes: BTreeMap::from([(64, 2)]),
            q_shared: BTreeMap::from([(64, true)]),
            measured: BTreeMap::from([(64, vec![(rows, 2, true, 1.0)])]),
            shape: (8, 512),
            decode_lanes: BTreeMap::from([(128, 16)]),
            decode_keys: BTreeMap::from([(128, 4)]),
            decode_measured: BTreeMap::from([(128, vec![(16, 4, 1.0)])]),
            decode_shape: (32, 8, 1, 2048),
        });
    }
    file.write(&path).unwrap();
    let tuned = Context::from_adapter(&adapter).unwrap();
    assert_eq!(tuned.rows_per_invocation(64), pick);
    assert_eq!(tuned.rows_source(64), "tuned");
    assert_eq!(tuned.row_lanes(64), 2);
    assert_eq!(tuned.row_lanes(128), heuristic.row_lanes(128));
    assert_eq!(
        tuned.rows_per_invocation(128),
        heuristic.rows_per_invocation(128)
    );
    assert_eq!(tuned.rows_source(128), "heuristic");
    // The queries' placement: tuned at 64 (workgroup memory), registers elsewhere; the key a
    // plan at 64 builds keeps them there; an override above both.
    assert!(!heuristic.q_in_workgroup(64));
    assert!(tuned.q_in_workgroup(64));
    assert_eq!(tuned.q_in_workgroup_source(64), "tuned");
    assert!(!tuned.q_in_workgroup(128));
    assert_eq!(tuned.q_in_workgroup_source(128), "heuristic");
    let spec = posattn::AttentionSpec::default()
        .with_seq_len(16)
        .with_heads(2);
    let key = posattn::kernel::KernelKey::fused(64, 1, posattn::kernel::PosKind::None);
    let key = tuned.fused_variant(key, &spec);
    assert!(key.q_shared, "{}", key.name());
    let mut forced = Context::from_adapter(&adapter).unwrap();
    forced.set_q_in_workgroup(Some(false));
    assert!(!forced.q_in_workgroup(64));
    assert_eq!(forced.q_in_workgroup_source(64), "override");
    // The decode lanes: tuned at 128, the adapter rule elsewhere, an override above both.
    assert_eq!(heuristic.decode_lanes(128), None);
    assert_eq!(tuned.decode_lanes(128), Some(16));
    assert_eq!(tuned.decode_lanes_source(128), "tuned");
    assert_eq!(tuned.decode_lanes(64), None);
    assert_eq!(tuned.decode_lanes_source(64), "heuristic");
    let mut forced = Context::from_adapter(&adapter).unwrap();
    forced.set_decode_lanes(Some(4)).unwrap();
    assert_eq!(forced.decode_lanes(128), Some(4));
    assert_eq!(forced.decode_lanes_source(128), "override");
    assert_eq!(
        forced.set_decode_lanes(Some(32)).unwrap_err().field(),
        Some("decode_lanes")
    );
    // The decode keys per step: tuned at 128, 1 elsewhere, an override above both, and the
    // plan built from the tuned context takes them.
    assert_eq!(heuristic.decode_keys_per_step(128), 1);
    assert_eq!(tuned.decode_keys_per_step(128), 4);
    assert_eq!(tuned.decode_keys_per_step_source(128), "tuned");
    assert_eq!(tuned.decode_keys_per_step(64), 1);
    assert_eq!(tuned.decode_keys_per_step_source(64), "heuristic");
    let plan =
        posattn::DecodePlan::new(&tuned, &posattn::harness::decode::bench_spec(1, 64)).unwrap();
    assert_eq!(plan.kernel().keys_per_step, 4, "{}", plan.kernel().name());
    forced.set_decode_keys_per_step(Some(2)).unwrap();
    assert_eq!(forced.decode_keys_per_step(128), 2);
    assert_eq!(forced.decode_keys_per_step_source(128), "override");
    assert_eq!(
        forced
            .set_decode_keys_per_step(Some(3))
            .unwrap_err()
            .field(),
        Some("decode_keys_per_step")
    );
    // Only the other version's entry: the heuristic again.
    file.entries.retain(|e| e.key == other_version);
    file.write(&path).unwrap();
    let other = Context::from_adapter(&adapter).unwrap();
    assert_eq!(other.rows_source(64), "heuristic");
    std::fs::remove_dir_all(&dir).unwrap();
}
