//! Compiled conditions on a request, and the reasons they hold or fail.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderName, Method};
use regex::Regex;

use super::ipset::IpSet;
use super::route::{PatternId, RouteIndex, RouteMatches};
use crate::authz::Asking;
use crate::request::RequestCtx;

/// A condition on a request, with names resolved and regexes compiled.
#[derive(Debug, Clone)]
pub enum Condition {
    /// Always holds.
    Always,
    /// Every part holds.
    All(Vec<Condition>),
    /// At least one part holds.
    Any(Vec<Condition>),
    /// The part does not hold.
    Not(Box<Condition>),
    /// The method is one of `methods` (empty: any) and the path matches one of `patterns`.
    Route {
        /// Methods; empty means any.
        methods: Vec<Method>,
        /// Templates in the plan's route set.
        patterns: Vec<PatternId>,
    },
    /// The method is one of these.
    Method(Vec<Method>),
    /// The host equals this (lowercase).
    HostIs(Arc<str>),
    /// The host matches this.
    HostMatches(Regex),
    /// The header is present.
    HeaderPresent(HeaderName),
    /// The header equals the value.
    HeaderIs(HeaderName, Arc<str>),
    /// The header is missing or differs from the value.
    HeaderIsNot(HeaderName, Arc<str>),
    /// The header matches the regex.
    HeaderMatches(HeaderName, Regex),
    /// The client address is in one of the networks.
    IpIn(Arc<IpSet>),
    /// Cedar permits the action for the request's principal on the limit's route.
    Cedar {
        /// The Cedar set asked (an index into the plan's sets).
        cedar: usize,
        /// The action.
        action: Arc<str>,
    },
    /// The request's principal is in this entity (Cedar's `principal in …`).
    CedarIn {
        /// The Cedar set whose entities hold the hierarchy.
        cedar: usize,
        /// The ancestor.
        ancestor: Arc<cedar_policy::EntityUid>,
    },
    /// The domain of an Envoy rate-limit request passes the test.
    Domain(ValueTest),
    /// An entry of the descriptor (the first with this key) passes the test.
    Descriptor(Arc<str>, ValueTest),
    /// The descriptor's entries are exactly these keys, in order, each value passing its
    /// test.
    DescriptorShape(Vec<(Arc<str>, ValueTest)>),
}

/// A test of a value that may be missing.
#[derive(Debug, Clone)]
pub enum ValueTest {
    /// Present, whatever its value.
    Present,
    /// Present and equal to this.
    Is(Arc<str>),
    /// Missing, or different from this.
    IsNot(Arc<str>),
    /// Present and matching this.
    Matches(Regex),
}

impl ValueTest {
    /// Whether `value` passes.
    pub fn eval(&self, value: Option<&str>) -> bool {
        match self {
            ValueTest::Present => value.is_some(),
            ValueTest::Is(v) => value == Some(&**v),
            ValueTest::IsNot(v) => value != Some(&**v),
            ValueTest::Matches(re) => value.is_some_and(|v| re.is_match(v)),
        }
    }

    /// The test in words, after what is tested: "is `v`", "matches `re`".
    fn describe(&self) -> String {
        match self {
            ValueTest::Present => "is present".to_owned(),
            ValueTest::Is(v) => format!("is `{v}`"),
            ValueTest::IsNot(v) => format!("is not `{v}`"),
            ValueTest::Matches(re) => format!("matches `{re}`"),
        }
    }
}

/// What a condition needs to be evaluated besides the request.
pub struct Env<'a> {
    /// The request.
    pub request: &'a RequestCtx,
    /// The plan's route set matched against the request's path.
    pub routes: &'a RouteMatches,
    /// The plan's route index, for templates in explanations.
    pub index: &'a RouteIndex,
    /// The request's questions to Cedar.
    pub cedar: &'a Asking<'a>,
}

