//! Server-side validation of a visitor's answers, for every question kind. The page may help in the
//! browser; this decides. Pure: the current month is passed in.

use std::collections::BTreeMap;

use crate::domain::template::{QuestionKind, QuestionSpec, Template};

/// Free-text limits when the template sets none.
pub const SHORT_TEXT_MAX: usize = 200;
pub const LONG_TEXT_MAX: usize = 2000;

/// Card brands recognised from the number's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardBrand {
    Visa,
    Mastercard,
    Amex,
    Discover,
    Jcb,
    DinersClub,
    UnionPay,
    Maestro,
    Unknown,
}

impl CardBrand {
    pub fn name(self) -> &'static str {
        match self {
            CardBrand::Visa => "Visa",
            CardBrand::Mastercard => "Mastercard",
            CardBrand::Amex => "American Express",
            CardBrand::Discover => "Discover",
            CardBrand::Jcb => "JCB",
            CardBrand::DinersClub => "Diners Club",
            CardBrand::UnionPay => "UnionPay",
            CardBrand::Maestro => "Maestro",
            CardBrand::Unknown => "card",
        }
    }
}

pub fn luhn_valid(digits: &str) -> bool {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = (b - b'0') as u32;
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

pub fn card_brand(digits: &str) -> CardBrand {
    let p = |n: usize| digits.get(..n).and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
    match () {
        _ if digits.starts_with('4') => CardBrand::Visa,
        _ if (51..=55).contains(&p(2)) || (2221..=2720).contains(&p(4)) => CardBrand::Mastercard,
        _ if p(2) == 34 || p(2) == 37 => CardBrand::Amex,
        _ if p(4) == 6011 || p(2) == 65 || (644..=649).contains(&p(3)) => CardBrand::Discover,
        _ if (3528..=3589).contains(&p(4)) => CardBrand::Jcb,
        _ if p(2) == 36 || p(2) == 38 || (300..=305).contains(&p(3)) => CardBrand::DinersClub,
        _ if p(2) == 62 => CardBrand::UnionPay,
        _ if [50, 56, 57, 58, 63, 67].contains(&p(2)) => CardBrand::Maestro,
        _ => CardBrand::Unknown,
    }
}

/// A year and month, for card expiry checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct YearMonth {
    pub year: i32,
    pub month: u8,
}

/// One field's problem, worded for the visitor: what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// The normalized answers (card numbers without spaces, multiple choices joined with ", ").
pub type Answers = BTreeMap<String, String>;

fn err(q: &QuestionSpec, message: impl Into<String>) -> FieldError {
    FieldError { field: q.id.clone(), message: message.into() }
}

fn digits_only(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace() && *c != '-').collect()
}

