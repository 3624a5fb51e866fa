//! `SMARTGATE__SECTION__KEY=value` overrides, applied to the parsed TOML table before it is
//! typed, so an override is validated exactly like the file (unknown keys included).
//!
//! Levels are separated by a double underscore and lower-cased:
//! `SMARTGATE__SERVER__TLS__CERT` sets `server.tls.cert`. Inside `upstream.headers` single
//! underscores become hyphens (`…__HEADERS__X_API_KEY` sets `X-Api-Key`), since most shells
//! cannot export names with hyphens.
//!
//! Values: header values, and keys where the file already has a string, are strings. Otherwise
//! `true`/`false` are booleans, integers are integers, and a value starting with `[`, `{` or
//! `"` is read as a TOML value (`["RS256","ES384"]`); anything else is a string.

const PREFIX: &str = "SMARTGATE__";

/// Sections whose keys are header names.
const HEADER_MAPS: &[&[&str]] = &[&["upstream", "headers"]];

/// Applies overrides; returns `(dotted key, variable name)` for each one applied.
pub(super) fn apply(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(String, String)>, (String, String)> {
    let mut applied = Vec::new();
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .collect();
    // Deterministic order, so two variables for one key always resolve the same way.
    vars.sort();
    for (var, raw) in vars {
        let mut path: Vec<String> = var[PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err((
                var,
                "has an empty level (use exactly two underscores)".into(),
            ));
        }
        let parent_len = path.len() - 1;
        let header = HEADER_MAPS.iter().any(|m| path[..parent_len] == m[..]);
        if header {
            path[parent_len] = path[parent_len].replace('_', "-");
        }
        set(table, &path, &raw, header).map_err(|m| (var.clone(), m))?;
        applied.push((path.join("."), var));
    }
    Ok(applied)
}

fn set(
    table: &mut toml::Table,
    path: &[String],
    raw: &str,
    always_string: bool,
) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("names no key")?;
    let mut cur = table;
    for (i, part) in parents.iter().enumerate() {
        let entry = cur
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("{} is not a section", path[..=i].join(".")))?;
    }
    let existing_is_string = matches!(cur.get(last), Some(toml::Value::String(_)));
    cur.insert(
        last.clone(),
        typed(raw, always_string || existing_is_string)?,
    );
    Ok(())
}

fn typed(raw: &str, as_string: bool) -> Result<toml::Value, String> {
    if as_string {
        return Ok(toml::Value::String(raw.to_owned()));
    }
    match raw {
        "true" => return Ok(toml::Value::Boolean(true)),
        "false" => return Ok(toml::Value::Boolean(false)),
        _ => {}
    }
    if let Ok(n) = raw.parse::<i64>() {
        return Ok(toml::Value::Integer(n));
    }
    if raw.starts_with(['[', '{', '"']) {
        let doc: toml::Table = toml::from_str(&format!("v = {raw}"))
            .map_err(|e| format!("{raw:?} is not a TOML value: {}", e.message()))?;
        return doc
            .get("v")
            .cloned()
            .ok_or_else(|| "empty value".to_owned());
    }
    Ok(toml::Value::String(raw.to_owned()))
}
