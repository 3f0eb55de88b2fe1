//! Avro single-object encoding (ADR 0002): `C3 01`, the schema's 8-byte little-endian CRC-64-AVRO
//! (Rabin) fingerprint, then the Avro binary datum. A reader finds the writer's schema by its
//! fingerprint among every version it knows and resolves it to today's schema, so old records stay
//! readable after compatible changes.

use std::collections::HashMap;
use std::sync::OnceLock;

use apache_avro::Schema;
use apache_avro::rabin::Rabin;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;

use super::{Event, EventKind, HISTORY};

/// The most a decoded string, bytes field or collection may take. Kafka refuses records over 1 MiB
/// by default (`max.message.bytes`); this leaves room for brokers set higher.
pub const MAX_DECODED_BYTES: usize = 16 << 20;

/// The two marker bytes that open every single-object encoded record.
pub const MAGIC: [u8; 2] = [0xC3, 0x01];
const HEADER_LEN: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("record is {0} bytes, shorter than the 10-byte single-object header")]
    TooShort(usize),
    #[error("record does not start with the Avro single-object marker C3 01 (got {got:02X?}){hint}")]
    BadMagic { got: [u8; 2], hint: String },
    #[error("no known schema has fingerprint {0}; produce with a schema listed by `secureforms schemas`")]
    UnknownSchema(String),
    #[error("record body does not match schema {schema}: {source}")]
    Body {
        schema: String,
        #[source]
        source: apache_avro::Error,
    },
    #[error("cannot encode {schema}: {source}")]
    Encode {
        schema: String,
        #[source]
        source: apache_avro::Error,
    },
    #[error("{count} bytes follow the {schema} datum; the record was written with another schema or is corrupt")]
    TrailingBytes { schema: String, count: usize },
    #[error("header says event_type {found:?} but the schema is {expected}")]
    TypeMismatch { expected: &'static str, found: String },
}

impl CodecError {
    /// Stable short code for dead-letter records and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CodecError::UnknownSchema(_) => "unknown_schema",
            CodecError::Encode { .. } => "encode",
            _ => "decode",
        }
    }
}

/// One schema version the codec can read.
#[derive(Debug)]
pub struct SchemaEntry {
    pub kind: EventKind,
    pub version: i32,
    pub file: &'static str,
    pub schema: &'static Schema,
    /// CRC-64-AVRO of the specification's Parsing Canonical Form: what every standard Avro library
    /// computes and what this service writes.
    pub fingerprint: [u8; 8],
    /// The fingerprint versions before 0.2 wrote (apache-avro's canonical form keeps logical-type
    /// attributes). Still read, because records carrying it are on the topics.
    pub legacy_fingerprint: [u8; 8],
    pub current: bool,
}

/// Encoder and decoder for every event, built once from the embedded schemas.
pub struct Codec {
    entries: Vec<SchemaEntry>,
    by_fingerprint: HashMap<[u8; 8], usize>,
    current: HashMap<EventKind, usize>,
    /// Built once: resolving a writer schema to the reader schema is the costly part of decoding.
    readers: HashMap<[u8; 8], GenericDatumReader<'static>>,
    writers: HashMap<[u8; 8], GenericDatumWriter<'static>>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec").field("entries", &self.entries).finish_non_exhaustive()
    }
}

/// The codec lives for the whole process, so its schemas do too; leaking them lets the prepared
/// readers and writers borrow them.
fn leak(schema: Schema) -> &'static Schema {
    Box::leak(Box::new(schema))
}

fn legacy_fingerprint(schema: &Schema) -> [u8; 8] {
    let fp = schema.fingerprint::<Rabin>();
    let mut out = [0u8; 8];
    out.copy_from_slice(&fp.bytes[..8]);
    out
}