impl Condition {
    /// Whether the condition holds.
    pub fn eval(&self, env: &Env<'_>) -> bool {
        let r = env.request;
        match self {
            Condition::Always => true,
            Condition::All(parts) => parts.iter().all(|c| c.eval(env)),
            Condition::Any(parts) => parts.iter().any(|c| c.eval(env)),
            Condition::Not(part) => !part.eval(env),
            Condition::Route { methods, patterns } => {
                method_in(methods, &r.method) && patterns.iter().any(|p| env.routes.matched(*p))
            }
            Condition::Method(methods) => method_in(methods, &r.method),
            Condition::HostIs(host) => r.host.as_deref() == Some(&**host),
            Condition::HostMatches(re) => r.host.as_deref().is_some_and(|h| re.is_match(h)),
            Condition::HeaderPresent(name) => r.headers.contains_key(name),
            Condition::HeaderIs(name, value) => r.header(name) == Some(&**value),
            Condition::HeaderIsNot(name, value) => r.header(name) != Some(&**value),
            Condition::HeaderMatches(name, re) => r.header(name).is_some_and(|v| re.is_match(v)),
            Condition::IpIn(set) => r.client_ip.is_some_and(|ip| set.contains(ip)),
            Condition::Cedar { cedar, action } => env.cedar.answer(r, *cedar, action).allowed,
            Condition::CedarIn { cedar, ancestor } => env.cedar.principal_in(r, *cedar, ancestor),
            Condition::Domain(test) => r.descriptor.is_some() && test.eval(r.domain()),
            Condition::Descriptor(key, test) => {
                r.descriptor.is_some() && test.eval(r.descriptor_value(key))
            }
            Condition::DescriptorShape(entries) => r.descriptor.as_ref().is_some_and(|d| {
                d.entries.len() == entries.len()
                    && d.entries
                        .iter()
                        .zip(entries)
                        .all(|((k, v), (key, test))| k == &**key && test.eval(Some(v)))
            }),
        }
    }

    /// Why the condition holds (`Ok`) or fails (`Err`), in words.
    pub fn explain(&self, env: &Env<'_>) -> Result<String, String> {
        match self {
            Condition::Always => Ok("no conditions".to_owned()),
            Condition::All(parts) => {
                let mut reasons = Vec::new();
                for part in parts {
                    reasons.push(part.explain(env)?);
                }
                Ok(reasons.join("; "))
            }
            Condition::Any(parts) => {
                let mut failures = Vec::new();
                for part in parts {
                    match part.explain(env) {
                        Ok(why) => return Ok(why),
                        Err(why) => failures.push(why),
                    }
                }
                Err(failures.join("; and "))
            }
            Condition::Not(part) => match part.explain(env) {
                Ok(why) => Err(format!("not ({why})")),
                Err(why) => Ok(format!("not ({why})")),
            },
            Condition::Route { methods, patterns } => explain_route(methods, patterns, env),
            Condition::Cedar { .. } | Condition::CedarIn { .. } => self.explain_cedar(env),
            Condition::Domain(_) | Condition::Descriptor(..) | Condition::DescriptorShape(_) => {
                self.explain_descriptor(env)
            }
            Condition::Method(_)
            | Condition::HostIs(_)
            | Condition::HostMatches(_)
            | Condition::HeaderPresent(_)
            | Condition::HeaderIs(..)
            | Condition::HeaderIsNot(..)
            | Condition::HeaderMatches(..)
            | Condition::IpIn(_) => self.explain_request(env),
        }
    }

