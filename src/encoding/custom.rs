//! A caller's own position scheme, fused into the kernel: a few WGSL functions (the *snippet*)
//! composed into the attention kernel as its own variant, with a Rust twin of each that the CPU
//! reference runs.
//!
//! # The hooks
//! A snippet defines at least one of these, with exactly these signatures:
//!
//! ```text
//! fn score_mod(score: f32, q_pos: i32, k_pos: i32, head: u32, q_index: u32, k_index: u32) -> f32
//! fn mask_mod(q_pos: i32, k_pos: i32, head: u32, q_index: u32, k_index: u32) -> bool
//! fn tile_mask(q_first: u32, q_last: u32, k_first: u32, k_last: u32, head: u32) -> u32
//! fn rotate_mod(x: vec2<f32>, pair: u32, pos: i32, is_query: bool) -> vec2<f32>
//! ```
//!
//! - `score_mod` gets the softmax-scaled logit in natural-log units (after the softcap) and
//!   returns the new one, as FlexAttention's `score_mod`; positions are the token positions,
//!   `q_index` is the query's row in this call's queries and `k_index` the key's index (as
//!   FlexAttention's `q_idx` and `kv_idx`), `head` the query head. The built-in masks align the
//!   two bottom-right (row i sits at key index i + seq_k − seq_q); when seq_q ≠ seq_k, as in
//!   decoding one query against a cache, the positions are the coordinates that mean the same
//!   in every call.
//! - `mask_mod` returns whether the key is visible; it narrows the built-in masks (causal,
//!   window, sinks), never widens them.
//! - `tile_mask` makes a mask block-sparse (FlexAttention's `BlockMask`): for the query rows
//!   `q_first..=q_last` and keys `k_first..=k_last` of one tile it returns `TILE_HIDDEN` (no key
//!   of the tile is visible to any of the rows: the tile is never loaded), `TILE_FULL` (every key
//!   is visible to every row: `mask_mod` is not called) or `TILE_PARTIAL`. It must agree with
//!   `mask_mod`; the conformance check compares against the reference, which uses `mask_mod`
//!   alone, so a tile hidden wrongly shows as a mismatch.
//! - `rotate_mod` replaces RoPE's pair rotation: channel pair `pair` of a query
//!   (`is_query`) or key at `pos`, in the half (`i, i + d/2`) or interleaved (`2i, 2i + 1`)
//!   layout; it runs once per token and pair when the tile is staged, where RoPE rotates.
//!
//! # Tables
//! A snippet declares the read-only tables it reads, one comment line each:
//!
//! ```text
//! // @table slopes: heads          (at least num_heads floats)
//! // @table buckets: heads * 33    (at least 33 · num_heads)
//! // @table weights: 16            (at least 16)
//! ```
//!
//! and reads them through a generated accessor of the same name, `slopes(i: u32) -> f32`, whose
//! index is clamped to the table's length: a read can never leave the table. A declared table
//! that is not given, one that is shorter than declared, and a table given but not declared are
//! errors naming `position.tables.NAME`.
//!
//! # What a snippet can and cannot do
//! The snippet is first parsed and validated alone with naga, next to nothing but its table
//! accessors and the `TILE_*` codes, so any name it uses that is not its own, an accessor's or
//! WGSL's is an error at the user's line: it cannot name the kernel's bindings (`q_buf`, `aux`,
//! `params`, ...), functions or workgroup memory. It may not declare module-scope variables
//! (no bindings, no private or workgroup memory), entry points, overrides or directives
//! (`enable`, `requires`, `diagnostic`), and its module-scope names may not be any of the
//! kernel's (nor start with `pa_`, the prefix of the generated glue). Then the composed variant
//! is validated with naga before any pipeline is made; an error inside the snippet is reported
//! at the snippet's line. What naga cannot rule out: a snippet may loop for a long time (the
//! context's timeout then ends the wait), and may produce NaN or infinities, which the kernel
//! propagates like any score and the conformance check (`harness::check`) reports.
//!
//! # In a kernel
//! The hooks are module-scope functions, not code of one kernel: the composer
//! (`kernel::source::compose`) appends the glue to every family's module, so any kernel may
//! call them. A custom scheme's variant gets `CUSTOM_SCORE`, `CUSTOM_MASK`, `CUSTOM_TILES` and
//! `CUSTOM_ROTATE` set by the hooks it defines, its table accessors and wrappers that call the
//! snippet; every other variant gets the constants `false` and identity wrappers, which the
//! drivers fold away. A kernel uses them in its score step:
//!
//! ```text
//! if (CUSTOM_SCORE) { s = pa_score4(s, q_pos, k_pos4, head, q_index, k_index4); } // s in base 2
//! if (CUSTOM_MASK)  { visible = visible & pa_mask4(q_pos, k_pos4, head, q_index, k_index4); }
//! let t = pa_tile(q_first, q_last, k_first, k_last, head); // TILE_HIDDEN: skip the tile
//! ```
//!
//! and `rope_rotate` (shaders/position.wgsl) calls `pa_rotate` when `CUSTOM_ROTATE`.
//! `pa_score4` takes and returns the kernel's base-2 logits and converts for the snippet.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};

use crate::encoding::position::RopeLayout;
use crate::error::{Error, Result};

/// The caller's tables by name.
pub type Tables = BTreeMap<String, Vec<f32>>;

