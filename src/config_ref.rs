//! `edgegate config-reference`: the configuration reference
//! (`docs/config.md`), generated from the code.
//!
//! Two sources, so that the reference cannot drift from what the gateway
//! accepts:
//!
//! * **The keys, their types, defaults and allowed values** come from the
//!   [`Config`] structs themselves, through serde: the set of keys is
//!   `Config::default()` serialized (the same way `config.rs` derives the
//!   keys it accepts), a key's type is what serde's deserializer says it
//!   expected when handed a value of the wrong shape, and an enum's allowed
//!   values are the variants serde lists when handed an unknown one. Nothing
//!   here names a key or retypes a variant.
//! * **The descriptions** are the comments of `config/edgegate.toml`, the
//!   embedded default file ([`DEFAULT_TOML`]), which documents every key in
//!   the comment above it (keys written one after the other share the
//!   comment above the first). A key the structs have and the file does not
//!   document is an error, not a blank row: [`render`] fails and names it,
//!   so a key added without its comment fails the test suite
//!   (`docs/config.md` is compared with [`render`]'s output there).
//!
//! **Maps of user-named tables** (a section whose default is an empty map,
//! such as `[services.<name>]`) have no keys to list in `Config::default()`.
//! They are documented in the file by a commented-out example section whose
//! name has a placeholder in angle brackets:
//!
//! ```toml
//! # [services.<name>]
//! # Where the requests to svc:<name> go.
//! # url = "http://127.0.0.1:8000/rpc"
//! ```
//!
//! The example is then deserialized into the structs under a probe name, so
//! the entry's keys, types and defaults still come from the code; a map
//! without such an example, or an entry key the example leaves out, is an
//! error.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{Config, DEFAULT_TOML, ENV_PREFIX};

/// The reference of the gateway's own [`Config`] and its embedded file.
pub fn render() -> Result<String, RefError> {
    // Map entries: the gateway's own loader says whether their keys can be
    // overridden from the environment.
    let env_accepts = |vars: Vec<(String, String)>| Config::load(None, vars).is_ok();
    render_for::<Config>(DEFAULT_TOML, "config/edgegate.toml", &env_accepts)
}

/// Whether the loader accepts these override variables (name, value).
type EnvCheck<'a> = &'a dyn Fn(Vec<(String, String)>) -> bool;

/// Why the reference cannot be written: the keys without a description, and
/// other mismatches between the structs and the documented file, one per
/// line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefError(pub Vec<String>);

impl std::fmt::Display for RefError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "the configuration reference cannot be generated:")?;
        for line in &self.0 {
            writeln!(f, "  - {line}")?;
        }
        write!(
            f,
            "document every key in config/edgegate.toml: a comment directly above it \
             (or above the key it follows), the key set or commented out as `# key = value`"
        )
    }
}

impl std::error::Error for RefError {}

/// The name a map entry is probed under; the reference shows the file's
/// placeholder (`<name>`) instead.
const PROBE_NAME: &str = "probe";

/// What the documented file says about one key.
#[derive(Debug, Clone, Default)]
struct DocKey {
    /// The comment lines above it (or above the key it follows).
    description: Vec<String>,
    /// The value written in the file, as TOML text.
    value: String,
    /// Written as `# key = value`: an example, not a setting.
    commented: bool,
    /// Line number in the file: the reference keeps the file's order.
    line: usize,
}

/// What the documented file says, by dotted key (sections by their header,
/// placeholders included: `services.<name>.url`).
#[derive(Debug, Default)]
struct Docs {
    keys: BTreeMap<String, DocKey>,
    /// Section descriptions: a comment block directly above the header.
    sections: BTreeMap<String, Vec<String>>,
    /// Line number of each section's header.
    headers: BTreeMap<String, usize>,
    /// Sections written with a placeholder segment (`services.<name>`),
    /// commented out or not.
    placeholders: Vec<Vec<String>>,
}

/// Splits a `[a.b]` header (or `# [a.b]`) into its segments.
fn header(line: &str) -> Option<Vec<String>> {
    let inner = line.strip_prefix('[')?.strip_suffix(']')?;
    if inner.starts_with('[') {
        return None; // arrays of tables are not used by the configuration
    }
    let segments: Vec<String> = inner.split('.').map(|s| s.trim().to_owned()).collect();
    let ok = segments.iter().all(|s| {
        !s.is_empty()
            && (s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                || is_placeholder(s))
    });
    ok.then_some(segments)
}

