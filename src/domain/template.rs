//! Form templates: what a site asks its visitors, as configured and as carried by
//! FormTemplateDefined. Validation of the template itself lives here; validation of answers comes
//! with the visitor gateway.

use serde::{Deserialize, Serialize};

use crate::events;

pub const MAX_QUESTIONS: usize = 20;

/// The question types a template may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuestionKind {
    ShortText,
    LongText,
    Number,
    Email,
    Phone,
    Date,
    SingleChoice,
    MultipleChoice,
    YesNo,
    CardNumber,
    CardExpiry,
    Cvv,
    Ssn,
    Pin,
    SecretAnswer,
}

impl QuestionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            QuestionKind::ShortText => "short_text",
            QuestionKind::LongText => "long_text",
            QuestionKind::Number => "number",
            QuestionKind::Email => "email",
            QuestionKind::Phone => "phone",
            QuestionKind::Date => "date",
            QuestionKind::SingleChoice => "single_choice",
            QuestionKind::MultipleChoice => "multiple_choice",
            QuestionKind::YesNo => "yes_no",
            QuestionKind::CardNumber => "card_number",
            QuestionKind::CardExpiry => "card_expiry",
            QuestionKind::Cvv => "cvv",
            QuestionKind::Ssn => "ssn",
            QuestionKind::Pin => "pin",
            QuestionKind::SecretAnswer => "secret_answer",
        }
    }

    pub fn parse(s: &str) -> Option<QuestionKind> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }

    /// Sensitive authentication data PCI DSS forbids storing after authorisation, encrypted or not
    /// (3.3.1.2 card verification code, 3.3.1.3 PIN), is off the record whatever the template says:
    /// held in memory for its TTL, never sealed into the vault. PINs and secret answers are masked.
    pub fn forces_off_record(self) -> bool {
        matches!(self, QuestionKind::Cvv | QuestionKind::Pin)
    }

    pub fn forces_masked(self) -> bool {
        matches!(self, QuestionKind::Cvv | QuestionKind::Pin | QuestionKind::SecretAnswer)
    }

    /// Kinds whose answers are never shown back to the visitor, not even on a page that asks to
    /// correct another field: card numbers, SSNs, PINs, CVVs and secret answers.
    pub fn is_sensitive(self) -> bool {
        matches!(
            self,
            QuestionKind::CardNumber
                | QuestionKind::Cvv
                | QuestionKind::Ssn
                | QuestionKind::Pin
                | QuestionKind::SecretAnswer
        )
    }

    pub fn has_choices(self) -> bool {
        matches!(self, QuestionKind::SingleChoice | QuestionKind::MultipleChoice)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuestionSpec {
    pub id: String,
    pub label: String,
    pub kind: QuestionKind,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub masked: bool,
    #[serde(default)]
    pub off_record: bool,
    pub help: Option<String>,
    pub min_length: Option<u32>,
    pub max_length: Option<u32>,
    pub pattern: Option<String>,
    #[serde(default)]
    pub choices: Vec<String>,
    /// The HTML autocomplete token for the input (WCAG 1.3.5), e.g. `cc-name` for the cardholder.
    /// Kinds with a token of their own (card number, expiry, CVV, email, phone) need none.
    #[serde(default)]
    pub autocomplete: Option<String>,
}

/// The autocomplete tokens a question may declare (the HTML purposes that fit a secure form).
pub const AUTOCOMPLETE_TOKENS: &[&str] = &[
    "off",
    "name",
    "honorific-prefix",
    "given-name",
    "additional-name",
    "family-name",
    "honorific-suffix",
    "nickname",
    "organization",
    "street-address",
    "address-line1",
    "address-line2",
    "address-line3",
    "address-level1",
    "address-level2",
    "country",
    "country-name",
    "postal-code",
    "cc-name",
    "cc-given-name",
    "cc-family-name",
    "cc-number",
    "cc-exp",
    "cc-exp-month",
    "cc-exp-year",
    "cc-csc",
    "cc-type",
    "bday",
    "bday-day",
    "bday-month",
    "bday-year",
    "sex",
    "email",
    "tel",
    "tel-national",
    "url",
    "username",
    "one-time-code",
];

impl QuestionSpec {
    /// The declared autocomplete token, when it is one of [`AUTOCOMPLETE_TOKENS`].
    pub fn autocomplete_token(&self) -> Option<&'static str> {
        let declared = self.autocomplete.as_deref()?;
        AUTOCOMPLETE_TOKENS.iter().copied().find(|t| *t == declared)
    }

    /// A required question with nothing else set, for tests.
    #[cfg(test)]
    pub fn required(id: &str, label: &str, kind: QuestionKind) -> QuestionSpec {
        QuestionSpec {
            id: id.into(),
            label: label.into(),
            kind,
            required: true,
            masked: false,
            off_record: false,
            help: None,
            min_length: None,
            max_length: None,
            pattern: None,
            choices: vec![],
            autocomplete: None,
        }
    }

    pub fn is_off_record(&self) -> bool {
        self.off_record || self.kind.forces_off_record()
    }

    pub fn is_masked(&self) -> bool {
        self.masked || self.kind.forces_masked() || self.is_off_record()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub id: String,
    #[serde(default = "one")]
    pub version: i32,
    pub title: String,
    #[serde(default)]
    pub instructions: String,
    pub questions: Vec<QuestionSpec>,
}

fn one() -> i32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("a template needs between 1 and {MAX_QUESTIONS} questions, this one has {0}")]
    QuestionCount(usize),
    #[error("question id {0:?} is used twice")]
    DuplicateId(String),
    #[error("question id {0:?} may only hold letters, digits, '_' and '-'")]
    BadId(String),
    #[error("question {0:?}: {1} needs at least two choices")]
    NoChoices(String, &'static str),
    #[error("question {0:?}: choices are only for single_choice and multiple_choice")]
    UnexpectedChoices(String),
    #[error("question {0:?}: pattern does not compile ({1})")]
    BadPattern(String, String),
    #[error("question {0:?}: min_length {1} is greater than max_length {2}")]
    LengthBounds(String, u32, u32),
    #[error("question {0:?}: the label is empty")]
    EmptyLabel(String),
    #[error("version must be at least 1, not {0}")]
    Version(i32),
    #[error("unknown question kind {0:?}")]
    UnknownKind(String),
    #[error("question {0:?}: autocomplete {1:?} is not an HTML autocomplete token (e.g. cc-name, name, email)")]
    BadAutocomplete(String, String),
}