impl Codec {
    /// The process-wide codec. The schemas are compiled in, so a parse failure is a build defect
    /// caught by the unit tests, not an input error.
    pub fn get() -> &'static Codec {
        static CODEC: OnceLock<Codec> = OnceLock::new();
        CODEC.get_or_init(|| {
            // Before anything is decoded: a length or item count a record claims is refused above
            // this, instead of being allocated (apache-avro allows 512 MiB by default, so a record
            // of a few bytes could make a consumer allocate and zero that much).
            apache_avro::util::max_allocation_bytes(MAX_DECODED_BYTES);
            Codec::build().expect("embedded schemas parse (checked by unit tests)")
        })
    }

    fn build() -> Result<Codec, Box<dyn std::error::Error>> {
        let standard = super::pcf::fingerprint;
        let mut entries = Vec::new();
        for &kind in EventKind::ALL {
            let schema = leak(Schema::parse_str(kind.schema_source())?);
            entries.push(SchemaEntry {
                kind,
                version: kind.version(),
                file: kind.schema_file(),
                fingerprint: standard(kind.schema_source())?,
                legacy_fingerprint: legacy_fingerprint(schema),
                schema,
                current: true,
            });
        }
        for &(kind, version, file, source) in HISTORY {
            let schema = leak(Schema::parse_str(source)?);
            entries.push(SchemaEntry {
                kind,
                version,
                file,
                fingerprint: standard(source)?,
                legacy_fingerprint: legacy_fingerprint(schema),
                schema,
                current: false,
            });
        }
        let by_fingerprint: HashMap<[u8; 8], usize> =
            entries.iter().enumerate().flat_map(|(i, e)| [(e.legacy_fingerprint, i), (e.fingerprint, i)]).collect();
        let current: HashMap<EventKind, usize> =
            entries.iter().enumerate().filter(|(_, e)| e.current).map(|(i, e)| (e.kind, i)).collect();
        let mut readers = HashMap::new();
        let mut writers = HashMap::new();
        for e in &entries {
            let reader_schema = entries[current[&e.kind]].schema;
            // A record written with today's schema is read as it is; resolving it to the same schema
            // would cost a second pass over every value for nothing.
            let resolve_to = (!e.current).then_some(reader_schema);
            for fp in [e.fingerprint, e.legacy_fingerprint] {
                readers.insert(fp, GenericDatumReader::builder(e.schema).maybe_reader_schema(resolve_to).build()?);
            }
            // `encode_value` resolves every value to the schema first, which fails on one that does
            // not fit; validating it again before writing would be a third pass.
            writers.insert(e.fingerprint, GenericDatumWriter::builder(e.schema).validate(false).build()?);
        }
        Ok(Codec { entries, by_fingerprint, current, readers, writers })
    }

    pub fn entries(&self) -> &[SchemaEntry] {
        &self.entries
    }

    pub fn current(&self, kind: EventKind) -> &SchemaEntry {
        &self.entries[self.current[&kind]]
    }

    /// Encodes with the current schema of the event's kind.
    /// The event's fields are written by the schema-aware serializer: one pass, no intermediate
    /// `Value`. It refuses a field that does not fit the schema, as resolving would.
    pub fn encode(&self, event: &Event) -> Result<Vec<u8>, CodecError> {
        let entry = self.current(event.kind());
        let body = event
            .write_avro(&self.writers[&entry.fingerprint])
            .map_err(|source| CodecError::Encode { schema: entry.kind.name().into(), source })?;
        Ok(frame(entry, &body))
    }

    /// Encodes a raw Avro value with a given schema entry (used to write older versions in tests
    /// and tools).
    pub fn encode_value(&self, entry: &SchemaEntry, value: Value) -> Result<Vec<u8>, CodecError> {
        let err = |source| CodecError::Encode { schema: format!("{} v{}", entry.kind.name(), entry.version), source };
        let value = value.resolve(entry.schema).map_err(err)?;
        let body = self.writers[&entry.fingerprint].write_value_to_vec(value).map_err(err)?;
        Ok(frame(entry, &body))
    }

    /// The kind of a single-object encoded record, from its header alone (None if it is not one of
    /// ours).
    pub fn kind_of(&self, bytes: &[u8]) -> Option<EventKind> {
        if bytes.len() < HEADER_LEN || bytes[..2] != MAGIC {
            return None;
        }
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&bytes[2..HEADER_LEN]);
        self.by_fingerprint.get(&fp).map(|&i| self.entries[i].kind)
    }

    /// Decodes to the writer's kind, resolved to the current schema of that kind.
    pub fn decode_value(&self, bytes: &[u8]) -> Result<(EventKind, Value), CodecError> {
        if bytes.len() < HEADER_LEN {
            return Err(CodecError::TooShort(bytes.len()));
        }
        if bytes[..2] != MAGIC {
            return Err(CodecError::BadMagic { got: [bytes[0], bytes[1]], hint: framing_hint(bytes) });
        }
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&bytes[2..HEADER_LEN]);
        let writer = self
            .by_fingerprint
            .get(&fp)
            .map(|&i| &self.entries[i])
            .ok_or_else(|| CodecError::UnknownSchema(hex::encode(fp)))?;
        let mut body = &bytes[HEADER_LEN..];
        let value = self.readers[&fp]
            .read_value(&mut body)
            .map_err(|source| CodecError::Body { schema: writer.kind.name().into(), source })?;
        if !body.is_empty() {
            return Err(CodecError::TrailingBytes { schema: writer.kind.name().into(), count: body.len() });
        }
        Ok((writer.kind, value))
    }

    pub fn decode(&self, bytes: &[u8]) -> Result<Event, CodecError> {
        let (kind, value) = self.decode_value(bytes)?;
        let event = Event::from_avro_value(kind, &value)
            .map_err(|source| CodecError::Body { schema: kind.name().into(), source })?;
        if event.header().event_type != kind.name() {
            return Err(CodecError::TypeMismatch { expected: kind.name(), found: event.header().event_type.clone() });
        }
        Ok(event)
    }
}