/// What the score twin gets: the same arguments as the WGSL `score_mod`, in f64.
#[derive(Clone, Copy, Debug)]
pub struct ScoreArgs<'a> {
    /// Scaled logit in natural-log units.
    pub score: f64,
    /// Query position.
    pub q_pos: i64,
    /// Key position.
    pub k_pos: i64,
    /// Query head.
    pub head: u32,
    /// Row among this call's queries.
    pub q_index: u32,
    /// Index of the key.
    pub k_index: u32,
    /// The scheme's tables.
    pub tables: &'a Tables,
}

/// What the mask twin gets.
#[derive(Clone, Copy, Debug)]
pub struct MaskArgs<'a> {
    /// Query position.
    pub q_pos: i64,
    /// Key position.
    pub k_pos: i64,
    /// Query head.
    pub head: u32,
    /// Row among this call's queries.
    pub q_index: u32,
    /// Index of the key.
    pub k_index: u32,
    /// The scheme's tables.
    pub tables: &'a Tables,
}

/// What the rotation twin gets.
#[derive(Clone, Copy, Debug)]
pub struct RotateArgs<'a> {
    /// The pair's two channels before rotation.
    pub x: [f64; 2],
    /// Index of the rotation pair.
    pub pair: u32,
    /// Position of the token.
    pub pos: i64,
    /// Whether the row is a query (else a key).
    pub is_query: bool,
    /// The scheme's tables.
    pub tables: &'a Tables,
}

impl<'a> ScoreArgs<'a> {
    /// Table `name` (empty if there is none).
    pub fn table(&self, name: &str) -> &'a [f32] {
        table(self.tables, name)
    }
}
impl<'a> MaskArgs<'a> {
    /// Table `name` (empty if there is none).
    pub fn table(&self, name: &str) -> &'a [f32] {
        table(self.tables, name)
    }
}
impl<'a> RotateArgs<'a> {
    /// Table `name` (empty if there is none).
    pub fn table(&self, name: &str) -> &'a [f32] {
        table(self.tables, name)
    }
}

fn table<'a>(tables: &'a Tables, name: &str) -> &'a [f32] {
    tables.get(name).map_or(&[], |t| t.as_slice())
}

/// The Rust twin of `score_mod`: the new logit.
pub type ScoreTwin = Arc<dyn Fn(&ScoreArgs) -> f64 + Send + Sync>;
/// The Rust twin of `mask_mod`: whether the key is visible.
pub type MaskTwin = Arc<dyn Fn(&MaskArgs) -> bool + Send + Sync>;
/// The Rust twin of `rotate_mod`: the pair after rotation.
pub type RotateTwin = Arc<dyn Fn(&RotateArgs) -> [f64; 2] + Send + Sync>;

/// A caller's position scheme: the WGSL snippet, its tables and the Rust twins the CPU
/// reference runs (see the [module docs](self)).
#[derive(Clone)]
pub struct CustomScheme {
    /// The WGSL snippet.
    pub wgsl: String,
    /// The tables the snippet declares with `// @table`.
    pub tables: Tables,
    /// Channel pairs `rotate_mod` sees.
    pub layout: RopeLayout,
    /// The twin of `score_mod`, run by the reference.
    pub score_twin: Option<ScoreTwin>,
    /// The twin of `mask_mod`, run by the reference.
    pub mask_twin: Option<MaskTwin>,
    /// The twin of `rotate_mod`, run by the reference.
    pub rotate_twin: Option<RotateTwin>,
}

impl std::fmt::Debug for CustomScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomScheme")
            .field("wgsl", &format_args!("{} lines", self.wgsl.lines().count()))
            .field("tables", &self.tables.keys().collect::<Vec<_>>())
            .field("layout", &self.layout)
            .field("score_twin", &self.score_twin.is_some())
            .field("mask_twin", &self.mask_twin.is_some())
            .field("rotate_twin", &self.rotate_twin.is_some())
            .finish()
    }
}

impl PartialEq for CustomScheme {
    /// Same snippet, tables and layout, and the very same twins.
    fn eq(&self, other: &Self) -> bool {
        fn same<T: ?Sized>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
        }
        self.wgsl == other.wgsl
            && self.tables == other.tables
            && self.layout == other.layout
            && same(&self.score_twin, &other.score_twin)
            && same(&self.mask_twin, &other.mask_twin)
            && same(&self.rotate_twin, &other.rotate_twin)
    }
}

impl CustomScheme {
    /// A scheme from its WGSL snippet, with no tables and no twins yet.
    pub fn new(wgsl: impl Into<String>) -> Self {
        CustomScheme {
            wgsl: wgsl.into(),
            tables: Tables::new(),
            layout: RopeLayout::Half,
            score_twin: None,
            mask_twin: None,
            rotate_twin: None,
        }
    }

    /// Adds the table `name` (declared in the snippet with `// @table name: size`).
    pub fn with_table(mut self, name: impl Into<String>, data: Vec<f32>) -> Self {
        self.tables.insert(name.into(), data);
        self
    }

    /// The channel layout rotation pairs follow (for `rotate_mod`).
    pub fn with_layout(mut self, layout: RopeLayout) -> Self {
        self.layout = layout;
        self
    }

    /// The Rust twin of `score_mod`.
    pub fn with_score(mut self, f: impl Fn(&ScoreArgs) -> f64 + Send + Sync + 'static) -> Self {
        self.score_twin = Some(Arc::new(f));
        self
    }

    /// The Rust twin of `mask_mod`.
    pub fn with_mask(mut self, f: impl Fn(&MaskArgs) -> bool + Send + Sync + 'static) -> Self {
        self.mask_twin = Some(Arc::new(f));
        self
    }

