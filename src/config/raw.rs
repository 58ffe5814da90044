//! The settings as written, read from every source (the file, the variables, the flags)
//! into one [`Raw`] whose fields are each optional, so that each setting is read — and
//! fails — alone. Every setting's name is written once, in the [`settings!`] list below:
//! the raw struct, the names known to the unknown-key check and which ones are numeric all
//! come from it.

use std::path::PathBuf;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use super::{ConfigProblem, Flags};

/// Whether a setting's value, given as a variable, is read as a number.
trait Kind {
    const NUMERIC: bool;
}

impl Kind for String {
    const NUMERIC: bool = false;
}

macro_rules! numeric {
    ($($t:ty),*) => { $(impl Kind for $t { const NUMERIC: bool = true; })* };
}
numeric!(u32, u64, usize);

/// The settings: name and type as written (`Option` of it in [`Raw`]).
macro_rules! settings {
    ($($name:ident: $ty:ty,)*) => {
        /// The settings as written: every field optional, so that each is read (and fails)
        /// alone.
        #[derive(Debug, Default, Serialize, Deserialize)]
        pub(super) struct Raw {
            $(pub(super) $name: Option<$ty>,)*
        }

        /// The setting names, for unknown-key checks.
        pub(super) const KEYS: &[&str] = &[$(stringify!($name)),*];

        /// Whether the setting `key` is a number (a variable's text is read as one).
        fn numeric(key: &str) -> bool {
            match key {
                $(stringify!($name) => <$ty as Kind>::NUMERIC,)*
                _ => false,
            }
        }

        impl Raw {
            /// Each field of the merged sources, read alone.
            fn extract(figment: &Figment, p: &mut Problems) -> Raw {
                Raw { $($name: p.field(figment, stringify!($name)),)* }
            }
        }
    };
}

settings! {
    listen: String,
    policies: String,
    env: String,
    redis_url: String,
    redis_tls_ca_file: String,
    redis_tls_cert_file: String,
    redis_tls_key_file: String,
    redis_sentinel_password: String,
    region: String,
    region_peers: StringList,
    region_weights: StringList,
    region_sync_ms: u64,
    region_partition_ms: u64,
    store_timeout_ms: u64,
    store_clock: String,
    expected_nodes: u64,
    deny_cache_keys: usize,
    redis_batch_max: u64,
    memory_max_keys: usize,
    breaker_failures: u32,
    breaker_max_backoff_ms: u64,
    admin_listen: String,
    grpc_listen: String,
    admin_token: String,
    trusted_proxies: StringList,
    key_secret: String,
    upstream: String,
    header_families: StringList,
    user_header: String,
    api_key_header: String,
    jwt_algorithm: String,
    jwt_secret: String,
    jwt_public_key_file: String,
    jwt_issuer: String,
    jwt_audience: String,
    jwt_user_claim: String,
    max_body_bytes: usize,
    log_format: String,
    cedar_cache_ttl_ms: u64,
    cedar_cache_size: usize,
    metrics_on_main: BoolText,
    clickhouse_url: String,
    clickhouse_database: String,
    clickhouse_spool_dir: String,
    clickhouse_spool_max_mb: u64,
    clickhouse_sample_allows: NumberText,
    clickhouse_tenant_header: String,
    clickhouse_truncate_ip: BoolText,
    clickhouse_migrate: BoolText,
}

/// A fractional setting: a number in the file, text in a variable or a flag.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub(super) enum NumberText {
    Number(f64),
    Text(String),
}

impl NumberText {
    pub(super) fn value(&self) -> Option<f64> {
        match self {
            NumberText::Number(n) => Some(*n),
            NumberText::Text(t) => t.trim().parse().ok(),
        }
    }
}

/// A yes/no setting: a boolean in the file, `true` or `false` in a variable or a flag.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub(super) enum BoolText {
    Bool(bool),
    Text(String),
}

impl BoolText {
    pub(super) fn into_text(self) -> String {
        match self {
            BoolText::Bool(b) => b.to_string(),
            BoolText::Text(t) => t,
        }
    }
}

impl Kind for NumberText {
    const NUMERIC: bool = false;
}

impl Kind for BoolText {
    const NUMERIC: bool = false;
}

impl Kind for StringList {
    const NUMERIC: bool = false;
}

/// A list given either as a list or as one comma-separated string (as variables are).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub(super) enum StringList {
    List(Vec<String>),
    Joined(String),
}

impl StringList {
    pub(super) fn items(&self) -> Vec<String> {
        match self {
            StringList::List(items) => items.iter().map(|s| s.trim().to_owned()).collect(),
            StringList::Joined(s) => s
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }
}

/// Where the values come from: the file (if any), our variables, the flags.
pub(super) struct Sources<'f> {
    flags: &'f Flags,
    vars: Vec<(String, String)>,
    file: Option<(PathBuf, String)>,
}

