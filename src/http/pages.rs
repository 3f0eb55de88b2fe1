//! Page models for the askama templates in `templates/`. Everything a template prints is escaped by
//! askama, so answers holding `< > ( ) \ ' " &` are shown as typed and never become markup.

use std::collections::BTreeMap;

use askama::Template;

use crate::domain::template::{QuestionKind, QuestionSpec, Template as FormTemplate};
use crate::domain::validate::FieldError;

pub struct Choice {
    pub value: String,
    pub input_id: String,
    pub checked: bool,
}

pub struct Field {
    pub id: String,
    pub input_id: String,
    pub label: String,
    pub required: bool,
    pub help: Option<String>,
    pub error: Option<String>,
    pub value: String,
    /// `text`, `textarea`, `radio` or `checkbox`.
    pub control: &'static str,
    pub input_type: &'static str,
    pub autocomplete: &'static str,
    pub inputmode: &'static str,
    pub describedby: String,
    pub choices: Vec<Choice>,
    pub masked: bool,
    /// A hint for an answer that is not sent back (e.g. "You entered a card ending 6467").
    pub retype: Option<String>,
}

#[derive(Template)]
#[template(path = "form.html")]
pub struct FormPage {
    pub page_title: String,
    pub title: String,
    pub instructions: String,
    pub action: String,
    pub submit_key: String,
    pub fields: Vec<Field>,
    pub errors: Vec<(String, String)>,
}

/// The page a link shows before anything is spent: link previews, mail scanners and HEAD requests
/// fetch it freely; only the visitor's own click (a POST) opens the form.
#[derive(Template)]
#[template(path = "open.html")]
pub struct OpenPage {
    pub page_title: String,
    pub heading: String,
    pub intro: String,
    pub action: String,
    pub open_key: String,
    pub opens_left: i32,
}

impl OpenPage {
    pub fn new(title: &str, action: String, open_key: String, opens_left: i32) -> OpenPage {
        OpenPage {
            page_title: format!("{title} - secure form"),
            heading: title.to_string(),
            intro: "Your agent has sent you a secure form. Your answers go straight to your agent and are not stored in the chat.".into(),
            action,
            open_key,
            opens_left,
        }
    }
}

#[derive(Template)]
#[template(path = "message.html")]
pub struct MessagePage {
    pub page_title: String,
    pub heading: String,
    pub paragraphs: Vec<String>,
}

fn control(kind: QuestionKind) -> (&'static str, &'static str, &'static str, &'static str) {
    use QuestionKind::*;
    // (control, input type, autocomplete, inputmode)
    match kind {
        ShortText => ("text", "text", "off", "text"),
        LongText => ("textarea", "text", "off", "text"),
        Number => ("text", "text", "off", "decimal"),
        Email => ("text", "email", "email", "email"),
        Phone => ("text", "tel", "tel", "tel"),
        Date => ("text", "date", "off", "text"),
        SingleChoice | YesNo => ("radio", "radio", "off", "text"),
        MultipleChoice => ("checkbox", "checkbox", "off", "text"),
        CardNumber => ("text", "text", "cc-number", "numeric"),
        CardExpiry => ("text", "text", "cc-exp", "numeric"),
        Cvv => ("text", "password", "cc-csc", "numeric"),
        Ssn => ("text", "password", "off", "numeric"),
        Pin => ("text", "password", "off", "numeric"),
        SecretAnswer => ("text", "password", "off", "text"),
    }
}

fn field(q: &QuestionSpec, values: &BTreeMap<String, Vec<String>>, errors: &[FieldError]) -> Field {
    let (ctl, mut input_type, default_autocomplete, inputmode) = control(q.kind);
    let autocomplete = q.autocomplete_token().unwrap_or(default_autocomplete);
    let masked = q.is_masked();
    if masked && ctl == "text" {
        input_type = "password";
    }
    let input_id = format!("f-{}", q.id);
    let error = errors.iter().find(|e| e.field == q.id).map(|e| e.message.clone());
    // Sensitive kinds, masked and off-the-record answers are never sent back to the browser: the
    // visitor types them again. A card number that validated gets its last four digits as a hint
    // (PCI DSS allows showing them).
    let withheld = masked || q.is_off_record() || q.kind.is_sensitive();
    let kept: Vec<String> = if withheld { vec![] } else { values.get(&q.id).cloned().unwrap_or_default() };
    let retype = match values.get(&q.id).and_then(|v| v.first()) {
        Some(v) if withheld && !v.trim().is_empty() => Some(match q.kind {
            QuestionKind::CardNumber if error.is_none() => {
                let digits: String = v.chars().filter(char::is_ascii_digit).collect();
                let last4 = &digits[digits.len().saturating_sub(4)..];
                format!("You entered a card ending {last4}. For your security, type it again.")
            }
            _ => "For your security, this answer is not shown again: type it again.".to_string(),
        }),
        _ => None,
    };
    let mut described = Vec::new();
    if q.help.is_some() {
        described.push(format!("{input_id}-help"));
    }
    if retype.is_some() {
        described.push(format!("{input_id}-retype"));
    }
    if error.is_some() {
        described.push(format!("{input_id}-error"));
    }
    let options: Vec<String> =
        if q.kind == QuestionKind::YesNo { vec!["yes".into(), "no".into()] } else { q.choices.clone() };
    let choices = options
        .iter()
        .enumerate()
        .map(|(i, c)| Choice { value: c.clone(), input_id: format!("{input_id}-{i}"), checked: kept.contains(c) })
        .collect();
    Field {
        id: q.id.clone(),
        input_id,
        label: q.label.clone(),
        required: q.required,
        help: q.help.clone(),
        error,
        value: kept.first().cloned().unwrap_or_default(),
        control: ctl,
        input_type,
        autocomplete,
        inputmode,
        describedby: described.join(" "),
        choices,
        masked,
        retype,
    }
}

impl FormPage {
    pub fn new(
        template: &FormTemplate,
        action: String,
        submit_key: String,
        values: &BTreeMap<String, Vec<String>>,
        errors: &[FieldError],
    ) -> FormPage {
        let fields: Vec<Field> = template.questions.iter().map(|q| field(q, values, errors)).collect();
        let summary = errors
            .iter()
            .filter_map(|e| {
                let f = fields.iter().find(|f| f.id == e.field)?;
                // Choice groups link to their first option.
                let target = if f.choices.is_empty() { f.input_id.clone() } else { f.choices[0].input_id.clone() };
                Some((target, e.message.clone()))
            })
            .collect::<Vec<_>>();
        let page_title = if summary.is_empty() {
            format!("{} - secure form", template.title)
        } else {
            format!("Error: {} - secure form", template.title)
        };
        FormPage {
            page_title,
            title: template.title.clone(),
            instructions: template.instructions.clone(),
            action,
            submit_key,
            fields,
            errors: summary,
        }
    }
}

impl MessagePage {
    pub fn new(heading: &str, paragraphs: &[&str]) -> MessagePage {
        MessagePage {
            page_title: format!("{heading} - secure form"),
            heading: heading.to_string(),
            paragraphs: paragraphs.iter().map(|p| p.to_string()).collect(),
        }
    }
}