    /// The Rust twin of `rotate_mod`.
    pub fn with_rotate(
        mut self,
        f: impl Fn(&RotateArgs) -> [f64; 2] + Send + Sync + 'static,
    ) -> Self {
        self.rotate_twin = Some(Arc::new(f));
        self
    }

    /// Checks the snippet and its tables for `num_heads` heads: parses and validates it alone
    /// with naga, checks the hook signatures, the names it declares and the tables.
    pub fn check(&self, num_heads: u32) -> Result<CheckedScheme> {
        let decls = table_decls(&self.wgsl)?;
        for (name, data) in &self.tables {
            let Some(d) = decls.iter().find(|d| &d.name == name) else {
                return Err(scheme_err(
                    format!("position.tables.{name}"),
                    None,
                    "a table the snippet declares with `// @table NAME: LEN`; it declares none by this name",
                ));
            };
            let need = d.len.floats(num_heads);
            if (data.len() as u64) < need {
                return Err(scheme_err(
                    format!("position.tables.{name}"),
                    Some(d.line),
                    format!(
                        "at least {need} floats ({}), got {}",
                        d.len.describe(num_heads),
                        data.len()
                    ),
                ));
            }
            if let Some(bad) = data.iter().find(|x| !x.is_finite()) {
                return Err(scheme_err(
                    format!("position.tables.{name}"),
                    Some(d.line),
                    format!("finite floats, got {bad}"),
                ));
            }
        }
        if let Some(d) = decls.iter().find(|d| !self.tables.contains_key(&d.name)) {
            return Err(scheme_err(
                format!("position.tables.{}", d.name),
                Some(d.line),
                format!(
                    "a table of at least {} floats ({}) as the snippet declares; none given",
                    d.len.floats(num_heads),
                    d.len.describe(num_heads)
                ),
            ));
        }
        check_directives(&self.wgsl)?;
        let sandbox = format!("{}\n{}", self.wgsl, prelude(&decls, None));
        let lines = self.wgsl.lines().count() as u32;
        let module = parse_and_validate(
            &sandbox,
            1,
            lines,
            "position.wgsl",
            naga::valid::Capabilities::empty(),
        )?;
        if let Some(g) = module.global_variables.iter().next() {
            return Err(scheme_err(
                "position.wgsl",
                None,
                format!(
                    "no module-scope variables (a snippet gets no bindings, private or workgroup memory); it declares `{}`",
                    g.1.name.as_deref().unwrap_or("?")
                ),
            ));
        }
        if let Some(e) = module.entry_points.first() {
            return Err(scheme_err(
                "position.wgsl",
                None,
                format!("no entry points; it declares `{}`", e.name),
            ));
        }
        if let Some(o) = module.overrides.iter().next() {
            return Err(scheme_err(
                "position.wgsl",
                None,
                format!(
                    "no overrides; it declares `{}`",
                    o.1.name.as_deref().unwrap_or("?")
                ),
            ));
        }
        // Names the snippet declares at module scope, and whether any is the kernel's.
        let accessors: Vec<&str> = decls.iter().map(|d| d.name.as_str()).collect();
        let mut own: Vec<String> = Vec::new();
        for (_, f) in module.functions.iter() {
            if let Some(n) = &f.name
                && !accessors.contains(&n.as_str())
            {
                own.push(n.clone());
            }
        }
        for (_, c) in module.constants.iter() {
            if let Some(n) = &c.name
                && !PRELUDE_CONSTS.contains(&n.as_str())
            {
                own.push(n.clone());
            }
        }
        for (_, t) in module.types.iter() {
            if let Some(n) = &t.name {
                own.push(n.clone());
            }
        }
        own.extend(accessors.iter().map(|s| s.to_string()));
        let reserved = kernel_names();
        for name in &own {
            if name.starts_with("pa_") || reserved.iter().any(|r| r == name) {
                return Err(scheme_err(
                    "position.wgsl",
                    line_of_decl(&self.wgsl, name),
                    format!(
                        "names of its own; `{name}` is the kernel's (or has the reserved prefix `pa_`)"
                    ),
                ));
            }
        }
        let mut hooks = Hooks::default();
        for spec in HOOK_SIGNATURES {
            let Some((_, f)) = module
                .functions
                .iter()
                .find(|(_, f)| f.name.as_deref() == Some(spec.name))
            else {
                continue;
            };
            let args: Vec<String> = f
                .arguments
                .iter()
                .map(|a| type_name(&module, a.ty))
                .collect();
            let ret = f.result.as_ref().map(|r| type_name(&module, r.ty));
            if args != spec.args || ret.as_deref() != Some(spec.ret) {
                return Err(scheme_err(
                    spec.name,
                    line_of_decl(&self.wgsl, spec.name),
                    format!(
                        "the signature `fn {}({}) -> {}`; found `fn {}({}) -> {}`",
                        spec.name,
                        spec.args.join(", "),
                        spec.ret,
                        spec.name,
                        args.join(", "),
                        ret.as_deref().unwrap_or("()")
                    ),
                ));
            }
            match spec.name {
                "score_mod" => hooks.score = true,
                "mask_mod" => hooks.mask = true,
                "tile_mask" => hooks.tiles = true,
                _ => hooks.rotate = true,
            }
        }
        if !(hooks.score || hooks.mask || hooks.rotate) {
            return Err(scheme_err(
                "position.wgsl",
                None,
                "at least one of `fn score_mod`, `fn mask_mod`, `fn rotate_mod`",
            ));
        }
        if hooks.tiles && !hooks.mask {
            return Err(scheme_err(
                "tile_mask",
                line_of_decl(&self.wgsl, "tile_mask"),
                "a `mask_mod` next to it (a tile predicate summarises a mask)",
            ));
        }
        for (given, defined, twin, hook) in [
            (self.score_twin.is_some(), hooks.score, "score", "score_mod"),
            (self.mask_twin.is_some(), hooks.mask, "mask", "mask_mod"),
            (
                self.rotate_twin.is_some(),
                hooks.rotate,
                "rotate",
                "rotate_mod",
            ),
        ] {
            if given && !defined {
                return Err(scheme_err(
                    format!("position.{twin}_twin"),
                    None,
                    format!("no twin: the snippet defines no `{hook}`"),
                ));
            }
        }
        let glue = prelude(&decls, Some(hooks));
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&glue, &self.wgsl).hash(&mut h);
        let id = h.finish() | 1;
        Ok(CheckedScheme {
            hooks,
            id,
            glue: Arc::from(glue),
            snippet: Arc::from(self.wgsl.as_str()),
            table_order: decls.iter().map(|d| d.name.clone()).collect(),
        })
    }

    /// The hooks without a Rust twin (the reference cannot run them).
    pub fn missing_twins(&self) -> Vec<&'static str> {
        let Ok(decls) = table_decls(&self.wgsl) else {
            return Vec::new();
        };
        let sandbox = format!("{}\n{}", self.wgsl, prelude(&decls, None));
        let Ok(module) = naga::front::wgsl::parse_str(&sandbox) else {
            return Vec::new();
        };
        let has = |n: &str| {
            module
                .functions
                .iter()
                .any(|f| f.1.name.as_deref() == Some(n))
        };
        let mut out = Vec::new();
        if has("score_mod") && self.score_twin.is_none() {
            out.push("score_mod");
        }
        if has("mask_mod") && self.mask_twin.is_none() {
            out.push("mask_mod");
        }
        if has("rotate_mod") && self.rotate_twin.is_none() {
            out.push("rotate_mod");
        }
        out
    }
}

