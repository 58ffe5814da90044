//! Syntax errors in users' words: what was expected (pest's rules renamed to words), what
//! was found, where, and help that applies ("did you mean", the time units, a missing `;`).

use pest::error::{ErrorVariant, InputLocation};

use super::grammar::Rule;
use crate::diagnostic::{PolicyError, SourceFile, Span};

pub(super) fn syntax_error(
    file: &SourceFile,
    base: usize,
    e: pest::error::Error<Rule>,
) -> (PolicyError, usize) {
    let text = file.text();
    let mut at = match e.location {
        InputLocation::Pos(p) | InputLocation::Span((p, _)) => p,
    };
    let mut words: Vec<String> = match &e.variant {
        ErrorVariant::ParsingError { positives, .. } => {
            positives.iter().map(|r| describe(*r).to_owned()).collect()
        }
        ErrorVariant::CustomError { message } => vec![message.clone()],
    };
    if let Some(attempts) = e.parse_attempts() {
        // pest does not export its token type; its display is the literal text, a range as
        // `a..z`, or `BUILTIN_RULE`. Quotes and digit separators only add noise.
        let literals: Vec<String> = attempts
            .expected_tokens()
            .into_iter()
            .filter_map(|t| {
                let token = t.to_string();
                let noise = token.trim().is_empty()
                    || matches!(token.as_str(), "#" | "//" | "BUILTIN_RULE" | "\"" | "_")
                    || (token.chars().count() == 4 && token.contains(".."));
                (!noise).then(|| format!("`{token}`"))
            })
            .collect();
        if attempts.max_position > at && !literals.is_empty() {
            at = attempts.max_position;
            words.clear();
        }
        if attempts.max_position == at {
            words.extend(literals);
        }
    }
    words.retain(|w| !w.is_empty());
    words.sort_unstable();
    words.dedup();
    // A statement's first word is also a literal pest expected: `sync` beside `sync every`;
    // and a time's units are in its description: `min` beside "a rate like `100/min`".
    let described = words.clone();
    let wants_time = described.iter().any(|w| is_time(w));
    words.retain(|w| {
        let Some(word) = w.strip_suffix('`') else {
            return true;
        };
        let unit = wants_time && UNIT_WORDS.contains(&word.trim_start_matches('`'));
        !unit && !described.iter().any(|s| s.starts_with(&format!("{word} ")))
    });
    let expected = join_alternatives(&words);
    let start = base + at;
    let (found, len) = found_token(text, start);
    let mut span = Span::new(start, start + len);
    // A missing `;` is best shown where it belongs: right after the previous token, when the
    // next one is on a later line.
    if words.iter().any(|w| w == "`;`") {
        let before = text[..start].trim_end();
        if text[before.len()..start].contains('\n') {
            span = Span::new(before.len(), before.len());
        }
    }
    let message = format!("expected {expected}, found {found}");
    let label = if words.len() <= 3 {
        format!("expected {expected}")
    } else {
        "unexpected here".to_owned()
    };
    let error = PolicyError::new(file, span, message, label).with_help(hint(&words, &found));
    (error, start)
}

/// The token at `pos` as shown to users, and its length in bytes.
fn found_token(text: &str, pos: usize) -> (String, usize) {
    let rest = &text[pos.min(text.len())..];
    let Some(first) = rest.chars().next() else {
        return ("the end of the file".to_owned(), 0);
    };
    let len = if first.is_alphanumeric() || first == '_' {
        rest.find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len())
    } else {
        first.len_utf8()
    };
    (format!("`{}`", &rest[..len]), len)
}

/// Units a misspelt one is compared with (the grammar's `unit` also takes plurals and one
/// letter abbreviations).
const UNITS: &[&str] = &[
    "ms", "s", "sec", "second", "min", "minute", "h", "hour", "day", "week", "month",
];

/// Every spelling of a unit the grammar's `unit` takes.
const UNIT_WORDS: &[&str] = &[
    "milliseconds",
    "millisecond",
    "minutes",
    "minute",
    "months",
    "month",
    "seconds",
    "second",
    "hours",
    "hour",
    "weeks",
    "week",
    "days",
    "day",
    "min",
    "sec",
    "ms",
    "s",
    "m",
    "h",
    "d",
    "w",
];

/// Whether an expected word describes a time: a rate, a duration or a unit.
fn is_time(word: &str) -> bool {
    ["a rate like", "a duration like", "a time unit"]
        .iter()
        .any(|p| word.starts_with(p))
}

