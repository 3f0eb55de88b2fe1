//! The Avro specification's Parsing Canonical Form and its CRC-64-AVRO fingerprint, which the
//! single-object header carries (ADR 2, ADR 14). Written against the specification's rules
//! (PRIMITIVES, FULLNAMES, STRIP, ORDER, STRINGS, INTEGERS, WHITESPACE) because the form apache-avro
//! computes keeps logical-type attributes (`{"type":"long"}` where the specification has `"long"`),
//! so its fingerprints differ from those of the Java library, fastavro and every other standard one.
//! Checked against vectors computed by the Java Avro library (tests/vectors/avro-fingerprints.txt).

use std::collections::HashSet;

use digest::Digest;
use serde_json::Value;

const PRIMITIVES: &[&str] = &["null", "boolean", "int", "long", "float", "double", "bytes", "string"];

#[derive(Debug, thiserror::Error)]
pub enum PcfError {
    #[error("schema is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("schema is not valid Avro: {0}")]
    Invalid(String),
}

/// The Parsing Canonical Form of a schema given as JSON text.
pub fn parsing_canonical_form(schema_json: &str) -> Result<String, PcfError> {
    let value: Value = serde_json::from_str(schema_json)?;
    let mut out = String::with_capacity(schema_json.len() / 2);
    write(&value, "", &mut HashSet::new(), &mut out)?;
    Ok(out)
}

/// CRC-64-AVRO of the Parsing Canonical Form, as the single-object header stores it (little-endian).
pub fn fingerprint(schema_json: &str) -> Result<[u8; 8], PcfError> {
    let form = parsing_canonical_form(schema_json)?;
    let digest = apache_avro::rabin::Rabin::digest(form.as_bytes());
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    Ok(out)
}

fn quote(s: &str, out: &mut String) {
    // serde_json escapes only what JSON requires, so other characters stay as their UTF-8 [STRINGS].
    out.push_str(&serde_json::to_string(s).expect("a string serializes"));
}

fn fullname(name: &str, namespace: &str) -> String {
    if name.contains('.') || namespace.is_empty() { name.to_string() } else { format!("{namespace}.{name}") }
}

fn namespace_of(fullname: &str) -> &str {
    fullname.rsplit_once('.').map(|(ns, _)| ns).unwrap_or("")
}

fn field<'a>(m: &'a serde_json::Map<String, Value>, key: &str) -> Result<&'a Value, PcfError> {
    m.get(key).ok_or_else(|| PcfError::Invalid(format!("missing {key:?}")))
}

fn str_field<'a>(m: &'a serde_json::Map<String, Value>, key: &str) -> Result<&'a str, PcfError> {
    field(m, key)?.as_str().ok_or_else(|| PcfError::Invalid(format!("{key:?} is not a string")))
}