impl<'f> Sources<'f> {
    /// Reads the file the flags name; a file that cannot be read is the first problem.
    pub(super) fn read(
        flags: &'f Flags,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> (Self, Vec<ConfigProblem>) {
        let vars = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with("TOLLGATE_"))
            .collect();
        let mut problems = Vec::new();
        let file = flags
            .config
            .as_ref()
            .and_then(|path| match std::fs::read_to_string(path) {
                Ok(text) => Some((path.clone(), text)),
                Err(e) => {
                    problems.push(ConfigProblem {
                        key: "config".into(),
                        source: "--config".into(),
                        message: format!("cannot read `{}`: {e}", path.display()),
                    });
                    None
                }
            });
        (Sources { flags, vars, file }, problems)
    }

    /// Every value as written, merged in order (file, variables, flags), each field read
    /// alone so that one bad value does not hide the next. Names that are no setting, in the
    /// file or among our variables, are problems: a typo would otherwise be silently ignored.
    pub(super) fn raw(&self, p: &mut Problems) -> Raw {
        let mut figment = Figment::from(Serialized::defaults(Raw::default()));
        if let Some((path, text)) = &self.file {
            figment = figment.merge(Toml::string(text));
            for key in toml_keys(text) {
                if !KEYS.contains(&key.as_str()) {
                    p.list.push(ConfigProblem {
                        source: format!("{}:{}", path.display(), line_of(text, &key)),
                        message: suggest_key(&key),
                        key,
                    });
                }
            }
        }
        // Values stay text (a numeric token is still a token), except for numeric settings.
        let mut from_env = figment::value::Dict::new();
        for (name, value) in &self.vars {
            let key = name.trim_start_matches("TOLLGATE_").to_ascii_lowercase();
            if KEYS.contains(&key.as_str()) {
                let value: figment::value::Value =
                    match (numeric(&key), value.trim().parse::<u64>()) {
                        (true, Ok(n)) => n.into(),
                        _ => value.as_str().into(),
                    };
                from_env.insert(key, value);
            } else {
                p.list.push(ConfigProblem {
                    message: suggest_key(&key),
                    key,
                    source: name.clone(),
                });
            }
        }
        figment = figment.merge(Serialized::defaults(from_env));
        figment = figment.merge(Serialized::defaults(FlagValues::from(self.flags)));

        Raw::extract(&figment, p)
    }

    /// Where the value of `key` came from: a flag, a variable, the file's line, the default.
    fn source(&self, key: &str) -> String {
        if flag_set(self.flags, key) {
            return format!("--{}", key.replace('_', "-"));
        }
        let var = format!("TOLLGATE_{}", key.to_ascii_uppercase());
        if self.vars.iter().any(|(k, _)| *k == var) {
            return var;
        }
        if let Some((path, text)) = &self.file
            && toml_keys(text).iter().any(|k| k == key)
        {
            return format!("{}:{}", path.display(), line_of(text, key));
        }
        "default".to_owned()
    }
}

/// The problems found so far, each told where its value came from.
pub(super) struct Problems<'s> {
    pub(super) sources: &'s Sources<'s>,
    pub(super) list: Vec<ConfigProblem>,
}

impl Problems<'_> {
    pub(super) fn add(&mut self, key: &str, message: String) {
        self.list.push(ConfigProblem {
            key: key.to_owned(),
            source: self.sources.source(key),
            message,
        });
    }

    /// One field of the merged settings, or `None` and a problem.
    fn field<T: serde::de::DeserializeOwned>(&mut self, figment: &Figment, key: &str) -> Option<T> {
        figment.extract_inner::<Option<T>>(key).unwrap_or_else(|e| {
            self.add(key, first_line(&e.to_string()));
            None
        })
    }
}

/// Flag values in the shape of the file, for merging last.
#[derive(Debug, Default, Serialize)]
struct FlagValues {
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policies: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<String>,
}

impl From<&Flags> for FlagValues {
    fn from(flags: &Flags) -> Self {
        FlagValues {
            listen: flags.listen.clone(),
            policies: flags.policies.as_ref().map(|p| p.display().to_string()),
            upstream: flags.upstream.clone(),
        }
    }
}

fn flag_set(flags: &Flags, key: &str) -> bool {
    match key {
        "listen" => flags.listen.is_some(),
        "policies" => flags.policies.is_some(),
        "upstream" => flags.upstream.is_some(),
        _ => false,
    }
}

/// The top-level keys of a TOML text (what parses of it).
fn toml_keys(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.starts_with('#') || line.starts_with('[') {
                return None;
            }
            let (key, _) = line.split_once('=')?;
            Some(key.trim().trim_matches('"').to_owned())
        })
        .collect()
}

/// The line a key is set on, 1-based.
fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(0, |i| i + 1)
}

fn suggest_key(key: &str) -> String {
    match crate::diagnostic::did_you_mean(key, KEYS) {
        Some(help) => format!("unknown setting; {help}"),
        None => "unknown setting".to_owned(),
    }
}

pub(super) fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).to_owned()
}