/// Validates one raw answer; returns the normalized value.
fn check(q: &QuestionSpec, raw: &[String], now: YearMonth) -> Result<String, FieldError> {
    let label = &q.label;
    if q.kind == QuestionKind::MultipleChoice {
        let picked: Vec<&String> = raw.iter().filter(|v| !v.is_empty()).collect();
        if picked.is_empty() {
            return if q.required {
                Err(err(q, format!("Select at least one option for {label}")))
            } else {
                Ok(String::new())
            };
        }
        if let Some(bad) = picked.iter().find(|v| !q.choices.contains(v)) {
            return Err(err(q, format!("{bad:?} is not one of the options for {label}")));
        }
        return Ok(picked.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "));
    }
    if raw.len() > 1 {
        return Err(err(q, format!("{label} takes one answer")));
    }
    let value = raw.first().map(|s| s.trim()).unwrap_or("");
    if value.is_empty() {
        return if q.required {
            Err(err(
                q,
                match q.kind {
                    QuestionKind::SingleChoice | QuestionKind::YesNo => format!("Select an answer for {label}"),
                    _ => format!("{label} is required"),
                },
            ))
        } else {
            Ok(String::new())
        };
    }
    let len = value.chars().count();
    if let Some(min) = q.min_length
        && len < min as usize
    {
        return Err(err(q, format!("{label} must be at least {min} characters")));
    }
    let default_max = if q.kind == QuestionKind::LongText { LONG_TEXT_MAX } else { SHORT_TEXT_MAX };
    let max = q.max_length.map(|m| m as usize).unwrap_or(default_max);
    if len > max {
        return Err(err(q, format!("{label} must be {max} characters or fewer")));
    }
    let normalized = match q.kind {
        QuestionKind::ShortText | QuestionKind::LongText | QuestionKind::SecretAnswer => {
            if value.chars().any(|c| c.is_control() && c != '\n' && c != '\r' && c != '\t') {
                return Err(err(q, format!("{label} contains characters that cannot be used")));
            }
            value.to_string()
        }
        QuestionKind::Number => {
            if value.parse::<f64>().map(|f| f.is_finite()).unwrap_or(false)
                && value.chars().all(|c| c.is_ascii_digit() || "+-.".contains(c))
            {
                value.to_string()
            } else {
                return Err(err(q, format!("{label} must be a number, like 42 or 3.5")));
            }
        }
        QuestionKind::Email => {
            let ok = regex::Regex::new(r"^[^@\s<>()\\'\x22&]+@[^@\s<>()\\'\x22&]+\.[A-Za-z]{2,}$")
                .expect("static regex")
                .is_match(value);
            if !ok {
                return Err(err(q, format!("Enter {} in the format name@example.com", label.to_lowercase())));
            }
            value.to_string()
        }
        QuestionKind::Phone => {
            let digits = value.chars().filter(|c| c.is_ascii_digit()).count();
            if !value.chars().all(|c| c.is_ascii_digit() || " +-.()".contains(c)) || !(7..=15).contains(&digits) {
                return Err(err(
                    q,
                    format!("Enter {} with 7 to 15 digits, like +1 555 010 0199", label.to_lowercase()),
                ));
            }
            value.to_string()
        }
        QuestionKind::Date => {
            let fmt = time::macros::format_description!("[year]-[month]-[day]");
            if time::Date::parse(value, &fmt).is_err() {
                return Err(err(q, format!("{label} must be a real date in the format YYYY-MM-DD, like 2026-03-31")));
            }
            value.to_string()
        }
        QuestionKind::MultipleChoice => unreachable!("multiple choice is handled above"),
        QuestionKind::SingleChoice => {
            if !q.choices.iter().any(|c| c == value) {
                return Err(err(q, format!("Select one of the options for {label}")));
            }
            value.to_string()
        }
        QuestionKind::YesNo => match value {
            "yes" | "no" => value.to_string(),
            _ => return Err(err(q, format!("Select Yes or No for {label}"))),
        },
        QuestionKind::CardNumber => {
            let d = digits_only(value);
            if !d.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(q, format!("{label} can only contain digits and spaces")));
            }
            if !(12..=19).contains(&d.len()) {
                return Err(err(q, format!("{label} must be between 12 and 19 digits")));
            }
            if !luhn_valid(&d) {
                return Err(err(q, format!("{label} is not valid: check the digits you entered")));
            }
            d
        }
        QuestionKind::CardExpiry => {
            let parsed = parse_expiry(value)
                .ok_or_else(|| err(q, format!("Enter {} as MM/YY, like 04/29", label.to_lowercase())))?;
            if parsed < now {
                return Err(err(q, format!("{label} must be this month or later; this card has expired")));
            }
            format!("{:02}/{:04}", parsed.month, parsed.year)
        }
        QuestionKind::Cvv => {
            if !(3..=4).contains(&value.len()) || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(q, format!("{label} must be the 3 or 4 digits printed on your card")));
            }
            value.to_string()
        }
        QuestionKind::Ssn => {
            let d = digits_only(value);
            let valid = d.len() == 9
                && d.bytes().all(|b| b.is_ascii_digit())
                && !matches!(&d[..3], "000" | "666")
                && !d.starts_with('9')
                && &d[3..5] != "00"
                && &d[5..] != "0000";
            if !valid {
                return Err(err(q, format!("Enter a valid {} with 9 digits, like 123-45-6789", label)));
            }
            format!("{}-{}-{}", &d[..3], &d[3..5], &d[5..])
        }
        QuestionKind::Pin => {
            if !(4..=12).contains(&value.len()) || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(q, format!("{label} must be 4 to 12 digits")));
            }
            value.to_string()
        }
    };
    if let Some(p) = &q.pattern {
        let re = regex::Regex::new(&format!("^(?:{p})$"))
            .map_err(|_| err(q, "This question cannot be answered right now"))?;
        if !re.is_match(&normalized) {
            return Err(err(q, format!("{label} is not in the expected format")));
        }
    }
    Ok(normalized)
}