/// The help for a syntax error: "did you mean …?" when the token found is close to a keyword
/// expected there, the time units where a rate or a duration was expected, and otherwise what
/// applies to the token (a missing `;`, a missing `}`).
fn hint(expected: &[String], found: &str) -> String {
    let token = found
        .strip_prefix('`')
        .and_then(|f| f.strip_suffix('`'))
        .filter(|t| t.chars().all(|c| c.is_alphanumeric() || c == '_'));
    let keywords: Vec<&str> = expected
        .iter()
        .filter_map(|w| w.strip_prefix('`')?.strip_suffix('`'))
        .filter(|k| k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    if let Some(help) = token.and_then(|t| crate::diagnostic::did_you_mean(t, &keywords)) {
        return help;
    }
    if expected.iter().any(|w| is_time(w)) {
        let units = "time units are `ms`, `s`, `min`, `h`, `day`, `week` and `month`";
        return match token.and_then(|t| crate::diagnostic::did_you_mean(t, UNITS)) {
            Some(close) => format!("{close} {units}"),
            None => units.to_owned(),
        };
    }
    if expected.iter().any(|w| w == "`;`") {
        "every statement ends with `;`".to_owned()
    } else if found == "the end of the file" {
        "a block may be missing its closing `}`".to_owned()
    } else {
        "see docs/language.md for the syntax of each statement".to_owned()
    }
}

fn join_alternatives(words: &[String]) -> String {
    match words {
        [] => "something else".to_owned(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// The words users read for each grammar rule.
fn describe(rule: Rule) -> &'static str {
    match rule {
        Rule::EOI => "the end of the file",
        Rule::ident | Rule::builtin_or_name => "a name",
        Rule::number | Rule::signed => "a number",
        Rule::string | Rule::string_inner => "a string",
        Rule::unit => "a time unit (`ms`, `s`, `min`, `h`, `day`, `week`, `month`)",
        Rule::duration => "a duration like `30s`",
        Rule::percent => "a percentage like `80%`",
        Rule::cidr | Rule::cidr_item => "an address or network like `10.0.0.0/8`",
        Rule::version_stmt => "`version`",
        Rule::namespace_stmt => "`namespace`",
        Rule::import_stmt => "`import`",
        Rule::import_schema => "`schema`",
        Rule::import_namespace => "`namespace`",
        Rule::import_entities => "`entities`",
        Rule::import_block => "`{` with `parents` or `context`",
        Rule::import_parents => "`parents`",
        Rule::import_principal => "`principal`",
        Rule::import_resource => "`resource`",
        Rule::import_context => "`context`",
        Rule::key_def | Rule::key_stmt => "`key`",
        Rule::key_expr
        | Rule::first_of
        | Rule::header_ref
        | Rule::trusted_header
        | Rule::claim_ref
        | Rule::query_ref
        | Rule::ip_prefix => "a key",
        Rule::descriptor_ref | Rule::descriptor_cond => "`descriptor(\"…\")`",
        Rule::descriptor_shape => "`descriptor [\"key\", …]`",
        Rule::shape_entry => "a descriptor entry like `\"key\"` or `\"key\" == \"value\"`",
        Rule::domain_cond => "`domain`",
        Rule::defaults_block => "`defaults`",
        Rule::rate | Rule::rate_value | Rule::period => "a rate like `100/min`",
        Rule::burst => "`burst`",
        Rule::concurrent => "a concurrency like `5 concurrent`",
        Rule::unlimited => "`unlimited`",
        Rule::blocked => "`blocked`",
        Rule::tier_ref => "a tier entry like `plans.api`",
        Rule::tiers_block => "`tiers`",
        Rule::tier_from => "`from`",
        Rule::cedar_annotation => "`cedar annotation`",
        Rule::cedar_for_action => "`for action`",
        Rule::pick => "`highest`, `lowest` or `first`",
        Rule::tier_default => "`default`",
        Rule::tier_def => "`tier`",
        Rule::tier_extends => "`extends`",
        Rule::tier_entry => "a tier entry like `api = 100/min`",
        Rule::limit_block => "`limit`",
        Rule::algorithm_stmt => "`algorithm`",
        Rule::rate_stmt => "`rate`",
        Rule::lease_stmt => "`lease`",
        Rule::sync_stmt => "`sync every`",
        Rule::replaces_stmt => "`replaces`",
        Rule::cost_stmt | Rule::cost_header => "`cost`",
        Rule::cost_response | Rule::usage_term => "`cost response`",
        Rule::json_ref => "`json(\"…\")`",
        Rule::hits_ref => "`hits_addend`",
        Rule::usage_default | Rule::reserve_default => "`default`",
        Rule::usage_reserved => "`reserved`",
        Rule::usage_max => "`max`",
        Rule::reserve_stmt | Rule::reserve_read => "`reserve`",
        Rule::soft_stmt => "`soft`",
        Rule::soft_warn => "`warn`",
        Rule::soft_delay => "`delay`",
        Rule::on_exceed_stmt => "`on_exceed`",
        Rule::reason => "`reason`",
        Rule::ban => "`ban`",
        Rule::mode_stmt => "`mode`",
        Rule::on_store_error_stmt => "`on_store_error`",
        Rule::global_stmt => "`global`",
        Rule::adaptive_block => "`adaptive`",
        Rule::admission_block => "`admission`",
        Rule::admission_success => "`success when status in […]`",
        Rule::status_range => "a status or a range like `200..499`",
        Rule::tuning => "a setting like `initial 20;`",
        Rule::decimal => "a number like `1.5`",
        Rule::on_partition_stmt => "`on_partition`",
        Rule::on_missing_key_stmt => "`on_missing_key`",
        Rule::priority_stmt => "`priority`",
        Rule::counts_stmt => "`counts`",
        Rule::match_block => "`match`",
        Rule::when_stmt => "`when`",
        Rule::condition | Rule::and_cond | Rule::not_cond => "a condition",
        Rule::route_cond => "`route`",
        Rule::method_cond => "`method`",
        Rule::methods | Rule::method => "an HTTP method",
        Rule::host_cond => "`host`",
        Rule::header_cond => "`header(\"…\")`",
        Rule::user_agent_cond => "`user_agent`",
        Rule::cmp_op => "`==`, `!=` or `~=`",
        Rule::regex_op => "`~=`",
        Rule::ip_cond => "`ip in […]`",
        Rule::cedar_cond => "`cedar permits action` or `cedar principal in`",
        Rule::cedar_permits => "`permits action`",
        Rule::cedar_principal_in => "`principal in`",
        Rule::authorize_stmt => "`authorize`",
        Rule::safelist_block => "`safelist`",
        Rule::denylist_block => "`denylist`",
        Rule::respond_stmt => "`respond`",
        Rule::anomaly_block => "`anomaly`",
        Rule::count_stmt => "`count when status in […]`",
        Rule::detect_stmt => "`detect`",
        Rule::then_stmt => "`then`",
        Rule::alert => "`alert`",
        Rule::file | Rule::next_item => "",
        _ => "something else",
    }
}