fn is_placeholder(segment: &str) -> bool {
    segment.len() > 2 && segment.starts_with('<') && segment.ends_with('>')
}

/// `key = value` with a TOML value, as (key, value text).
fn assignment(line: &str) -> Option<(String, String)> {
    let (key, value) = line.split_once('=')?;
    let key = key.trim();
    if key.is_empty()
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return None;
    }
    // Prose such as `mode = "jwt": the one algorithm ...` is no TOML value.
    let parsed: toml::Table = toml::from_str(&format!("v = {}", value.trim())).ok()?;
    let value = parsed.get("v")?;
    Some((key.to_owned(), value.to_string()))
}

/// Reads the comments and keys of the documented file. `is_key` tells
/// whether a commented-out `name = value` line in a section is a key (and
/// not prose that happens to parse).
fn parse_docs(text: &str, is_key: impl Fn(&[String], &str) -> bool) -> Docs {
    let mut docs = Docs::default();
    let mut section: Vec<String> = Vec::new();
    let mut pending: Vec<String> = Vec::new();
    // The description of the key on the line before, for keys that follow it.
    let mut group: Option<Vec<String>> = None;
    for (number, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            pending.clear();
            group = None;
            continue;
        }
        let (body, commented) = match line.strip_prefix('#') {
            Some(rest) => (rest.strip_prefix(' ').unwrap_or(rest).trim_end(), true),
            None => (line, false),
        };
        if let Some(segments) = header(body.trim()) {
            if !pending.is_empty() {
                docs.sections
                    .insert(segments.join("."), std::mem::take(&mut pending));
            }
            if segments.iter().any(|s| is_placeholder(s)) {
                docs.placeholders.push(segments.clone());
            }
            docs.headers.entry(segments.join(".")).or_insert(number);
            section = segments;
            group = None;
            continue;
        }
        // A commented section header would otherwise leave keys of a real
        // section below it looking like its own; only placeholder sections
        // are written commented out, and a real header ends them.
        let in_placeholder = section.iter().any(|s| is_placeholder(s));
        if let Some((key, value)) = assignment(body)
            && (!commented || in_placeholder || is_key(&section, &key))
            && !section.is_empty()
        {
            let description = if pending.is_empty() {
                group.clone().unwrap_or_default()
            } else {
                std::mem::take(&mut pending)
            };
            group = Some(description.clone());
            let mut path = section.clone();
            path.push(key);
            docs.keys.insert(
                path.join("."),
                DocKey {
                    description,
                    value,
                    commented,
                    line: number,
                },
            );
            continue;
        }
        if commented {
            // Prose: a new comment after a key starts a new description.
            group = None;
            pending.push(body.to_owned());
        }
    }
    docs
}

/// One key of the reference.
#[derive(Debug)]
struct KeyRef {
    /// Dotted, placeholders included.
    path: Vec<String>,
    ty: String,
    /// Rendered default; `None` = required (map entries only).
    default: Option<String>,
    env: Option<String>,
    doc: DocKey,
}

/// The environment variable that overrides `path`.
fn env_name(path: &[String]) -> String {
    let upper: Vec<String> = path
        .iter()
        .map(|s| {
            if is_placeholder(s) {
                s.to_ascii_uppercase()
            } else {
                s.to_ascii_uppercase().replace('-', "_")
            }
        })
        .collect();
    format!("{ENV_PREFIX}{}", upper.join("__"))
}

/// Serde's words for a type, as the reference names it.
fn type_words(expected: &str) -> String {
    let words = match expected {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "integer ≥ 0",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "integer",
        "f32" | "f64" => "number",
        "a boolean" => "boolean",
        "a string" | "a borrowed string" | "a character" => "string",
        "path string" => "path (string)",
        "socket address" => "socket address (string, `ip:port`)",
        "a sequence" => "list",
        other => other,
    };
    words.to_owned()
}

/// The words after "expected " in a serde error message.
fn expected(message: &str) -> Option<&str> {
    let at = message.find("expected ")?;
    Some(
        message[at + "expected ".len()..]
            .trim()
            .trim_end_matches('.'),
    )
}