impl Template {
    pub fn validate(&self) -> Result<(), TemplateError> {
        if self.version < 1 {
            return Err(TemplateError::Version(self.version));
        }
        if self.questions.is_empty() || self.questions.len() > MAX_QUESTIONS {
            return Err(TemplateError::QuestionCount(self.questions.len()));
        }
        let mut ids = std::collections::BTreeSet::new();
        for q in &self.questions {
            if q.id.is_empty() || q.id.chars().any(|c| !(c.is_ascii_alphanumeric() || "_-".contains(c))) {
                return Err(TemplateError::BadId(q.id.clone()));
            }
            if !ids.insert(q.id.as_str()) {
                return Err(TemplateError::DuplicateId(q.id.clone()));
            }
            if q.label.trim().is_empty() {
                return Err(TemplateError::EmptyLabel(q.id.clone()));
            }
            if q.kind.has_choices() && q.choices.len() < 2 {
                return Err(TemplateError::NoChoices(q.id.clone(), q.kind.as_str()));
            }
            if !q.kind.has_choices() && !q.choices.is_empty() {
                return Err(TemplateError::UnexpectedChoices(q.id.clone()));
            }
            if let Some(a) = &q.autocomplete
                && q.autocomplete_token().is_none()
            {
                return Err(TemplateError::BadAutocomplete(q.id.clone(), a.clone()));
            }
            if let Some(p) = &q.pattern {
                regex::Regex::new(p).map_err(|e| TemplateError::BadPattern(q.id.clone(), e.to_string()))?;
            }
            if let (Some(min), Some(max)) = (q.min_length, q.max_length)
                && min > max
            {
                return Err(TemplateError::LengthBounds(q.id.clone(), min, max));
            }
        }
        Ok(())
    }