/// Which hooks a snippet defines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Hooks {
    /// Defines `score_mod`.
    pub score: bool,
    /// Defines `mask_mod`.
    pub mask: bool,
    /// Defines `tile_mask`.
    pub tiles: bool,
    /// Defines `rotate_mod`.
    pub rotate: bool,
}

/// A snippet that passed [`CustomScheme::check`]: what the kernel composer needs.
#[derive(Clone, Debug)]
pub struct CheckedScheme {
    /// The hooks the snippet defines.
    pub hooks: Hooks,
    /// Identifies the variant (hash of the glue and the snippet; never 0).
    pub id: u64,
    /// The generated glue: hook flags, `TILE_*` codes, table accessors and the `pa_*` wrappers.
    pub glue: Arc<str>,
    /// The caller's snippet, as checked.
    pub snippet: Arc<str>,
    /// Declared tables in declaration order (their header entries' order in aux).
    pub table_order: Vec<String>,
}

impl CheckedScheme {
    /// What the composer appends to the kernel: the glue, then the snippet (last, so that its
    /// lines map back by a fixed offset).
    pub fn hooks_wgsl(&self) -> String {
        format!("{}\n{}", self.glue, self.snippet)
    }
}

/// One `// @table` line.
#[derive(Clone, Debug, PartialEq)]
struct TableDecl {
    name: String,
    len: TableLen,
    line: u32,
}

/// A table's declared length.
#[derive(Clone, Copy, Debug, PartialEq)]
enum TableLen {
    Fixed(u64),
    PerHead(u64),
}

impl TableLen {
    fn floats(self, heads: u32) -> u64 {
        match self {
            TableLen::Fixed(n) => n,
            TableLen::PerHead(n) => n * heads as u64,
        }
    }
    fn describe(self, heads: u32) -> String {
        match self {
            TableLen::Fixed(n) => format!("declared {n}"),
            TableLen::PerHead(1) => format!("declared `heads`, {heads} heads"),
            TableLen::PerHead(n) => format!("declared `heads * {n}`, {heads} heads"),
        }
    }
}

/// Largest table a snippet may declare, in floats (what an f32 offset in aux holds exactly).
const TABLE_MAX: u64 = 1 << 22;

fn scheme_err(field: impl Into<String>, line: Option<u32>, expected: impl Into<String>) -> Error {
    Error::Scheme {
        field: field.into(),
        line,
        message: expected.into(),
    }
}

fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
        && s != "_"
        && !s.starts_with("__")
}

/// The `// @table NAME: LEN` lines of a snippet.
fn table_decls(wgsl: &str) -> Result<Vec<TableDecl>> {
    let mut out: Vec<TableDecl> = Vec::new();
    for (i, line) in wgsl.lines().enumerate() {
        let line_no = i as u32 + 1;
        let Some(rest) = line.trim().strip_prefix("// @table") else {
            continue;
        };
        let bad = |why: &str| {
            scheme_err(
                "position.wgsl",
                Some(line_no),
                format!("`// @table NAME: LEN` with LEN `N`, `heads` or `heads * N` ({why})"),
            )
        };
        let (name, len) = rest.split_once(':').ok_or_else(|| bad("no `:`"))?;
        let name = name.trim();
        if !is_ident(name) {
            return Err(bad("NAME must be an identifier"));
        }
        let words: Vec<&str> = len.split_whitespace().collect();
        let num = |s: &str| {
            s.parse::<u64>()
                .ok()
                .filter(|n| (1..=TABLE_MAX).contains(n))
        };
        let len = match words.as_slice() {
            ["heads"] => TableLen::PerHead(1),
            ["heads", "*", n] | [n, "*", "heads"] => {
                TableLen::PerHead(num(n).ok_or_else(|| bad("N must be in 1..=4194304"))?)
            }
            [n] => TableLen::Fixed(num(n).ok_or_else(|| bad("N must be in 1..=4194304"))?),
            _ => return Err(bad("unrecognised LEN")),
        };
        if out.iter().any(|d| d.name == name) {
            return Err(bad("a table declared twice"));
        }
        out.push(TableDecl {
            name: name.to_string(),
            len,
            line: line_no,
        });
    }
    Ok(out)
}