fn parse_expiry(value: &str) -> Option<YearMonth> {
    let (m, y) = value.split_once('/')?;
    let month: u8 = m.trim().parse().ok()?;
    let y = y.trim();
    let year: i32 = match y.len() {
        2 => 2000 + y.parse::<i32>().ok()?,
        4 => y.parse().ok()?,
        _ => return None,
    };
    ((1..=12).contains(&month) && y.bytes().all(|b| b.is_ascii_digit())).then_some(YearMonth { year, month })
}

/// Validates every answer of a submission. `raw` holds each field's submitted values (several for
/// multiple choice). Returns the normalized answers, or every problem in question order.
pub fn validate(
    template: &Template,
    raw: &BTreeMap<String, Vec<String>>,
    now: YearMonth,
) -> Result<Answers, Vec<FieldError>> {
    let mut answers = Answers::new();
    let mut errors = Vec::new();
    let empty = Vec::new();
    for q in &template.questions {
        match check(q, raw.get(&q.id).unwrap_or(&empty), now) {
            Ok(v) => {
                answers.insert(q.id.clone(), v);
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() { Ok(answers) } else { Err(errors) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: YearMonth = YearMonth { year: 2026, month: 11 };

    fn q(kind: QuestionKind) -> QuestionSpec {
        QuestionSpec { choices: vec!["Email".into(), "Phone".into()], ..QuestionSpec::required("f", "Field", kind) }
    }

    fn one(kind: QuestionKind, v: &str) -> Result<String, FieldError> {
        check(&q(kind), &[v.to_string()], NOW)
    }

    fn with_check_digit(body: &str) -> String {
        (0..10).map(|d| format!("{body}{d}")).find(|c| luhn_valid(c)).unwrap()
    }

    proptest! {
        #[test]
        fn a_number_with_its_check_digit_passes_and_one_changed_digit_fails(body in "[0-9]{11,18}", pos in 0usize..18, delta in 1u8..10) {
            let pan = with_check_digit(&body);
            prop_assert!(luhn_valid(&pan));
            prop_assert_eq!(one(QuestionKind::CardNumber, &pan), Ok(pan.clone()));
            let pos = pos % pan.len();
            let mut bytes = pan.into_bytes();
            bytes[pos] = b'0' + (bytes[pos] - b'0' + delta) % 10;
            let changed = String::from_utf8(bytes).unwrap();
            prop_assert!(!luhn_valid(&changed), "a single changed digit is always caught by Luhn");
        }

        #[test]
        fn card_numbers_are_normalized_from_spaces_and_dashes(body in "[0-9]{15}") {
            let pan = with_check_digit(&body);
            let spaced = format!("{} {}-{} {}", &pan[..4], &pan[4..8], &pan[8..12], &pan[12..]);
            prop_assert_eq!(one(QuestionKind::CardNumber, &spaced), Ok(pan));
        }

        #[test]
        fn expiry_is_accepted_exactly_from_the_current_month(year in 2000i32..2100, month in 1u8..=12) {
            let result = one(QuestionKind::CardExpiry, &format!("{month:02}/{year}"));
            let future = YearMonth { year, month } >= NOW;
            prop_assert_eq!(result.is_ok(), future, "{:02}/{} vs {:?}", month, year, NOW);
        }

        #[test]
        fn no_input_ever_panics_a_validator(v in "\\PC{0,40}", k in 0usize..15) {
            let kinds = [QuestionKind::ShortText, QuestionKind::LongText, QuestionKind::Number, QuestionKind::Email, QuestionKind::Phone,
                QuestionKind::Date, QuestionKind::SingleChoice, QuestionKind::MultipleChoice, QuestionKind::YesNo, QuestionKind::CardNumber,
                QuestionKind::CardExpiry, QuestionKind::Cvv, QuestionKind::Ssn, QuestionKind::Pin, QuestionKind::SecretAnswer];
            let _ = one(kinds[k], &v);
        }
    }

    #[test]
    fn every_kind_accepts_good_answers_and_refuses_bad_ones_with_a_fix() {
        use QuestionKind::*;
        let cases: &[(QuestionKind, &str, &str)] = &[
            (Number, "42.5", "forty"),
            (Email, "ada@example.com", "ada@"),
            (Phone, "+1 (555) 010-0199", "12"),
            (Date, "2026-02-28", "2026-02-30"),
            (SingleChoice, "Email", "Fax"),
            (YesNo, "yes", "maybe"),
            (CardNumber, "4111 1111 1111 1111", "4111 1111 1111 1112"),
            (CardExpiry, "11/26", "10/26"),
            (Cvv, "1234", "12a"),
            (Ssn, "123-45-6789", "666-45-6789"),
            (Pin, "0000", "12"),
            (SecretAnswer, "my first dog", ""),
        ];
        for (kind, good, bad) in cases {
            assert!(one(*kind, good).is_ok(), "{kind:?} should accept {good:?}: {:?}", one(*kind, good));
            let e = one(*kind, bad).expect_err(&format!("{kind:?} should refuse {bad:?}"));
            assert!(e.message.contains("Field") || e.message.contains("field"), "{kind:?}: {}", e.message);
        }
        assert_eq!(one(CardExpiry, "4/2031").unwrap(), "04/2031");
        assert_eq!(one(Ssn, "123456789").unwrap(), "123-45-6789");
        assert!(one(CardNumber, "4111111111").unwrap_err().message.contains("12 and 19"));
    }

    #[test]
    fn brands_are_detected() {
        assert_eq!(card_brand("4111111111111111"), CardBrand::Visa);
        assert_eq!(card_brand("5500000000000004"), CardBrand::Mastercard);
        assert_eq!(card_brand("2223003122003222"), CardBrand::Mastercard);
        assert_eq!(card_brand("378282246310005"), CardBrand::Amex);
        assert_eq!(card_brand("6011111111111117"), CardBrand::Discover);
        assert_eq!(card_brand("3530111333300000"), CardBrand::Jcb);
        assert_eq!(card_brand("9999999999999995"), CardBrand::Unknown);
    }

    #[test]
    fn forbidden_characters_are_kept_in_free_text_and_refused_where_the_type_demands() {
        let text = r#"<b>"Tom" & Jerry's (show) \o/</b>"#;
        assert_eq!(one(QuestionKind::ShortText, text).unwrap(), text, "escaped on output, not refused");
        assert!(one(QuestionKind::Email, "a<b@example.com").is_err());
        assert!(one(QuestionKind::Number, "1&2").is_err());
    }

    #[test]
    fn required_length_pattern_and_choices_are_enforced() {
        let mut optional = q(QuestionKind::ShortText);
        optional.required = false;
        assert_eq!(check(&optional, &[], NOW), Ok(String::new()));
        assert_eq!(check(&q(QuestionKind::ShortText), &[], NOW).unwrap_err().message, "Field is required");
        let mut bounded = q(QuestionKind::ShortText);
        bounded.min_length = Some(3);
        bounded.max_length = Some(5);
        assert!(check(&bounded, &["ab".into()], NOW).is_err());
        assert!(check(&bounded, &["abcdef".into()], NOW).is_err());
        let mut patterned = q(QuestionKind::ShortText);
        patterned.pattern = Some("[A-Z]{2}[0-9]{4}".into());
        assert!(check(&patterned, &["AB1234".into()], NOW).is_ok());
        assert!(check(&patterned, &["AB1234x".into()], NOW).is_err(), "the whole answer must match");
        let multi = q(QuestionKind::MultipleChoice);
        assert_eq!(check(&multi, &["Email".into(), "Phone".into()], NOW).unwrap(), "Email, Phone");
        assert!(check(&multi, &["Email".into(), "Fax".into()], NOW).is_err());
        assert!(check(&q(QuestionKind::ShortText), &["a".into(), "b".into()], NOW).is_err(), "one answer per field");
    }
}
