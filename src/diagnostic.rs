//! Problems found in policy files, reported rustc-style: file, line, column, underline, help.

use std::fmt;
use std::sync::Arc;

use miette::{Diagnostic, GraphicalReportHandler, GraphicalTheme, NamedSource, SourceSpan};
use thiserror::Error;

/// "did you mean `x`?" when one of the `known` names is close to `name`: similar by
/// Jaro-Winkler, or one edit away (a letter added, missing, changed or two swapped), which
/// catches the typos of short words (`mni` for `min`) that Jaro-Winkler scores low.
pub fn did_you_mean(name: &str, known: &[&str]) -> Option<String> {
    known
        .iter()
        .filter(|k| **k != name)
        .map(|k| {
            let edits = strsim::osa_distance(name, k);
            (edits, strsim::jaro_winkler(name, k), *k)
        })
        .filter(|&(edits, score, k)| score > 0.8 || (edits == 1 && name.len() > 1 && k.len() > 1))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(_, _, k)| format!("did you mean `{k}`?"))
}

/// A byte range in one source file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Span {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

impl Span {
    /// The range `start..end`.
    pub const fn new(start: usize, end: usize) -> Self {
        Span { start, end }
    }
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

impl From<Span> for SourceSpan {
    fn from(span: Span) -> Self {
        SourceSpan::from(span.start..span.end)
    }
}

/// One policy source file: its name as shown to users, and its text.
#[derive(Clone)]
pub struct SourceFile {
    name: Arc<str>,
    text: Arc<str>,
    /// Where each line starts, computed on first use.
    lines: Arc<std::sync::OnceLock<Vec<usize>>>,
}

impl SourceFile {
    /// A source file named `name` holding `text`.
    pub fn new(name: impl Into<Arc<str>>, text: impl Into<Arc<str>>) -> Self {
        SourceFile {
            name: name.into(),
            text: text.into(),
            lines: Arc::default(),
        }
    }

    /// The line and column (both from 1, the column in bytes) of byte `offset`, in
    /// logarithmic time once the file's line starts are known.
    pub fn line_column(&self, offset: usize) -> (usize, usize) {
        let lines = self.lines.get_or_init(|| {
            std::iter::once(0)
                .chain(self.text.match_indices('\n').map(|(i, _)| i + 1))
                .collect()
        });
        let offset = offset.min(self.text.len());
        let line = lines.partition_point(|start| *start <= offset);
        (line, offset - lines[line - 1] + 1)
    }

    /// The name shown in diagnostics.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file's text.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn named_source(&self) -> NamedSource<Arc<str>> {
        NamedSource::new(&self.name, Arc::clone(&self.text))
    }
}

impl fmt::Debug for SourceFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceFile")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// One problem in a policy file.
#[derive(Debug, Clone, Error, Diagnostic)]
#[error("{message}")]
pub struct PolicyError {
    message: String,
    #[source_code]
    source_code: NamedSource<Arc<str>>,
    #[label("{label}")]
    span: Option<SourceSpan>,
    label: String,
    #[help]
    help: Option<String>,
    /// `Some(Warning)` for warnings; the derive has no per-value severity, so rendering
    /// reads it through [`Warned`].
    severity: Option<miette::Severity>,
}

impl PolicyError {
    /// A problem at `span` of `file`: `message` heads it, `label` underlines the span.
    pub fn new(
        file: &SourceFile,
        span: Span,
        message: impl Into<String>,
        label: impl Into<String>,
    ) -> Self {
        PolicyError {
            message: message.into(),
            source_code: file.named_source(),
            span: Some(span.into()),
            label: label.into(),
            help: None,
            severity: None,
        }
    }

    /// A problem with a whole file (it cannot be read, say), with no place inside it.
    pub fn whole_file(name: &str, message: impl Into<String>) -> Self {
        PolicyError {
            message: message.into(),
            source_code: NamedSource::new(name, Arc::from("")),
            span: None,
            label: String::new(),
            help: None,
            severity: None,
        }
    }

    /// Marks the problem as a warning: worth reading, but the plan is still built.
    pub fn warning(mut self) -> Self {
        self.severity = Some(miette::Severity::Warning);
        self
    }

    /// Whether this is a warning rather than an error.
    pub fn is_warning(&self) -> bool {
        self.severity == Some(miette::Severity::Warning)
    }

    /// Adds a help line.
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// The one-line message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The name of the file the problem is in.
    pub fn file_name(&self) -> &str {
        self.source_code.name()
    }

    /// Where in the file, as a byte range, if the problem has a place.
    pub fn span(&self) -> Option<Span> {
        self.span
            .map(|s| Span::new(s.offset(), s.offset() + s.len()))
    }

    /// The help line, if any.
    pub fn help_text(&self) -> Option<&str> {
        self.help.as_deref()
    }

    /// The diagnostic as rustc-style text without colours, `width` columns wide.
    pub fn render_plain(&self, width: usize) -> String {
        render(self, GraphicalTheme::unicode_nocolor(), width)
    }

    /// The diagnostic as rustc-style text for a terminal.
    pub fn render_terminal(&self, width: usize) -> String {
        render(self, GraphicalTheme::default(), width)
    }
}

fn render(error: &PolicyError, theme: GraphicalTheme, width: usize) -> String {
    let mut out = String::new();
    let handler = GraphicalReportHandler::new_themed(theme).with_width(width);
    let rendered = if error.is_warning() {
        handler.render_report(&mut out, &Warned(error))
    } else {
        handler.render_report(&mut out, error)
    };
    rendered
        .map(|()| out)
        .unwrap_or_else(|_| error.message.clone())
}

/// A problem shown as a warning: everything from the problem, the severity from its value.
#[derive(Debug, Error)]
#[error(transparent)]
struct Warned<'a>(&'a PolicyError);

impl Diagnostic for Warned<'_> {
    fn severity(&self) -> Option<miette::Severity> {
        self.0.severity
    }

    fn help<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.0.help()
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.0.source_code()
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        self.0.labels()
    }
}

/// How many problems one report holds; past that, only their number. Rendering a problem
/// reads its file up to the problem's place, so thousands of them (a file that repeats one
/// broken item) would take quadratic time to show, and nobody reads past the first screens.
pub const MAX_REPORTED: usize = 100;

/// Every problem found in a set of policy files, in file order: the first
/// [`MAX_REPORTED`] of them, and how many there were.
#[derive(Debug, Error, Diagnostic)]
#[error("{}{}", count(*.total), shown(.errors.len(), *.total))]
pub struct PolicyErrors {
    #[related]
    errors: Vec<PolicyError>,
    total: usize,
}

fn shown(kept: usize, total: usize) -> String {
    if kept < total {
        format!(" in the policy files (the first {kept} shown)")
    } else {
        " in the policy files".to_owned()
    }
}

fn count(n: usize) -> String {
    if n == 1 {
        "1 problem".to_owned()
    } else {
        format!("{n} problems")
    }
}

impl PolicyErrors {
    /// Wraps a non-empty list of problems, keeping the first [`MAX_REPORTED`].
    pub fn new(mut errors: Vec<PolicyError>) -> Self {
        let total = errors.len();
        errors.truncate(MAX_REPORTED);
        PolicyErrors { errors, total }
    }

    /// The problems kept, in file order.
    pub fn errors(&self) -> &[PolicyError] {
        &self.errors
    }

    /// How many problems were found, including those not kept.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Every problem rendered without colours, separated by blank lines.
    pub fn render_plain(&self, width: usize) -> String {
        self.errors
            .iter()
            .map(|e| e.render_plain(width))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