fn write(v: &Value, ns: &str, seen: &mut HashSet<String>, out: &mut String) -> Result<(), PcfError> {
    match v {
        Value::String(s) if PRIMITIVES.contains(&s.as_str()) => quote(s, out),
        // A reference to a named type defined earlier [FULLNAMES].
        Value::String(s) => quote(&fullname(s, ns), out),
        Value::Array(branches) => {
            out.push('[');
            for (i, b) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(b, ns, seen, out)?;
            }
            out.push(']');
        }
        Value::Object(m) => match field(m, "type")? {
            // {"type": "long", "logicalType": ...} and any other primitive object [PRIMITIVES, STRIP].
            Value::String(t) if PRIMITIVES.contains(&t.as_str()) => quote(t, out),
            Value::String(t) if matches!(t.as_str(), "record" | "error" | "enum" | "fixed") => {
                let name = str_field(m, "name")?;
                let enclosing = m.get("namespace").and_then(Value::as_str).unwrap_or(ns);
                let full = fullname(name, enclosing);
                if !seen.insert(full.clone()) {
                    quote(&full, out);
                    return Ok(());
                }
                out.push_str("{\"name\":");
                quote(&full, out);
                out.push_str(",\"type\":");
                quote(t, out);
                match t.as_str() {
                    "enum" => {
                        out.push_str(",\"symbols\":[");
                        let symbols =
                            field(m, "symbols")?.as_array().ok_or_else(|| PcfError::Invalid("symbols".into()))?;
                        for (i, s) in symbols.iter().enumerate() {
                            if i > 0 {
                                out.push(',');
                            }
                            quote(s.as_str().ok_or_else(|| PcfError::Invalid("symbol".into()))?, out);
                        }
                        out.push(']');
                    }
                    "fixed" => {
                        let size = field(m, "size")?.as_u64().ok_or_else(|| PcfError::Invalid("size".into()))?;
                        out.push_str(&format!(",\"size\":{size}"));
                    }
                    _ => {
                        out.push_str(",\"fields\":[");
                        let fields =
                            field(m, "fields")?.as_array().ok_or_else(|| PcfError::Invalid("fields".into()))?;
                        let inner = namespace_of(&full).to_string();
                        for (i, f) in fields.iter().enumerate() {
                            let f = f.as_object().ok_or_else(|| PcfError::Invalid("field".into()))?;
                            if i > 0 {
                                out.push(',');
                            }
                            out.push_str("{\"name\":");
                            quote(str_field(f, "name")?, out);
                            out.push_str(",\"type\":");
                            write(field(f, "type")?, &inner, seen, out)?;
                            out.push('}');
                        }
                        out.push(']');
                    }
                }
                out.push('}');
            }
            Value::String(t) if t == "array" => {
                out.push_str("{\"type\":\"array\",\"items\":");
                write(field(m, "items")?, ns, seen, out)?;
                out.push('}');
            }
            Value::String(t) if t == "map" => {
                out.push_str("{\"type\":\"map\",\"values\":");
                write(field(m, "values")?, ns, seen, out)?;
                out.push('}');
            }
            // {"type": "SomeNamedType"} or {"type": {...}}: the type itself.
            other => write(other, ns, seen, out)?,
        },
        other => return Err(PcfError::Invalid(format!("unexpected {other}"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logical_types_reduce_to_their_primitive_and_attributes_are_stripped() {
        let schema = r#"{"type":"record","name":"R","namespace":"a.b","doc":"x","fields":[
            {"name":"t","type":{"type":"long","logicalType":"timestamp-millis"},"doc":"d","default":0},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y"]}},
            {"name":"again","type":["null","E"]},
            {"name":"m","type":{"type":"map","values":{"type":"array","items":"string"}}},
            {"name":"f","type":{"type":"fixed","name":"c.F","size":16}}]}"#;
        assert_eq!(
            parsing_canonical_form(schema).unwrap(),
            r#"{"name":"a.b.R","type":"record","fields":[{"name":"t","type":"long"},{"name":"e","type":{"name":"a.b.E","type":"enum","symbols":["X","Y"]}},{"name":"again","type":["null","a.b.E"]},{"name":"m","type":{"type":"map","values":{"type":"array","items":"string"}}},{"name":"f","type":{"name":"c.F","type":"fixed","size":16}}]}"#
        );
    }

    #[test]
    fn primitive_schemas_have_the_fingerprints_the_java_library_computes() {
        // CRC-64-AVRO of primitive schemas, as the Java library computes them
        // (SchemaNormalization.parsingFingerprint64), printed as the signed 64-bit value.
        for (schema, expected) in [
            (r#""int""#, 8_247_732_601_305_521_295_i64),
            (r#"{"type":"string"}"#, -8_142_146_995_180_207_161),
            (r#""null""#, 7_195_948_357_588_979_594),
        ] {
            let fp = fingerprint(schema).unwrap();
            assert_eq!(i64::from_le_bytes(fp), expected, "{schema}");
        }
    }
}