/// Directives may not appear in a snippet: they would change the whole module.
fn check_directives(wgsl: &str) -> Result<()> {
    for (i, line) in wgsl.lines().enumerate() {
        let first = line
            .trim_start()
            .split(|c: char| !c.is_ascii_alphanumeric() && c != '_');
        if let Some(word @ ("enable" | "requires" | "diagnostic")) = first.into_iter().next() {
            return Err(scheme_err(
                "position.wgsl",
                Some(i as u32 + 1),
                format!("no `{word}` directive (it would change the whole kernel module)"),
            ));
        }
    }
    Ok(())
}

const PRELUDE_CONSTS: [&str; 3] = ["TILE_HIDDEN", "TILE_PARTIAL", "TILE_FULL"];

/// The names a snippet may define (beside its own helpers and its tables).
struct HookSignature {
    name: &'static str,
    args: &'static [&'static str],
    ret: &'static str,
}

const HOOK_SIGNATURES: [HookSignature; 4] = [
    HookSignature {
        name: "score_mod",
        args: &["f32", "i32", "i32", "u32", "u32", "u32"],
        ret: "f32",
    },
    HookSignature {
        name: "mask_mod",
        args: &["i32", "i32", "u32", "u32", "u32"],
        ret: "bool",
    },
    HookSignature {
        name: "tile_mask",
        args: &["u32", "u32", "u32", "u32", "u32"],
        ret: "u32",
    },
    HookSignature {
        name: "rotate_mod",
        args: &["vec2<f32>", "u32", "i32", "bool"],
        ret: "vec2<f32>",
    },
];

fn type_name(module: &naga::Module, ty: naga::Handle<naga::Type>) -> String {
    use naga::{ScalarKind, TypeInner};
    let scalar = |s: naga::Scalar| match (s.kind, s.width) {
        (ScalarKind::Float, 4) => "f32".to_string(),
        (ScalarKind::Float, 2) => "f16".to_string(),
        (ScalarKind::Sint, 4) => "i32".to_string(),
        (ScalarKind::Uint, 4) => "u32".to_string(),
        (ScalarKind::Bool, _) => "bool".to_string(),
        (k, w) => format!("{k:?}{}", w * 8),
    };
    let t = &module.types[ty];
    match &t.inner {
        TypeInner::Scalar(s) => scalar(*s),
        TypeInner::Vector { size, scalar: s } => format!("vec{}<{}>", *size as u8, scalar(*s)),
        other => t.name.clone().unwrap_or_else(|| format!("{other:?}")),
    }
}

/// Line of `fn NAME` / `const NAME` / `struct NAME` / `alias NAME` / `@table NAME` in `wgsl`.
fn line_of_decl(wgsl: &str, name: &str) -> Option<u32> {
    wgsl.lines()
        .position(|l| {
            let mut words = l
                .split(|c: char| !c.is_ascii_alphanumeric() && c != '_' && c != '@')
                .filter(|w| !w.is_empty());
            while let Some(w) = words.next() {
                if matches!(w, "fn" | "const" | "struct" | "alias" | "@table") {
                    return words.next() == Some(name);
                }
            }
            false
        })
        .map(|i| i as u32 + 1)
}