    /// Why a condition on the request's own attributes (method, host, headers, address)
    /// holds or fails.
    fn explain_request(&self, env: &Env<'_>) -> Result<String, String> {
        let r = env.request;
        let holds = self.eval(env);
        let (yes, no) = match self {
            Condition::Method(methods) => (
                format!("method {} is {}", r.method, method_list(methods)),
                format!("method {} is not {}", r.method, method_list(methods)),
            ),
            Condition::HostIs(host) => (
                format!("host is `{host}`"),
                format!("host {} is not `{host}`", shown(r.host.as_deref())),
            ),
            Condition::HostMatches(re) => (
                format!("host matches `{re}`"),
                format!("host {} does not match `{re}`", shown(r.host.as_deref())),
            ),
            Condition::HeaderPresent(name) => (
                format!("header `{name}` is present"),
                format!("header `{name}` is missing"),
            ),
            Condition::HeaderIs(name, value) => (
                format!("header `{name}` is `{value}`"),
                format!(
                    "header `{name}` is {}, not `{value}`",
                    shown(r.header(name))
                ),
            ),
            Condition::HeaderIsNot(name, value) => (
                format!("header `{name}` is not `{value}`"),
                format!("header `{name}` is `{value}`"),
            ),
            Condition::HeaderMatches(name, re) => (
                format!("header `{name}` matches `{re}`"),
                format!(
                    "header `{name}` ({}) does not match `{re}`",
                    shown(r.header(name))
                ),
            ),
            Condition::IpIn(set) => {
                let client = shown_ip(r.client_ip);
                let yes = match r.client_ip.and_then(|ip| set.find(ip)) {
                    Some(net) => format!("client {client} is in {net} of {}", set.shown()),
                    None => String::new(),
                };
                (yes, format!("client {client} is not in {}", set.shown()))
            }
            // Only the conditions above are sent here (see `explain`).
            _ => (String::from("holds"), String::from("fails")),
        };
        if holds { Ok(yes) } else { Err(no) }
    }

    /// Why a condition on an Envoy rate-limit request's domain or descriptor holds or fails.
    fn explain_descriptor(&self, env: &Env<'_>) -> Result<String, String> {
        let r = env.request;
        let Some(descriptor) = &r.descriptor else {
            return Err("not an Envoy rate-limit request (no domain, no descriptor)".to_owned());
        };
        let (subject, test) = match self {
            Condition::Domain(test) => (format!("domain `{}`", descriptor.domain), test.describe()),
            Condition::Descriptor(key, test) => (
                format!(
                    "descriptor entry `{key}` ({})",
                    shown(r.descriptor_value(key))
                ),
                test.describe(),
            ),
            Condition::DescriptorShape(entries) => {
                let shape: Vec<String> = entries
                    .iter()
                    .map(|(key, test)| match test {
                        ValueTest::Present => format!("`{key}`"),
                        _ => format!("`{key}` {}", test.describe()),
                    })
                    .collect();
                (
                    format!("descriptor [{}]", descriptor.shown()),
                    format!("is [{}]", shape.join(", ")),
                )
            }
            // Only descriptor conditions are sent here (see `explain`).
            _ => (String::from("the request"), String::from("holds")),
        };
        if self.eval(env) {
            Ok(format!("{subject} {test}"))
        } else {
            Err(format!("{subject} fails the test: {test}"))
        }
    }

    /// Whether the condition holds, and is one for the request's kind: conditions that name
    /// `domain` or `descriptor` are for Envoy rate-limit requests, the others for HTTP
    /// requests (a list's line, an anomaly's `match`; a limit keeps the answer of
    /// [`Condition::names_descriptor`] in `for_descriptors`).
    pub fn meets(&self, env: &Env<'_>) -> bool {
        self.names_descriptor() == env.request.descriptor.is_some() && self.eval(env)
    }

    /// Whether the condition, or a part of it, reads an Envoy rate-limit request's domain or
    /// descriptor: what makes a limit, list or anomaly one for those requests.
    pub fn names_descriptor(&self) -> bool {
        match self {
            Condition::Domain(_) | Condition::Descriptor(..) | Condition::DescriptorShape(_) => {
                true
            }
            Condition::All(parts) | Condition::Any(parts) => {
                parts.iter().any(Condition::names_descriptor)
            }
            Condition::Not(part) => part.names_descriptor(),
            _ => false,
        }
    }

    /// Why a Cedar condition holds or fails: Cedar's answer, in words.
    fn explain_cedar(&self, env: &Env<'_>) -> Result<String, String> {
        let r = env.request;
        let (holds, yes, no) = match self {
            Condition::Cedar { cedar, action } => {
                let answer = env.cedar.answer(r, *cedar, action);
                let principal = env.cedar.principal(r, *cedar);
                let said = describe(&answer);
                (
                    answer.allowed,
                    format!("cedar permits {principal} action `{action}` ({said})"),
                    format!("cedar does not permit {principal} action `{action}` ({said})"),
                )
            }
            Condition::CedarIn { cedar, ancestor } => {
                let principal = env.cedar.principal(r, *cedar);
                (
                    self.eval(env),
                    format!("principal {principal} is in {ancestor}"),
                    format!("principal {principal} is not in {ancestor}"),
                )
            }
            // Only Cedar conditions are sent here (see `explain`).
            _ => (self.eval(env), String::from("holds"), String::from("fails")),
        };
        if holds { Ok(yes) } else { Err(no) }
    }