/// The variants named in an "unknown variant" message, in its order.
fn variants(message: &str) -> Option<Vec<String>> {
    if !message.contains("unknown variant") {
        return None;
    }
    let list = expected(message)?;
    let names: Vec<String> = list
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    (!names.is_empty()).then_some(names)
}

/// A string no enum names as a variant, to make serde list the variants.
const NOT_A_VARIANT: &str = "?not-a-variant?";

/// Probes what the structs make of `value` at `path` of `base`.
struct Prober<T> {
    base: toml::Table,
    _config: std::marker::PhantomData<T>,
}

impl<T: DeserializeOwned> Prober<T> {
    fn new(base: toml::Table) -> Self {
        Prober {
            base,
            _config: std::marker::PhantomData,
        }
    }

    /// `Ok(())` when `value` at `path` deserializes, else serde's message.
    fn try_value(&self, path: &[String], value: toml::Value) -> Result<(), String> {
        let mut table = self.base.clone();
        let Some((leaf, sections)) = path.split_last() else {
            return Err("empty key".to_owned());
        };
        let mut current = &mut table;
        for section in sections {
            let entry = current
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            current = match entry {
                toml::Value::Table(inner) => inner,
                _ => return Err("not a table".to_owned()),
            };
        }
        current.insert(leaf.clone(), value);
        T::deserialize(table)
            .map(|_| ())
            .map_err(|e| e.message().to_owned())
    }

    /// The type of the key at `path`, in the reference's words; `wrap`
    /// wraps the probe value (for the items of a list).
    fn describe(&self, path: &[String], wrap: &dyn Fn(toml::Value) -> toml::Value) -> String {
        // An enum lists its variants when given one it does not know.
        if let Err(m) = self.try_value(path, wrap(toml::Value::String(NOT_A_VARIANT.to_owned())))
            && let Some(names) = variants(&m)
        {
            let names: Vec<String> = names.iter().map(|n| format!("`\"{n}\"`")).collect();
            return format!("one of {}", names.join(", "));
        }
        // Anything else says what it expected when given a table.
        match self.try_value(path, wrap(toml::Value::Table(toml::Table::new()))) {
            Err(m) => match expected(&m) {
                Some("a sequence") => {
                    let item = self.describe(path, &|v| wrap(toml::Value::Array(vec![v])));
                    format!("list of {item}")
                }
                Some(words) => type_words(words),
                None => "table".to_owned(),
            },
            // A table is accepted: a nested section or map.
            Ok(()) => "table".to_owned(),
        }
    }
}

/// The default shown for a JSON value of the serialized default.
fn render_default(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "unset".to_owned(),
        other => match toml::Value::try_from(other) {
            Ok(v) => format!("`{v}`"),
            Err(_) => format!("`{other}`"),
        },
    }
}

/// Renders the reference of config type `T` documented by `text` (named
/// `file` in the output).
fn render_for<T>(text: &str, file: &str, env_check: EnvCheck<'_>) -> Result<String, RefError>
where
    T: Default + Serialize + DeserializeOwned,
{
    let mut errors = Vec::new();
    let schema = match serde_json::to_value(T::default()) {
        Ok(serde_json::Value::Object(root)) => root,
        Ok(_) => return Err(RefError(vec!["the configuration is not a table".into()])),
        Err(e) => return Err(RefError(vec![format!("cannot list the keys: {e}")])),
    };
    let lookup = |section: &[String], key: &str| {
        let mut level = &schema;
        for s in section {
            match level.get(s) {
                Some(serde_json::Value::Object(inner)) => level = inner,
                _ => return false,
            }
        }
        level.contains_key(key)
    };
    let docs = parse_docs(text, lookup);

    let mut keys: Vec<KeyRef> = Vec::new();
    let mut sections: Vec<Vec<String>> = Vec::new();
    let root = Prober::<T>::new(toml::Table::new());
    let mut out = Collected {
        keys: &mut keys,
        sections: &mut sections,
        errors: &mut errors,
        env_check,
    };
    walk(&schema, &mut Vec::new(), &docs, &root, &mut out);
    for placeholder in &docs.placeholders {
        let (map, _) = split_placeholder(placeholder);
        let known = map_default(&schema, &map).is_some();
        if !known {
            errors.push(format!(
                "[{}] in {file}: `{}` is not a map of named tables in the configuration",
                placeholder.join("."),
                map.join(".")
            ));
        }
    }
    if !errors.is_empty() {
        return Err(RefError(errors));
    }
    // The file's order (serde_json's maps are sorted by name).
    sections.sort_by_key(|s| docs.headers.get(&s.join(".")).copied());
    keys.sort_by_key(|k| k.doc.line);
    Ok(write_markdown(file, &docs, &sections, &keys))
}

/// `services.<name>.x` → (`services`, `<name>`).
fn split_placeholder(path: &[String]) -> (Vec<String>, String) {
    match path.iter().position(|s| is_placeholder(s)) {
        Some(i) => (path[..i].to_vec(), path[i].clone()),
        None => (path.to_vec(), String::new()),
    }
}

/// The default of the map at `path`, when it is an (empty) map.
fn map_default<'a>(
    schema: &'a serde_json::Map<String, serde_json::Value>,
    path: &[String],
) -> Option<&'a serde_json::Map<String, serde_json::Value>> {
    let mut level = schema;
    for s in path {
        match level.get(s) {
            Some(serde_json::Value::Object(inner)) => level = inner,
            _ => return None,
        }
    }
    level.is_empty().then_some(level)
}