/// The glue composed next to the snippet. With `hooks` None: the sandbox version (table
/// accessors that read nothing, so the snippet can be checked alone); with `hooks`: the kernel
/// version (accessors reading aux with clamped indices, hook flags and the `pa_*` wrappers the
/// kernel calls).
fn prelude(decls: &[TableDecl], hooks: Option<Hooks>) -> String {
    let mut s = String::from(
        "const TILE_HIDDEN: u32 = 0u;\nconst TILE_PARTIAL: u32 = 1u;\nconst TILE_FULL: u32 = 2u;\n",
    );
    let Some(h) = hooks else {
        for d in decls {
            s += &format!("fn {}(i: u32) -> f32 {{ return f32(i); }}\n", d.name);
        }
        return s;
    };
    s = format!("// Custom scheme glue (src/encoding/custom.rs).\n{s}");
    s += &format!(
        "const CUSTOM_SCORE: bool = {};\nconst CUSTOM_MASK: bool = {};\nconst CUSTOM_TILES: bool = {};\nconst CUSTOM_ROTATE: bool = {};\n",
        h.score, h.mask, h.tiles, h.rotate
    );
    // Table t's header entry at bias_offset + t holds (first float index, length) as exact
    // floats; the index is clamped to the length, so a read never leaves the table.
    for (t, d) in decls.iter().enumerate() {
        s += &format!(
            "fn {}(i: u32) -> f32 {{\n    let h = aux[params.bias_offset + {t}u];\n    return aux_f(u32(h.x) + min(i, u32(h.y) - 1u));\n}}\n",
            d.name
        );
    }
    let call = |cond: bool, body: &str, default: &str| {
        if cond {
            body.to_string()
        } else {
            default.to_string()
        }
    };
    s += &format!(
        "fn pa_score4(s: vec4<f32>, m: i32, n: vec4<i32>, head: u32, qi: u32, ki: vec4<u32>) -> vec4<f32> {{\n    {}\n}}\n",
        call(
            h.score,
            "let ln2 = 0.6931471805599453;\n    return vec4<f32>(score_mod(s.x * ln2, m, n.x, head, qi, ki.x), score_mod(s.y * ln2, m, n.y, head, qi, ki.y),\n                     score_mod(s.z * ln2, m, n.z, head, qi, ki.z), score_mod(s.w * ln2, m, n.w, head, qi, ki.w)) * LOG2E;",
            "return s;"
        )
    );
    s += &format!(
        "fn pa_mask4(m: i32, n: vec4<i32>, head: u32, qi: u32, ki: vec4<u32>) -> vec4<bool> {{\n    {}\n}}\n",
        call(
            h.mask,
            "return vec4<bool>(mask_mod(m, n.x, head, qi, ki.x), mask_mod(m, n.y, head, qi, ki.y),\n                      mask_mod(m, n.z, head, qi, ki.z), mask_mod(m, n.w, head, qi, ki.w));",
            "return vec4<bool>(true);"
        )
    );
    s += &format!(
        "fn pa_tile(q_first: u32, q_last: u32, k_first: u32, k_last: u32, head: u32) -> u32 {{\n    {}\n}}\n",
        call(
            h.tiles,
            "return tile_mask(q_first, q_last, k_first, k_last, head);",
            "return TILE_PARTIAL;"
        )
    );
    s += &format!(
        "fn pa_rotate(x: vec2<f32>, pair: u32, pos: i32, is_query: bool) -> vec2<f32> {{\n    {}\n}}\n",
        call(
            h.rotate,
            "return rotate_mod(x, pair, pos, is_query);",
            "return x;"
        )
    );
    s
}

/// The glue of a kernel without a custom scheme: every hook off, the wrappers identities.
pub(crate) fn default_hooks_wgsl() -> String {
    prelude(&[], Some(Hooks::default()))
}

/// Parses and validates `src` with naga. Errors at lines `first_line..` of `src` are reported
/// at snippet line `line − first_line + 1`; other lines as the generated code's.
pub(crate) fn parse_and_validate(
    src: &str,
    first_line: u32,
    line_count: u32,
    field: &str,
    capabilities: naga::valid::Capabilities,
) -> Result<naga::Module> {
    let map = |line: Option<u32>| -> (Option<u32>, &'static str) {
        match line {
            Some(l) if l >= first_line && l < first_line + line_count => {
                (Some(l - first_line + 1), "")
            }
            Some(_) => (None, " (in the generated kernel code)"),
            None => (None, ""),
        }
    };
    let module = naga::front::wgsl::parse_str(src).map_err(|e| {
        let (line, where_) = map(e.location(src).map(|l| l.line_number));
        let labels: Vec<String> = e
            .labels()
            .filter(|(_, m)| !m.is_empty())
            .map(|(_, m)| m.to_string())
            .collect();
        let mut msg = format!("WGSL that parses{where_}: {}", e.message());
        if !labels.is_empty() {
            msg += &format!(" ({})", labels.join("; "));
        }
        scheme_err(field, line, msg)
    })?;
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), capabilities)
        .validate(&module)
        .map_err(|e| {
            // The innermost span (an expression rather than its function) is the last one.
            let at = e
                .spans()
                .filter(|(sp, _)| sp.is_defined())
                .last()
                .map(|(sp, _)| sp.location(src).line_number);
            let (line, where_) = map(at);
            let mut msg = format!("WGSL that validates{where_}: {}", e.as_inner());
            let mut src_err: Option<&dyn std::error::Error> =
                std::error::Error::source(e.as_inner());
            while let Some(s) = src_err {
                msg += &format!(": {s}");
                src_err = s.source();
            }
            scheme_err(field, line, msg)
        })?;
    Ok(module)
}