    /// The route patterns of which one must match for the condition to hold, when the
    /// condition's shape says so; `None` when it may hold on any path.
    pub(crate) fn required_patterns(&self) -> Option<Vec<PatternId>> {
        match self {
            Condition::Route { patterns, .. } => Some(patterns.clone()),
            Condition::All(parts) => parts
                .iter()
                .filter_map(Condition::required_patterns)
                .min_by_key(Vec::len),
            Condition::Any(parts) => {
                let mut all = Vec::new();
                for part in parts {
                    all.extend(part.required_patterns()?);
                }
                all.sort_unstable();
                all.dedup();
                Some(all)
            }
            _ => None,
        }
    }

    /// The first route template that matched in the condition, for the `route` key.
    pub fn matched_route(&self, env: &Env<'_>) -> Option<PatternId> {
        match self {
            Condition::Route { patterns, .. } => {
                patterns.iter().copied().find(|p| env.routes.matched(*p))
            }
            Condition::All(parts) | Condition::Any(parts) => {
                parts.iter().find_map(|c| c.matched_route(env))
            }
            _ => None,
        }
    }

    /// Whether the condition, or a part of it, asks Cedar.
    pub fn uses_cedar(&self) -> bool {
        match self {
            Condition::Cedar { .. } | Condition::CedarIn { .. } => true,
            Condition::All(parts) | Condition::Any(parts) => {
                parts.iter().any(Condition::uses_cedar)
            }
            Condition::Not(part) => part.uses_cedar(),
            _ => false,
        }
    }
}

/// Cedar's answer in words: the determining policies, or that none permits.
pub(crate) fn describe(answer: &crate::authz::Answer) -> String {
    let mut said = match (answer.allowed, answer.policies.as_slice()) {
        (_, []) => "no policy permits".to_owned(),
        (true, ids) => format!("permitted by {}", quoted(ids)),
        (false, ids) => format!("forbidden by {}", quoted(ids)),
    };
    if !answer.errors.is_empty() {
        said.push_str(&format!("; errors: {}", answer.errors.join("; ")));
    }
    said
}

fn quoted(ids: &[Arc<str>]) -> String {
    let ids: Vec<String> = ids.iter().map(|id| format!("`{id}`")).collect();
    ids.join(", ")
}

/// Why a route condition holds or fails: the template that matched, or none, or the method.
fn explain_route(
    methods: &[Method],
    patterns: &[PatternId],
    env: &Env<'_>,
) -> Result<String, String> {
    let r = env.request;
    let Some(p) = patterns.iter().find(|p| env.routes.matched(**p)) else {
        let templates: Vec<String> = patterns
            .iter()
            .map(|p| format!("`{}`", env.index.template(*p)))
            .collect();
        return Err(format!(
            "path `{}` matches none of {}",
            r.path,
            templates.join(", ")
        ));
    };
    if !method_in(methods, &r.method) {
        return Err(format!(
            "method {} is not {}",
            r.method,
            method_list(methods)
        ));
    }
    Ok(format!(
        "{} {} matches route `{}`",
        r.method,
        r.path,
        env.index.template(*p)
    ))
}

fn method_in(methods: &[Method], method: &Method) -> bool {
    methods.is_empty() || methods.contains(method)
}

fn method_list(methods: &[Method]) -> String {
    let names: Vec<&str> = methods.iter().map(Method::as_str).collect();
    names.join("|")
}

fn shown(value: Option<&str>) -> String {
    value.map_or_else(|| "missing".to_owned(), |v| format!("`{v}`"))
}

fn shown_ip(ip: Option<IpAddr>) -> String {
    ip.map_or_else(|| "address unknown".to_owned(), |ip| ip.to_string())
}