    /// The template as carried on the templates topic.
    pub fn to_event_questions(&self) -> Vec<events::Question> {
        self.questions
            .iter()
            .map(|q| events::Question {
                id: q.id.clone(),
                label: q.label.clone(),
                kind: q.kind.as_str().to_string(),
                required: q.required,
                masked: q.is_masked(),
                off_record: q.is_off_record(),
                help: q.help.clone(),
                min_length: q.min_length.map(|v| v as i32),
                max_length: q.max_length.map(|v| v as i32),
                pattern: q.pattern.clone(),
                choices: q.choices.clone(),
            })
            .collect()
    }

    /// Rebuilds a template from its event (replay).
    pub fn from_event(e: &events::FormTemplateDefined) -> Result<Template, TemplateError> {
        let questions = e
            .questions
            .iter()
            .map(|q| {
                Ok(QuestionSpec {
                    id: q.id.clone(),
                    label: q.label.clone(),
                    kind: QuestionKind::parse(&q.kind).ok_or_else(|| TemplateError::UnknownKind(q.kind.clone()))?,
                    required: q.required,
                    masked: q.masked,
                    off_record: q.off_record,
                    help: q.help.clone(),
                    min_length: q.min_length.map(|v| v.max(0) as u32),
                    max_length: q.max_length.map(|v| v.max(0) as u32),
                    pattern: q.pattern.clone(),
                    choices: q.choices.clone(),
                    autocomplete: None,
                })
            })
            .collect::<Result<Vec<_>, TemplateError>>()?;
        let t = Template {
            id: e.template_id.clone(),
            version: e.version,
            title: e.title.clone(),
            instructions: e.instructions.clone(),
            questions,
        };
        t.validate()?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(id: &str, kind: QuestionKind) -> QuestionSpec {
        QuestionSpec::required(id, &format!("{id} label"), kind)
    }

    fn t(questions: Vec<QuestionSpec>) -> Template {
        Template { id: "pay".into(), version: 1, title: "Pay".into(), instructions: String::new(), questions }
    }

    #[test]
    fn a_pin_is_off_the_record_whatever_the_template_says() {
        let pin = QuestionKind::parse("pin").unwrap();
        assert!(pin.forces_off_record() && pin.forces_masked());
        assert!(!QuestionKind::parse("ssn").unwrap().forces_off_record(), "an SSN may be kept (sealed)");
    }

    #[test]
    fn cvv_is_always_off_record_and_masked() {
        let cvv = q("cvv", QuestionKind::Cvv);
        assert!(cvv.is_off_record());
        assert!(cvv.is_masked());
        assert!(!q("name", QuestionKind::ShortText).is_masked());
        assert!(q("pin", QuestionKind::Pin).is_masked());
    }

    #[test]
    fn template_rules_are_enforced() {
        assert_eq!(t(vec![]).validate(), Err(TemplateError::QuestionCount(0)));
        let many = (0..21).map(|i| q(&format!("q{i}"), QuestionKind::ShortText)).collect();
        assert_eq!(t(many).validate(), Err(TemplateError::QuestionCount(21)));
        assert_eq!(
            t(vec![q("a", QuestionKind::Ssn), q("a", QuestionKind::Pin)]).validate(),
            Err(TemplateError::DuplicateId("a".into()))
        );
        assert!(matches!(t(vec![q("c", QuestionKind::SingleChoice)]).validate(), Err(TemplateError::NoChoices(..))));
        let mut bad = q("p", QuestionKind::ShortText);
        bad.pattern = Some("(".into());
        assert!(matches!(t(vec![bad]).validate(), Err(TemplateError::BadPattern(..))));
    }

    #[test]
    fn event_form_round_trips() {
        let mut choice = q("colour", QuestionKind::SingleChoice);
        choice.choices = vec!["red".into(), "blue".into()];
        let tpl = t(vec![q("pan", QuestionKind::CardNumber), q("cvv", QuestionKind::Cvv), choice]);
        let ev = events::FormTemplateDefined {
            header: events::EventHeader::new(events::EventKind::FormTemplateDefined, uuid::Uuid::nil(), 0, "s", "", ""),
            template_id: tpl.id.clone(),
            version: tpl.version,
            title: tpl.title.clone(),
            instructions: tpl.instructions.clone(),
            questions: tpl.to_event_questions(),
        };
        let back = Template::from_event(&ev).unwrap();
        assert_eq!(back.questions.len(), 3);
        assert!(back.questions[1].off_record, "cvv is carried as off the record");
        assert_eq!(back.questions[2].choices, vec!["red", "blue"]);
    }
}