/// Every module-scope name of the kernels a snippet is composed into.
fn kernel_names() -> &'static [String] {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let mut names = Vec::new();
        use crate::kernel::storage::StorageForm;
        use crate::kernel::{KernelKey, PosKind, Stage};
        // Every family, and the half-storage helpers and accessors (a packed and a bf16 form).
        for key in [
            KernelKey::fused(64, 1, PosKind::None),
            KernelKey::fused(64, 1, PosKind::Rope).with_storage([
                StorageForm::F16Packed,
                StorageForm::Bf16,
                StorageForm::F16Packed,
                StorageForm::Bf16,
            ]),
            KernelKey::unfused(Stage::Scores, 64, PosKind::None),
            KernelKey::decode(64, 4, PosKind::Rope),
            KernelKey::decode(64, 4, PosKind::Rope)
                .with_lanes(4, crate::kernel::LaneReduce::Shuffle),
            KernelKey::decode(64, 4, PosKind::Rope).with_lanes(4, crate::kernel::LaneReduce::Add),
            KernelKey::decode_reduce(64),
        ] {
            let Ok(src) = key.try_wgsl() else { continue };
            // Every name the kernel calls or instantiates, builtins included (`max`, `exp2`,
            // `vec4`): a snippet's module-scope declaration would shadow it for the kernel too.
            let code: String = src
                .lines()
                .map(|l| l.split("//").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            let bytes = code.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i].is_ascii_alphabetic() || bytes[i] == b'_' {
                    let start = i;
                    while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_')
                    {
                        i += 1;
                    }
                    let mut j = i;
                    while j < bytes.len() && bytes[j] == b' ' {
                        j += 1;
                    }
                    if j < bytes.len() && (bytes[j] == b'(' || bytes[j] == b'<') {
                        names.push(code[start..i].to_string());
                    }
                } else {
                    i += 1;
                }
            }
            let Ok(m) = naga::front::wgsl::parse_str(&src) else {
                continue;
            };
            names.extend(m.functions.iter().filter_map(|f| f.1.name.clone()));
            names.extend(m.constants.iter().filter_map(|c| c.1.name.clone()));
            names.extend(m.global_variables.iter().filter_map(|g| g.1.name.clone()));
            names.extend(m.types.iter().filter_map(|t| t.1.name.clone()));
            names.extend(m.entry_points.iter().map(|e| e.name.clone()));
        }
        // Constants naga folds away are still names of the source.
        for k in [
            "HEAD_DIM",
            "BLOCK_Q",
            "BLOCK_K",
            "ROWS",
            "POS_KIND",
            "ROPE_INTERLEAVED",
            "TWO_BRANCH",
            "K_TILES",
            "HEAD_VEC",
            "WG_SIZE",
            "LOG2E",
            "MASKED",
            "ROTATES",
            "TABLE_BIAS",
            "KPOS",
            "K2",
            "CUSTOM_SCORE",
            "CUSTOM_MASK",
            "CUSTOM_TILES",
            "CUSTOM_ROTATE",
        ] {
            names.push(k.to_string());
        }
        names.sort();
        names.dedup();
        names
    })
}