/// What the walk collects.
struct Collected<'a> {
    keys: &'a mut Vec<KeyRef>,
    sections: &'a mut Vec<Vec<String>>,
    errors: &'a mut Vec<String>,
    env_check: EnvCheck<'a>,
}

/// Walks the serialized default: sections in order, each key documented.
fn walk<T: DeserializeOwned + Serialize>(
    level: &serde_json::Map<String, serde_json::Value>,
    path: &mut Vec<String>,
    docs: &Docs,
    prober: &Prober<T>,
    out: &mut Collected<'_>,
) {
    // Values first, then nested sections: the order TOML needs.
    let (tables, values): (Vec<_>, Vec<_>) = level
        .iter()
        .partition(|(_, v)| matches!(v, serde_json::Value::Object(_)));
    if !values.is_empty() {
        out.sections.push(path.clone());
    }
    for (key, default) in values {
        path.push(key.clone());
        let dotted = path.join(".");
        match docs.keys.get(&dotted) {
            Some(doc) if !doc.description.is_empty() => out.keys.push(KeyRef {
                path: path.clone(),
                ty: prober.describe(path, &|v| v),
                default: Some(render_default(default)),
                env: Some(env_name(path)),
                doc: doc.clone(),
            }),
            Some(_) => out
                .errors
                .push(format!("`{dotted}` has no comment above it")),
            None => out.errors.push(format!(
                "`{dotted}` is not in the file (neither set nor commented out)"
            )),
        }
        path.pop();
    }
    for (key, inner) in tables {
        let serde_json::Value::Object(inner) = inner else {
            continue;
        };
        path.push(key.clone());
        if inner.is_empty() {
            map_entries(path, docs, prober, out);
        } else {
            walk(inner, path, docs, prober, out);
        }
        path.pop();
    }
}