/// What a record that is not single-object encoded looks like, to say what its producer should
/// change: the framings other Kafka clients use most.
fn framing_hint(bytes: &[u8]) -> String {
    const FIX: &str = "events are Avro single-object encoded (C3 01, the schema's CRC-64-AVRO fingerprint, the body; ADR 2): produce with a single-object encoder (Java: BinaryMessageEncoder; others: the framing by hand) and a schema from `secureforms schemas`";
    match bytes {
        [0, a, b, c, d, ..] => format!(
            "; it looks like Confluent Schema Registry framing (magic byte 0, schema id {}), which this service does not read; {FIX}",
            u32::from_be_bytes([*a, *b, *c, *d])
        ),
        [b'O', b'b', b'j', 1, ..] => {
            format!("; it looks like an Avro object container file; send one datum per record: {FIX}")
        }
        [b'{' | b'[', ..] => format!("; it looks like JSON; {FIX}"),
        _ => String::new(),
    }
}

/// The single-object framing: magic, the schema's fingerprint, the body.
fn frame(entry: &SchemaEntry, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&entry.fingerprint);
    out.extend_from_slice(body);
    out
}

/// Renders a decoded Avro value as JSON for humans (`secureforms tail`): bytes become base64 strings,
/// unions collapse to their branch value.
pub fn value_to_json(value: &Value) -> serde_json::Value {
    use base64::Engine;
    use serde_json::Value as J;
    match value {
        Value::Null => J::Null,
        Value::Boolean(b) => J::Bool(*b),
        Value::Int(i) | Value::Date(i) | Value::TimeMillis(i) => J::from(*i),
        Value::Long(i) | Value::TimestampMillis(i) | Value::TimestampMicros(i) | Value::TimeMicros(i) => J::from(*i),
        Value::Float(f) => J::from(*f),
        Value::Double(f) => J::from(*f),
        Value::Bytes(b) | Value::Fixed(_, b) => J::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Value::String(s) | Value::Enum(_, s) => J::String(s.clone()),
        Value::Union(_, inner) => value_to_json(inner),
        Value::Array(items) => J::Array(items.iter().map(value_to_json).collect()),
        Value::Map(m) => J::Object(m.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect()),
        Value::Record(fields) => J::Object(fields.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect()),
        Value::Uuid(u) => J::String(u.to_string()),
        other => J::String(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::schema::Schema as S;
    use proptest::prelude::*;

    /// Arbitrary values of a schema, built from the schema itself, so every schema is covered.
    fn arb_value(schema: &Schema) -> BoxedStrategy<Value> {
        match schema {
            S::Null => Just(Value::Null).boxed(),
            S::Boolean => any::<bool>().prop_map(Value::Boolean).boxed(),
            S::Int => any::<i32>().prop_map(Value::Int).boxed(),
            S::Long => any::<i64>().prop_map(Value::Long).boxed(),
            S::TimestampMillis => any::<i64>().prop_map(Value::TimestampMillis).boxed(),
            S::String => "\\PC{0,12}".prop_map(Value::String).boxed(),
            S::Bytes => proptest::collection::vec(any::<u8>(), 0..24).prop_map(Value::Bytes).boxed(),
            S::Array(a) => proptest::collection::vec(arb_value(&a.items), 0..3).prop_map(Value::Array).boxed(),
            S::Union(u) => {
                let branches: Vec<_> = u
                    .variants()
                    .iter()
                    .enumerate()
                    .map(|(i, v)| arb_value(v).prop_map(move |x| Value::Union(i as u32, Box::new(x))).boxed())
                    .collect();
                proptest::strategy::Union::new(branches).boxed()
            }
            S::Record(r) => {
                let fields: Vec<_> = r.fields.iter().map(|f| (Just(f.name.clone()), arb_value(&f.schema))).collect();
                fields.prop_map(Value::Record).boxed()
            }
            other => panic!("the contract uses no {other:?}; add a generator for it"),
        }
    }

    /// Makes the header name the right event type, as every producer does.
    fn with_type(value: Value, kind: EventKind) -> Value {
        let Value::Record(mut fields) = value else { return value };
        for (name, v) in fields.iter_mut() {
            if name == "header"
                && let Value::Record(h) = v
            {
                for (hn, hv) in h.iter_mut() {
                    if hn == "event_type" {
                        *hv = Value::String(kind.name().into());
                    }
                }
            }
        }
        Value::Record(fields)
    }

    fn arb_entry_value() -> impl Strategy<Value = (usize, Value)> {
        let codec = Codec::get();
        let per_entry: Vec<_> = codec
            .entries()
            .iter()
            .enumerate()
            .map(|(i, e)| arb_value(e.schema).prop_map(move |v| (i, v)).boxed())
            .collect();
        proptest::strategy::Union::new(per_entry)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Every schema, current and old: what is written decodes into today's type, and re-encoding
        /// today's type gives the same event back.
        #[test]
        fn every_schema_round_trips((index, value) in arb_entry_value()) {
            let codec = Codec::get();
            let entry = &codec.entries()[index];
            let value = with_type(value, entry.kind);
            let bytes = codec.encode_value(entry, value.clone()).unwrap();
            prop_assert_eq!(&bytes[..2], &MAGIC[..]);
            prop_assert_eq!(&bytes[2..10], &entry.fingerprint[..]);
            let event = codec.decode(&bytes).unwrap();
            prop_assert_eq!(event.kind(), entry.kind);
            let encoded = codec.encode(&event).unwrap();
            let again = codec.decode(&encoded).unwrap();
            prop_assert_eq!(&again, &event);
            // Writing the fields straight through the schema gives the bytes the value path gives.
            let current = codec.current(event.kind());
            let through_value = codec.encode_value(current, event.to_avro_value().unwrap()).unwrap();
            prop_assert_eq!(encoded, through_value);
            if entry.current {
                let (_, decoded) = codec.decode_value(&bytes).unwrap();
                prop_assert_eq!(decoded, value.resolve(entry.schema).unwrap());
            }
        }

        /// Garbage never panics the decoder; it is an error with a reason.
        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Codec::get().decode(&bytes);
        }

        /// A valid header followed by garbage is an error, not a panic.
        #[test]
        fn a_known_fingerprint_with_a_bad_body_is_an_error(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let fp = Codec::get().current(EventKind::FormSent).fingerprint;
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&fp);
            bytes.extend_from_slice(&body);
            let _ = Codec::get().decode(&bytes);
        }
    }

    fn header_value(kind: EventKind) -> Value {
        Value::Record(vec![
            ("event_id".into(), Value::String("e-1".into())),
            ("event_type".into(), Value::String(kind.name().into())),
            ("schema_version".into(), Value::Int(1)),
            ("occurred_at".into(), Value::TimestampMillis(1_700_000_000_000)),
            ("site_id".into(), Value::String("acme".into())),
            ("conversation_id".into(), Value::String("c-1".into())),
            ("correlation_id".into(), Value::String("f-1".into())),
        ])
    }

    #[test]
    fn form_sent_written_with_v1_reads_with_todays_schema_and_defaults() {
        let codec = Codec::get();
        let v1 = codec.entries().iter().find(|e| e.kind == EventKind::FormSent && e.version == 1).expect("v1 is kept");
        assert!(!v1.current);
        let value = Value::Record(vec![
            ("header".into(), header_value(EventKind::FormSent)),
            ("form_id".into(), Value::String("f-1".into())),
            ("agent_id".into(), Value::String("a-7".into())),
            ("template_id".into(), Value::String("card-payment".into())),
        ]);
        let bytes = codec.encode_value(v1, value).unwrap();
        let Event::FormSent(sent) = codec.decode(&bytes).unwrap() else { panic!("not a FormSent") };
        assert_eq!(sent.agent_profile, "agent", "the v2 default applies");
        assert_eq!(sent.visitor_ref, None);
        assert_eq!(sent.form_id, "f-1");
        assert_eq!(sent.header.occurred_at, 1_700_000_000_000);
    }

    #[test]
    fn a_record_claiming_a_huge_length_is_refused_without_allocating_it() {
        let codec = Codec::get();
        let entry = codec.entries().iter().find(|e| e.kind == EventKind::FormSent && e.current).unwrap();
        // The header's first field, a string, claims 400 MB; the record ends there.
        let claimed: i64 = 400_000_000;
        let mut body = Vec::new();
        let mut n = ((claimed << 1) ^ (claimed >> 63)) as u64;
        while n >= 0x80 {
            body.push((n as u8) | 0x80);
            n >>= 7;
        }
        body.push(n as u8);
        let err = codec.decode(&frame(entry, &body)).unwrap_err();
        assert!(matches!(err, CodecError::Body { .. }), "{err:?}");
        let text = format!("{err} {:?}", std::error::Error::source(&err));
        assert!(text.contains("400000000") && text.contains(&MAX_DECODED_BYTES.to_string()), "{text}");
    }

    #[test]
    fn framing_errors_say_what_is_wrong() {
        let codec = Codec::get();
        assert!(matches!(codec.decode(b"short"), Err(CodecError::TooShort(5))));
        let json = codec.decode(b"{\"json\": \"not avro\"}").unwrap_err();
        assert!(matches!(json, CodecError::BadMagic { .. }));
        assert!(
            json.to_string().contains("looks like JSON") && json.to_string().contains("secureforms schemas"),
            "{json}"
        );
        // Confluent's serializers frame a datum as magic 0, a 4-byte schema id, the body.
        let confluent = codec.decode(&[0, 0, 0, 0, 42, 2, 4, 6, 8, 10, 12]).unwrap_err();
        assert!(
            confluent.to_string().contains("Confluent Schema Registry framing (magic byte 0, schema id 42)"),
            "{confluent}"
        );
        let container = codec.decode(b"Obj\x01 and then a header").unwrap_err();
        assert!(container.to_string().contains("object container file"), "{container}");
        let other = codec.decode(&[0xC3, 0x02, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert_eq!(other.to_string(), "record does not start with the Avro single-object marker C3 01 (got [C3, 02])");
        let mut unknown = MAGIC.to_vec();
        unknown.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 0]);
        let e = codec.decode(&unknown).unwrap_err();
        assert_eq!(e.kind(), "unknown_schema");
        assert!(e.to_string().contains("0102030405060708"));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let codec = Codec::get();
        let v = Value::Record(vec![
            ("header".into(), header_value(EventKind::ConversationClosed)),
            ("closed_by".into(), Value::String("agent".into())),
            ("reason".into(), Value::String("done".into())),
        ]);
        let mut bytes = codec.encode_value(codec.current(EventKind::ConversationClosed), v).unwrap();
        assert!(codec.decode(&bytes).is_ok());
        bytes.push(0);
        assert!(matches!(codec.decode(&bytes), Err(CodecError::TrailingBytes { count: 1, .. })));
    }

    #[test]
    fn a_header_naming_another_type_is_refused() {
        let codec = Codec::get();
        let v = Value::Record(vec![
            ("header".into(), header_value(EventKind::FormSent)),
            ("closed_by".into(), Value::String("agent".into())),
            ("reason".into(), Value::String("done".into())),
        ]);
        let bytes = codec.encode_value(codec.current(EventKind::ConversationClosed), v).unwrap();
        assert!(matches!(codec.decode(&bytes), Err(CodecError::TypeMismatch { .. })));
    }

    /// Fingerprints the Java Avro library computed (SchemaNormalization.parsingFingerprint64 over
    /// each schema file, by tests/interop/Fingerprints.java), one `file fingerprint-hex` per line,
    /// the hex in the byte order the single-object header carries.
    #[test]
    fn fingerprints_are_those_the_java_avro_library_computes() {
        let vectors = include_str!("../../tests/vectors/avro-fingerprints.txt");
        let mut checked = 0;
        for line in vectors.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (file, hex_fp) = line.split_once(' ').expect("`file fingerprint` lines");
            let entry = Codec::get()
                .entries()
                .iter()
                .find(|e| format!("schemas/{}", e.file) == file)
                .unwrap_or_else(|| panic!("no schema {file}"));
            assert_eq!(hex::encode(entry.fingerprint), hex_fp.trim(), "{file}");
            checked += 1;
        }
        assert_eq!(checked, Codec::get().entries().len(), "every schema has a vector");
    }

    #[test]
    fn records_written_with_the_legacy_fingerprint_still_decode() {
        let codec = Codec::get();
        let entry = codec.current(EventKind::ConversationClosed);
        let v = Value::Record(vec![
            ("header".into(), header_value(EventKind::ConversationClosed)),
            ("closed_by".into(), Value::String("agent".into())),
            ("reason".into(), Value::String("done".into())),
        ]);
        let mut bytes = codec.encode_value(entry, v).unwrap();
        assert_eq!(&bytes[2..10], &entry.fingerprint[..]);
        bytes[2..10].copy_from_slice(&entry.legacy_fingerprint);
        assert_eq!(codec.decode(&bytes).unwrap().kind(), EventKind::ConversationClosed);
    }

    #[test]
    fn fingerprints_are_unique_and_every_kind_has_a_current_schema() {
        let codec = Codec::get();
        let mut seen = std::collections::BTreeSet::new();
        for e in codec.entries() {
            assert!(seen.insert(e.fingerprint), "{} v{} shares a fingerprint", e.kind.name(), e.version);
            assert!(seen.insert(e.legacy_fingerprint), "{} v{} shares a legacy fingerprint", e.kind.name(), e.version);
        }
        for &k in EventKind::ALL {
            let cur = codec.current(k);
            assert_eq!(cur.version, k.version());
            let S::Record(r) = cur.schema else { panic!("{} is not a record", k.name()) };
            assert_eq!(r.name.name(), k.name(), "schema file of {} names another record", k.name());
            assert_eq!(r.fields[0].name, "header", "{} must start with the header", k.name());
        }
    }
}