/// The tables in the order the kernel reads them: one header entry per table (first float
/// index, length), then the data of each.
pub(crate) fn push_tables(
    checked: &CheckedScheme,
    scheme: &CustomScheme,
    aux: &mut crate::kernel::abi::AuxTable,
) -> u32 {
    let n = checked.table_order.len();
    let header_at = aux.entries().len();
    let base = aux.push_entries(std::iter::repeat_n([0.0f32; 4], n.max(1)));
    let mut headers = Vec::with_capacity(n);
    for name in &checked.table_order {
        let data = &scheme.tables[name];
        let at = aux.push_floats(data);
        headers.push([(at * 4) as f32, data.len() as f32, 0.0, 0.0]);
    }
    aux.set_entries(header_at, &headers);
    base
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALIBI: &str = "// @table slopes: heads\n\
        fn score_mod(score: f32, q_pos: i32, k_pos: i32, head: u32, q_index: u32, k_index: u32) -> f32 {\n\
            return score - slopes(head) * f32(q_pos - k_pos);\n\
        }\n";

    fn err_of(r: Result<CheckedScheme>) -> (String, Option<u32>, String) {
        match r {
            Err(Error::Scheme {
                field,
                line,
                message,
            }) => (field, line, message),
            other => panic!("expected a scheme error, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_scheme_checks_and_composes() {
        let s = CustomScheme::new(ALIBI).with_table("slopes", vec![0.5; 4]);
        let c = s.check(4).unwrap();
        assert!(c.hooks.score && !c.hooks.mask && !c.hooks.rotate);
        assert_eq!(c.table_order, ["slopes"]);
        assert!(c.hooks_wgsl().ends_with(ALIBI));
    }

    #[test]
    fn a_parse_error_points_at_the_snippet_line() {
        let src = "fn score_mod(score: f32, q_pos: i32, k_pos: i32, head: u32, q_index: u32, k_index: u32) -> f32 {\n    let x = 1.0\n    return score + x;\n}\n";
        let (field, line, msg) = err_of(CustomScheme::new(src).check(2));
        assert_eq!(field, "position.wgsl");
        assert_eq!(line, Some(3), "{msg}");
    }

    #[test]
    fn a_type_error_points_at_the_snippet_line() {
        let src = "\n\nfn score_mod(score: f32, q_pos: i32, k_pos: i32, head: u32, q_index: u32, k_index: u32) -> f32 {\n    return score + q_pos;\n}\n";
        let (_, line, msg) = err_of(CustomScheme::new(src).check(2));
        assert_eq!(line, Some(4), "{msg}");
    }

    #[test]
    fn kernel_bindings_and_functions_are_out_of_reach() {
        for (body, what) in [
            ("return score + q_buf[0];", "q_buf"),
            ("return score + aux[0].x;", "aux"),
            ("return score + f32(params.seq_k);", "params"),
            ("return score + aux_f(0u);", "aux_f"),
            ("return score + MASKED;", "MASKED"),
        ] {
            let src = format!(
                "fn score_mod(score: f32, q_pos: i32, k_pos: i32, head: u32, q_index: u32, k_index: u32) -> f32 {{\n    {body}\n}}\n"
            );
            let (field, line, msg) = err_of(CustomScheme::new(src).check(2));
            assert_eq!(
                (field.as_str(), line),
                ("position.wgsl", Some(2)),
                "{what}: {msg}"
            );
            assert!(msg.contains(what), "{what}: {msg}");
        }
    }

    #[test]
    fn declarations_that_reach_outside_are_rejected() {
        let hook = "fn score_mod(score: f32, q_pos: i32, k_pos: i32, head: u32, q_index: u32, k_index: u32) -> f32 { return score; }\n";
        for (extra, needle) in [
            (
                "@group(0) @binding(9) var<storage, read> leak: array<f32>;\n",
                "leak",
            ),
            ("var<workgroup> shared_x: array<f32, 4>;\n", "shared_x"),
            ("var<private> p: f32;\n", "`p`"),
            ("enable f16;\n", "enable"),
            ("override k: f32 = 1.0;\n", "override"),
            ("fn stage_rows() {}\n", "stage_rows"),
            ("const LOG2E: f32 = 2.0;\n", "LOG2E"),
            ("fn pa_score4() {}\n", "pa_score4"),
            ("@compute @workgroup_size(1) fn main() {}\n", "entry point"),
            (
                "fn rope_rotate(x: f32) -> f32 { return x; }\n",
                "rope_rotate",
            ),
            ("fn exp2(x: f32) -> f32 { return x; }\n", "exp2"),
        ] {
            let src = format!("{extra}{hook}");
            let (_, _, msg) = err_of(CustomScheme::new(src).check(2));
            assert!(msg.contains(needle), "{extra}: {msg}");
        }
    }

    #[test]
    fn a_table_may_not_shadow_a_builtin_the_kernel_calls() {
        let src = format!(
            "// @table max: 2\n{}",
            ALIBI.replace("slopes(head)", "max(head)")
        );
        let s = CustomScheme::new(src)
            .with_table("max", vec![1.0; 2])
            .with_table("slopes", vec![1.0; 2]);
        let (_, line, msg) = err_of(s.check(2));
        assert!(msg.contains("`max`"), "{msg}");
        assert_eq!(line, Some(1));
    }

    #[test]
    fn a_wrong_signature_names_the_hook() {
        let src = "fn score_mod(score: f32, q_pos: i32, k_pos: i32, head: u32) -> f32 { return score; }\n";
        let (field, line, msg) = err_of(CustomScheme::new(src).check(2));
        assert_eq!((field.as_str(), line), ("score_mod", Some(1)));
        assert!(
            msg.contains("fn score_mod(f32, i32, i32, u32, u32, u32) -> f32"),
            "{msg}"
        );
        let src = "fn mask_mod(q_pos: i32, k_pos: i32, head: u32, q_index: u32, k_index: u32) -> f32 { return 1.0; }\n";
        let (field, _, msg) = err_of(CustomScheme::new(src).check(2));
        assert_eq!(field, "mask_mod", "{msg}");
    }

    #[test]
    fn tables_missing_short_undeclared_or_malformed_are_errors() {
        let (field, line, msg) = err_of(CustomScheme::new(ALIBI).check(4));
        assert_eq!((field.as_str(), line), ("position.tables.slopes", Some(1)));
        assert!(msg.contains("at least 4 floats"), "{msg}");
        let short = CustomScheme::new(ALIBI).with_table("slopes", vec![0.5; 3]);
        let (field, _, msg) = err_of(short.check(4));
        assert_eq!(field, "position.tables.slopes");
        assert!(msg.contains("got 3"), "{msg}");
        let extra = CustomScheme::new(ALIBI)
            .with_table("slopes", vec![0.5; 4])
            .with_table("other", vec![1.0]);
        assert_eq!(err_of(extra.check(4)).0, "position.tables.other");
        let nan = CustomScheme::new(ALIBI).with_table("slopes", vec![f32::NAN; 4]);
        assert_eq!(err_of(nan.check(4)).0, "position.tables.slopes");
        for decl in [
            "// @table t heads",
            "// @table t: 0",
            "// @table 9t: 4",
            "// @table t: heads * x",
        ] {
            let src = format!("{decl}\n{ALIBI}");
            let (field, line, _) = err_of(CustomScheme::new(src).check(4));
            assert_eq!((field.as_str(), line), ("position.wgsl", Some(1)), "{decl}");
        }
        let per = "// @table b: heads * 3\nfn score_mod(score: f32, q_pos: i32, k_pos: i32, head: u32, q_index: u32, k_index: u32) -> f32 { return score + b(head * 3u); }\n";
        assert!(
            CustomScheme::new(per)
                .with_table("b", vec![0.0; 6])
                .check(2)
                .is_ok()
        );
        assert!(
            CustomScheme::new(per)
                .with_table("b", vec![0.0; 5])
                .check(2)
                .is_err()
        );
    }

    #[test]
    fn a_snippet_with_no_hook_or_a_stray_twin_is_an_error() {
        let (_, _, msg) =
            err_of(CustomScheme::new("fn helper() -> f32 { return 1.0; }\n").check(2));
        assert!(msg.contains("at least one of"), "{msg}");
        let s = CustomScheme::new(ALIBI)
            .with_table("slopes", vec![0.5; 2])
            .with_mask(|_| true);
        assert_eq!(err_of(s.check(2)).0, "position.mask_twin");
        let tiles = "fn tile_mask(a: u32, b: u32, c: u32, d: u32, h: u32) -> u32 { return TILE_FULL; }\nfn score_mod(score: f32, q_pos: i32, k_pos: i32, head: u32, q_index: u32, k_index: u32) -> f32 { return score; }\n";
        assert_eq!(err_of(CustomScheme::new(tiles).check(2)).0, "tile_mask");
    }

    #[test]
    fn missing_twins_are_listed() {
        let s = CustomScheme::new(ALIBI).with_table("slopes", vec![0.5; 2]);
        assert_eq!(s.missing_twins(), ["score_mod"]);
        let s = s.with_score(|a| a.score);
        assert!(s.missing_twins().is_empty());
    }
}
