//! Strict JSON reading for the run spec and model configs: serde derive does the work, and every
//! error is turned into an [`Error::InvalidAt`] naming the path from the document's root
//! (`position.theta`, `rope_parameters.factor`). Unknown keys, wrong types, missing required
//! keys and duplicate keys are all errors there.

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Deepest nesting accepted (serde_json's own limit is 128; a spec or config needs 4).
pub const MAX_DEPTH: usize = 32;

/// Deserializes `T` from `text`; `root` prefixes every path (empty for a document's root).
/// `doc` names the document in errors about the whole of it (`spec`, `config`).
pub fn from_str<T: DeserializeOwned>(doc: &str, root: &str, text: &str) -> Result<T> {
    check_depth(doc, root, text)?;
    // serde's derived structs also accept a list of the fields' values in order; a spec or
    // config object is only ever written as an object.
    let start = text.trim_start();
    if !start.starts_with('{') {
        return Err(at(
            doc,
            root,
            match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Ok(_) => format!("expected a JSON object, got {}", kind_of(start)),
                Err(e) => format!("expected valid JSON, got {}", strip_position(&e)),
            },
        ));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // serde_json reports a number or list where a name belongs as a syntax error
        // ("expected value") although the text is valid JSON: say what it is.
        let valid = serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
        let syntax = matches!(
            e.inner().classify(),
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof
        );
        if valid && syntax {
            let rel = clean_path(&e.path().to_string());
            at(
                doc,
                &join(root, &rel),
                "expected one of this key's names (a string), got another type".into(),
            )
        } else {
            convert(doc, root, e)
        }
    })?;
    de.end().map_err(|e| at(doc, root, strip_position(&e)))?;
    Ok(value)
}

/// Deserializes `T` from an already parsed value.
pub fn from_value<T: DeserializeOwned>(
    doc: &str,
    root: &str,
    value: &serde_json::Value,
) -> Result<T> {
    if !value.is_object() {
        let text = value.to_string();
        return Err(at(
            doc,
            root,
            format!("expected a JSON object, got {}", kind_of(&text)),
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| convert(doc, root, e))
}

/// What a JSON text that is not an object is, by its first character.
fn kind_of(text: &str) -> &'static str {
    match text.bytes().next() {
        Some(b'[') => "a list",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        Some(_) => "a number",
        None => "nothing",
    }
}

fn at(doc: &str, path: &str, message: String) -> Error {
    Error::InvalidAt {
        path: if path.is_empty() { doc } else { path }.into(),
        message,
    }
}

/// Joins a root path and a relative one.
pub fn join(root: &str, rel: &str) -> String {
    match (root.is_empty(), rel.is_empty() || rel == ".") {
        (_, true) => root.into(),
        (true, false) => rel.into(),
        (false, false) if rel.starts_with('[') => format!("{root}{rel}"),
        (false, false) => format!("{root}.{rel}"),
    }
}

/// The error's text without serde_json's "at line L column C", which says where in the text
/// the path already names.
fn strip_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if e.line() == 0 {
        return text;
    }
    let msg = match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    };
    format!("{msg} (line {}, column {})", e.line(), e.column())
}

/// serde_path_to_error writes "." for the root and "?" where it could not tell the key.
fn clean_path(path: &str) -> String {
    path.split('.')
        .filter(|seg| !seg.is_empty() && *seg != "?")
        .collect::<Vec<_>>()
        .join(".")
}

fn convert(doc: &str, root: &str, e: serde_path_to_error::Error<serde_json::Error>) -> Error {
    let rel = clean_path(&e.path().to_string());
    let inner = e.into_inner();
    let msg = strip_position(&inner);
    let path = join(root, &rel);
    // Not JSON (or cut short, or a number beyond f64): the line and column say where.
    if matches!(
        inner.classify(),
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof
    ) {
        return at(doc, &path, format!("expected valid JSON, got {msg}"));
    }
    // "unknown field `x`", "missing field `x`" and "duplicate field `x`" name a key below the
    // path serde reports; the path then ends with that key.
    for prefix in ["unknown field `", "missing field `", "duplicate field `"] {
        if let Some(rest) = msg.strip_prefix(prefix)
            && let Some(end) = rest.find('`')
        {
            let key = &rest[..end];
            // serde_path_to_error's path may or may not end with the key already.
            let full = if key.is_empty() {
                join(&path, "\"\"")
            } else if path == key || path.ends_with(&format!(".{key}")) {
                path.clone()
            } else {
                join(&path, key)
            };
            let message = match prefix {
                "unknown field `" => match rest[end..].split_once(", expected ") {
                    Some((_, keys)) => format!("a key this object does not have (it has {keys})"),
                    None => "a key this object does not have (it has none)".into(),
                },
                "missing field `" => "a required key, missing".into(),
                _ => "a key given twice".into(),
            };
            return at(doc, &full, message);
        }
    }
    at(doc, &path, msg)
}

/// Rejects nesting deeper than [`MAX_DEPTH`] before parsing (counting brackets outside strings),
/// so that the error names the limit rather than the parser's recursion.
fn check_depth(doc: &str, root: &str, text: &str) -> Result<()> {
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for b in text.bytes() {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(at(
                        doc,
                        root,
                        format!("JSON nested at most {MAX_DEPTH} deep, got deeper nesting"),
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}