/// Documents a map of named tables at `path` from its example section.
fn map_entries<T: DeserializeOwned + Serialize>(
    path: &[String],
    docs: &Docs,
    prober: &Prober<T>,
    out: &mut Collected<'_>,
) {
    let errors = &mut *out.errors;
    let dotted = path.join(".");
    let Some(example) = docs
        .placeholders
        .iter()
        .find(|p| p.len() == path.len() + 1 && p[..path.len()] == *path)
    else {
        errors.push(format!(
            "`{dotted}` is a map of named tables: document one entry as a commented example \
             section `# [{dotted}.<name>]` with its keys"
        ));
        return;
    };
    let prefix = format!("{}.", example.join("."));
    let documented: Vec<(&String, &DocKey)> = docs
        .keys
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('.'))
        .collect();
    // The example entry, under the probe name.
    let mut entry = toml::Table::new();
    for (k, doc) in &documented {
        let parsed: Result<toml::Table, _> = toml::from_str(&format!("v = {}", doc.value));
        if let Some(v) = parsed.ok().and_then(|mut t| t.remove("v")) {
            entry.insert(k[prefix.len()..].to_owned(), v);
        }
    }
    let mut base = prober.base.clone();
    let mut probe_path = path.to_vec();
    probe_path.push(PROBE_NAME.to_owned());
    if let Err(e) = insert_at(&mut base, &probe_path, toml::Value::Table(entry.clone())) {
        errors.push(format!("`{dotted}`: {e}"));
        return;
    }
    let with_example = Prober::<T>::new(base);
    let config = match T::deserialize(with_example.base.clone()) {
        Ok(c) => c,
        Err(e) => {
            errors.push(format!(
                "`{dotted}`: the example section [{}] does not load: {}",
                example.join("."),
                e.message()
            ));
            return;
        }
    };
    // The entry as the structs see it: every key, defaults filled in.
    let full = serde_json::to_value(&config).ok().and_then(|v| {
        let mut level = v;
        for s in &probe_path {
            level = level.get(s)?.clone();
        }
        match level {
            serde_json::Value::Object(m) => Some(m),
            _ => None,
        }
    });
    let Some(full) = full else {
        errors.push(format!("`{dotted}`: cannot read the example entry back"));
        return;
    };
    let env_supported = env_accepts(path, &entry, out.env_check);
    out.sections.push(example.clone());
    for (key, value) in &full {
        let mut shown = example.clone();
        shown.push(key.clone());
        let shown_dotted = shown.join(".");
        let Some(doc) = docs.keys.get(&shown_dotted) else {
            errors.push(format!(
                "`{shown_dotted}` is not in the example section (neither set nor commented out)"
            ));
            continue;
        };
        if doc.description.is_empty() {
            errors.push(format!("`{shown_dotted}` has no comment above it"));
            continue;
        }
        let mut probed = probe_path.clone();
        probed.push(key.clone());
        // Required: the example without it does not load.
        let mut without = entry.clone();
        without.remove(key);
        let mut base = prober.base.clone();
        let required = insert_at(&mut base, &probe_path, toml::Value::Table(without)).is_ok()
            && T::deserialize(base)
                .err()
                .is_some_and(|e| e.message().contains("missing field"));
        out.keys.push(KeyRef {
            path: shown.clone(),
            ty: with_example.describe(&probed, &|v| v),
            default: (!required).then(|| render_default(value)),
            env: env_supported.then(|| env_name(&shown)),
            doc: doc.clone(),
        });
    }
    for (k, _) in documented {
        if !full.contains_key(&k[prefix.len()..]) {
            errors.push(format!("`{k}` is documented but is not a key of the entry"));
        }
    }
}

