//! "Does my browser compute attention correctly?": the quick conformance matrix (the cases of
//! `posattn check --quick`) run on the visitor's own GPU through the browser's WebGPU, each
//! case with a NaN-poisoned output checked against the f64 CPU reference with the conformance
//! tolerance rule, shown as a pass/fail table with errors and timings. Built for wasm32 with
//! wasm-bindgen (`--target web`, no bundler) and loaded by `index.html` beside it; see the
//! README's Browser section for the commands. `?filter=KEY=VALUE,...` (the keys of
//! `posattn check --filter`) runs a selection; `?rows=N` forces the query rows per invocation
//! (one of 1, 2, 4, 8; by default the adapter's choice).
//!
//! The page never passes silently: no WebGPU adapter, a filter matching no case, and a case
//! with no result are errors shown on the page (`data-state="error"` on `<body>`), and a NaN
//! reference where the case planted none fails that case.
//!
//! On anything but wasm32 this example is empty.
#![cfg(target_arch = "wasm32")]

use posattn::Context;
use posattn::harness::check::{self, CaseResult, Selection, Status};
use wasm_bindgen::prelude::*;
use web_sys::{Document, Element, HtmlElement};

fn document() -> Result<Document, JsValue> {
    web_sys::window()
        .and_then(|w| w.document())
        .ok_or_else(|| JsValue::from_str("no document"))
}

fn by_id(doc: &Document, id: &str) -> Result<Element, JsValue> {
    doc.get_element_by_id(id)
        .ok_or_else(|| JsValue::from_str(&format!("the page has no #{id}")))
}

fn now_ms() -> f64 {
    web_sys::window()
        .and_then(|w| w.performance())
        .map_or(0.0, |p| p.now())
}

/// Sets the page's verdict: `data-state` (running, done, error) and the counts, which the
/// headless test reads, and the status line a visitor reads.
fn verdict(
    doc: &Document,
    state: &str,
    line: &str,
    counts: &[(&str, usize)],
) -> Result<(), JsValue> {
    let body: HtmlElement = doc.body().ok_or_else(|| JsValue::from_str("no body"))?;
    let data = body.dataset();
    for (k, v) in counts {
        data.set(k, &v.to_string())?;
    }
    data.set("state", state)?;
    let status = by_id(doc, "status")?;
    status.set_text_content(Some(line));
    status.set_class_name(state);
    Ok(())
}

fn fmt_err(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else {
        format!("{x:.2e}")
    }
}

fn add_row(doc: &Document, body: &Element, r: &CaseResult) -> Result<(), JsValue> {
    let tr = doc.create_element("tr")?;
    let (class, result, detail) = match &r.status {
        Status::Pass => ("pass", "pass", String::new()),
        Status::Fail(why) => ("fail", "FAIL", why.clone()),
        Status::Unsupported(why) => ("unsupported", "unsupported", why.clone()),
    };
    tr.set_class_name(class);
    let ratio = if r.bound > 0.0 {
        format!("{:.3}", r.err_gpu / r.bound)
    } else {
        "–".into()
    };
    let cells = [
        r.name.clone(),
        result.to_string(),
        fmt_err(r.err_gpu),
        fmt_err(r.bound),
        ratio,
        format!("{:.0}", r.time.as_secs_f64() * 1e3),
        detail,
    ];
    for (i, text) in cells.iter().enumerate() {
        let td = doc.create_element("td")?;
        td.set_text_content(Some(text));
        if (2..=5).contains(&i) {
            td.set_class_name("num");
        }
        tr.append_child(&td)?;
    }
    body.append_child(&tr)?;
    Ok(())
}

/// Runs the matrix (or the selection `filter`, empty for all) and renders it. Errors that stop
/// the run are shown on the page and returned.
#[wasm_bindgen]
pub async fn run(filter: String, rows: String) -> Result<(), JsValue> {
    let doc = document()?;
    let result = run_inner(&doc, filter.trim(), rows.trim()).await;
    if let Err(e) = &result {
        let msg = e.as_string().unwrap_or_else(|| format!("{e:?}"));
        verdict(&doc, "error", &format!("error: {msg}"), &[])?;
    }
    result
}

async fn run_inner(doc: &Document, filter: &str, rows: &str) -> Result<(), JsValue> {
    let err = |e: posattn::Error| JsValue::from_str(&e.to_string());
    verdict(doc, "running", "opening the WebGPU device…", &[])?;
    let mut ctx = Context::new_async().await.map_err(err)?;
    if !rows.is_empty() {
        let n = rows.parse::<u32>().map_err(|_| {
            JsValue::from_str(&format!(
                "invalid `rows`: expected 1, 2, 4 or 8, got {rows:?}"
            ))
        })?;
        ctx.set_rows_per_invocation(Some(n)).map_err(err)?;
    }
    let info = ctx.adapter_info();
    let name = if info.name.is_empty() {
        "unnamed WebGPU adapter"
    } else {
        info.name.as_str()
    };
    by_id(doc, "adapter")?.set_text_content(Some(&format!(
        "{name} ({:?}, {:?}); f16 storage {:?} (shader-f16 {}); \
         {} query row(s) per invocation at head_dim 64",
        info.backend,
        info.device_type,
        ctx.half_form(),
        if ctx.has_native_f16() {
            "present"
        } else {
            "absent"
        },
        ctx.rows_per_invocation(64),
    )));
    let mut cases = check::quick_check_cases(&ctx);
    if !filter.is_empty() {
        let selection = Selection::parse(filter).map_err(err)?;
        cases.retain(|c| selection.matches(c));
        by_id(doc, "filter")?.set_text_content(Some(&format!("filter: {filter}")));
    }
    // Zero cases would show an empty, green table.
    if cases.is_empty() {
        return Err(JsValue::from_str(&format!(
            "the filter {filter:?} matches none of the quick matrix's cases"
        )));
    }
    let tbody = by_id(doc, "results")?;
    let (mut passed, mut failed, mut unsupported) = (0, 0, 0);
    let start = now_ms();
    for (i, case) in cases.iter().enumerate() {
        let line = format!("running {}/{}: {}", i + 1, cases.len(), case.name);
        verdict(doc, "running", &line, &[])?;
        let r = check::run_case_async(&ctx, case).await;
        match r.status {
            Status::Pass => passed += 1,
            Status::Fail(_) => failed += 1,
            Status::Unsupported(_) => unsupported += 1,
        }
        add_row(doc, &tbody, &r)?;
    }
    let uncaptured = ctx.take_uncaptured_errors();
    for e in &uncaptured {
        failed += 1;
        let r = CaseResult {
            name: "uncaptured WebGPU error".into(),
            status: Status::Fail(e.clone()),
            err_gpu: f64::NAN,
            err_f32: f64::NAN,
            bound: f64::NAN,
            time: std::time::Duration::ZERO,
        };
        add_row(doc, &tbody, &r)?;
    }
    let secs = (now_ms() - start) / 1e3;
    let ok = failed == 0 && passed + unsupported == cases.len();
    let line = format!(
        "{}: {passed} passed, {failed} failed, {unsupported} unsupported of {} cases in {secs:.1} s",
        if ok { "correct" } else { "WRONG" },
        cases.len()
    );
    let counts = [
        ("cases", cases.len()),
        ("passed", passed),
        ("failed", failed),
        ("unsupported", unsupported),
    ];
    verdict(doc, if ok { "done" } else { "failed" }, &line, &counts)
}