/// Whether environment variables can set the keys of a map entry: the
/// loader is asked (with the example's values), so the reference never
/// promises an override the loader refuses.
fn env_accepts(path: &[String], entry: &toml::Table, env_check: EnvCheck<'_>) -> bool {
    let mut name_path = path.to_vec();
    name_path.push(PROBE_NAME.to_owned());
    let vars: Vec<(String, String)> = entry
        .iter()
        .map(|(k, v)| {
            let mut p = name_path.clone();
            p.push(k.clone());
            let text = match v {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (env_name(&p), text)
        })
        .collect();
    !vars.is_empty() && env_check(vars)
}

/// Inserts `value` at `path` of `table`, making the sections on the way.
fn insert_at(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((leaf, sections)) = path.split_last() else {
        return Err("empty key".to_owned());
    };
    let mut current = table;
    for section in sections {
        let entry = current
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = match entry {
            toml::Value::Table(inner) => inner,
            _ => return Err(format!("`{section}` is not a table")),
        };
    }
    current.insert(leaf.clone(), value);
    Ok(())
}

/// Escapes what Markdown would read as markup in a comment's prose
/// (`<name>` would be an HTML tag, `*` emphasis).
fn prose(lines: &[String]) -> String {
    let mut out = String::new();
    for line in lines {
        if !out.is_empty() {
            out.push(' ');
        }
        for c in line.trim().chars() {
            if matches!(c, '<' | '>' | '*' | '\\' | '|') {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

/// The document.
fn write_markdown(file: &str, docs: &Docs, sections: &[Vec<String>], keys: &[KeyRef]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Configuration reference\n\n\
         <!-- Generated by `edgegate config-reference` (the keys, types, defaults and allowed \
         values from the code, the descriptions from the comments of {file}). Do not edit: \
         change those, then run `cargo run -p edgegate -- config-reference > docs/config.md`. \
         The test suite fails while this file is out of date. -->\n\n\
         Every key of the gateway's TOML configuration. A file given with `--config` is read \
         alone (it does not layer on {file}, the embedded default, which is used only when no \
         file is given); a key the file leaves out takes its **default** below, and the default \
         of every listener is off. `edgegate check-config --config FILE` validates a file and \
         prints the effective configuration. Unknown keys are errors.\n\n\
         Each key can be overridden by its **environment variable**: `{ENV_PREFIX}` and the \
         dotted key in upper case, with `.` written `__`. Lists take comma-separated items or \
         TOML array text (`EDGEGATE_SHARDS__CPUS=0,1`); an empty value puts the key back to its \
         default. A key shown as **unset** by default is optional: leave it out (TOML has no \
         null).\n"
    );
    let _ = writeln!(s, "Sections:\n");
    for section in sections {
        let name = section.join(".");
        let _ = writeln!(s, "- [`[{name}]`](#{})", anchor(&format!("[{name}]")));
    }
    s.push('\n');
    for section in sections {
        let name = section.join(".");
        let _ = writeln!(s, "## `[{name}]`\n");
        if let Some(d) = docs.sections.get(&name) {
            let _ = writeln!(s, "{}\n", prose(d));
        }
        if section.iter().any(|p| is_placeholder(p)) {
            let (map, placeholder) = split_placeholder(section);
            let _ = writeln!(
                s,
                "A map of named tables: one `[{}.NAME]` section per entry, where `{placeholder}` \
                 stands for the name you choose.\n",
                map.join(".")
            );
        }
        for key in keys
            .iter()
            .filter(|k| k.path[..k.path.len() - 1] == section[..])
        {
            let dotted = key.path.join(".");
            let _ = writeln!(s, "### `{dotted}`\n\n{}\n", prose(&key.doc.description));
            let leaf = &key.path[key.path.len() - 1];
            let default = key
                .default
                .clone()
                .unwrap_or_else(|| "none: required".to_owned());
            let env = key.env.as_ref().map_or_else(
                || "none (set it in the file)".to_owned(),
                |e| format!("`{e}`"),
            );
            let _ = writeln!(
                s,
                "| type | default | environment variable |\n|---|---|---|\n| {} | {} | {} |\n",
                key.ty.replace('|', "\\|"),
                default.replace('|', "\\|"),
                env
            );
            let written = format!("`{leaf} = {}`", key.doc.value);
            let as_default = key
                .default
                .as_deref()
                .is_some_and(|d| d == format!("`{}`", key.doc.value));
            if key.doc.commented {
                let _ = writeln!(s, "Example: {written}\n");
            } else if !as_default {
                let _ = writeln!(s, "{file} sets {written}.\n");
            }
        }
    }
    s
}

/// GitHub's heading anchor for a heading text.
fn anchor(text: &str) -> String {
    text.chars()
        .filter_map(|c| match c {
            'a'..='z' | '0'..='9' | '_' | '-' => Some(c),
            'A'..='Z' => Some(c.to_ascii_lowercase()),
            ' ' => Some('-'),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    /// docs/config.md is what `edgegate config-reference` prints now.
    #[test]
    fn docs_config_md_is_current() {
        let generated = render().unwrap_or_else(|e| panic!("{e}"));
        let committed = include_str!("../docs/config.md");
        assert!(
            generated == committed,
            "docs/config.md is out of date: run `cargo run -p edgegate -- config-reference > docs/config.md`"
        );
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Toy {
        main: Main,
        services: BTreeMap<String, Service>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Main {
        port: u16,
        name: Option<String>,
        mode: Mode,
        modes: Vec<Mode>,
        cpus: Vec<usize>,
        addr: Option<std::net::SocketAddr>,
    }

    impl Default for Main {
        fn default() -> Self {
            Main {
                port: 80,
                name: None,
                mode: Mode::Fast,
                modes: vec![Mode::Slow],
                cpus: vec![],
                addr: None,
            }
        }
    }

    #[derive(Debug, Clone, Copy, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Fast,
        Slow,
        Careful,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Service {
        url: String,
        #[serde(default = "default_timeout")]
        timeout_ms: u64,
    }

    fn default_timeout() -> u64 {
        500
    }

    const TOY: &str = r#"
[main]
# The port.
port = 8080
# A name. Unset = none.
# name = "x"
# How: "fast" or "slow" <really>.
mode = "fast"
modes = ["slow"]
# CPUs.
cpus = []
# Where.
# addr = "127.0.0.1:1"

# [services.<svc>]
# Where requests go.
# url = "http://127.0.0.1:1/"
# How long to wait.
# timeout_ms = 500
"#;

    #[test]
    fn types_defaults_and_variants_come_from_the_structs() {
        let md = render_for::<Toy>(TOY, "toy.toml", &|_| false).unwrap_or_else(|e| panic!("{e}"));
        assert!(md.contains("### `main.port`\n\nThe port.\n"), "{md}");
        assert!(
            md.contains("| integer ≥ 0 | `80` | `EDGEGATE_MAIN__PORT` |"),
            "{md}"
        );
        assert!(md.contains("toy.toml sets `port = 8080`."), "{md}");
        assert!(
            md.contains("| string | unset | `EDGEGATE_MAIN__NAME` |"),
            "{md}"
        );
        assert!(md.contains("Example: `name = \"x\"`"), "{md}");
        // Variants from the enum, not from the comment (which omits one).
        assert!(
            md.contains("| one of `\"fast\"`, `\"slow\"`, `\"careful\"` | `\"fast\"` |"),
            "{md}"
        );
        // `modes` follows `mode` and shares its comment, escaped.
        assert!(md.contains("### `main.modes`\n\nHow: \"fast\" or \"slow\" \\<really\\>.\n"));
        assert!(
            md.contains("| list of one of `\"fast\"`, `\"slow\"`, `\"careful\"` | `[\"slow\"]` |")
        );
        assert!(md.contains("| list of integer ≥ 0 | `[]` |"), "{md}");
        assert!(
            md.contains("| socket address (string, `ip:port`) | unset |"),
            "{md}"
        );
        // The map: placeholder section, required key, default from serde.
        assert!(md.contains("## `[services.<svc>]`"), "{md}");
        assert!(md.contains("### `services.<svc>.url`"), "{md}");
        assert!(
            md.contains("| string | none: required | none (set it in the file) |"),
            "{md}"
        );
        assert!(
            md.contains("| integer ≥ 0 | `500` | none (set it in the file) |"),
            "{md}"
        );
    }

    #[test]
    fn an_undocumented_key_is_an_error_naming_it() {
        let text = TOY.replace("# CPUs.\ncpus = []\n", "");
        let e = render_for::<Toy>(&text, "toy.toml", &|_| false).err();
        let e = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("`main.cpus` is not in the file"), "{e}");
        // A key without a comment above it, after a blank line.
        let text = TOY.replace("# CPUs.\ncpus = []", "\ncpus = []");
        let e = render_for::<Toy>(&text, "toy.toml", &|_| false)
            .err()
            .map(|e| e.0);
        assert_eq!(
            e,
            Some(vec!["`main.cpus` has no comment above it".to_owned()])
        );
    }

    #[test]
    fn a_map_without_an_example_or_with_a_stray_key_is_an_error() {
        let cut = TOY.find("# [services").unwrap_or(TOY.len());
        let e = render_for::<Toy>(&TOY[..cut], "toy.toml", &|_| false)
            .err()
            .map(|e| e.0);
        let e = e.unwrap_or_default().join("\n");
        assert!(e.contains("`services` is a map of named tables"), "{e}");
        let text = format!("{TOY}# Nothing.\n# retries = 3\n");
        let e = render_for::<Toy>(&text, "toy.toml", &|_| false)
            .err()
            .map(|e| e.0);
        let e = e.unwrap_or_default().join("\n");
        assert!(e.contains("`retries`"), "{e}");
    }

    #[test]
    fn prose_that_looks_like_a_key_is_not_one() {
        let docs = parse_docs(
            "[auth]\n# mode = \"jwt\": the one algorithm accepted\nalgorithm = \"HS256\"\n",
            |_, k| k == "mode" || k == "algorithm",
        );
        assert!(!docs.keys.contains_key("auth.mode"));
        let alg = docs
            .keys
            .get("auth.algorithm")
            .map(|d| d.description.clone());
        assert_eq!(
            alg,
            Some(vec![
                "mode = \"jwt\": the one algorithm accepted".to_owned()
            ])
        );
    }
}
