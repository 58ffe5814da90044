//! `tollgate admin`: one call to a running server's admin API; the answer as JSON (explain:
//! as text).

use std::path::PathBuf;
use std::process::ExitCode;

use http::Method;
use serde_json::{Value, json};
use tollgate::config::{Flags, Settings};
use tollgate::server::AdminClient;

use super::args::{AdminAction, NewEntry};
use super::cli_runtime;

/// One admin call: how to reach the server, what to ask, what it answered.
pub(crate) fn admin(
    url: Option<String>,
    token: Option<String>,
    config: Option<PathBuf>,
    action: AdminAction,
) -> ExitCode {
    let client = match client(url, token, config) {
        Ok(client) => client,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let (method, path, body) = match call_of(&action) {
        Ok(call) => call,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match cli_runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(client.call(method, &path, body)) {
        Ok(reply) if (200..300).contains(&reply.status) => {
            match (
                &action,
                reply.body.get("explanation").and_then(Value::as_str),
            ) {
                (AdminAction::Explain { .. }, Some(text)) => print!("{text}"),
                _ => println!(
                    "{}",
                    serde_json::to_string_pretty(&reply.body).unwrap_or_default()
                ),
            }
            ExitCode::SUCCESS
        }
        Ok(reply) => {
            let detail = reply
                .body
                .get("detail")
                .and_then(Value::as_str)
                .map_or_else(|| reply.body.to_string(), str::to_owned);
            eprintln!("error: {} {detail}", reply.status);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The client for the admin API: `url` and `token` as given, else from the settings.
fn client(
    url: Option<String>,
    token: Option<String>,
    config: Option<PathBuf>,
) -> Result<AdminClient, String> {
    let settings = Settings::load(&Flags {
        config,
        ..Flags::default()
    });
    let (url, token) = match (url, token, &settings) {
        (Some(url), Some(token), _) => (url, token),
        (url, token, Ok(s)) => {
            let url = url.unwrap_or_else(|| format!("http://{}", s.admin_listen));
            let token = token
                .or_else(|| s.admin_token.clone())
                .ok_or("no admin token: set TOLLGATE_ADMIN_TOKEN, or pass --token")?;
            (url, token)
        }
        (_, _, Err(e)) => return Err(format!("{e}\n(or pass both --url and --token)")),
    };
    AdminClient::new(&url, &token).map_err(|e| e.to_string())
}

/// The call an action makes: method, path and query, body.
fn call_of(action: &AdminAction) -> Result<(Method, String, Option<Value>), String> {
    Ok(match action {
        AdminAction::Plan => (Method::GET, "/admin/plan".to_owned(), None),
        AdminAction::Reload => (Method::POST, "/admin/reload".to_owned(), None),
        AdminAction::Explain {
            method,
            path,
            ip,
            headers,
            trusted_headers,
        } => {
            let mut described = json!({
                "method": method, "path": path, "trusted_headers": trusted_headers,
            });
            if let Some(ip) = ip {
                described["client_ip"] = json!(ip);
            }
            described["headers"] = header_map(headers)?;
            (Method::POST, "/admin/explain".to_owned(), Some(described))
        }
        AdminAction::Keys {
            key,
            client,
            namespace,
            limit,
            reset,
        } => {
            let q = query(&[
                ("key", key),
                ("client", client),
                ("namespace", namespace),
                ("limit", limit),
            ]);
            let method = if *reset { Method::DELETE } else { Method::GET };
            (method, format!("/admin/keys?{q}"), None)
        }
        AdminAction::Key { key } => (Method::GET, format!("/admin/key?key={}", encode(key)), None),
        AdminAction::Diagnostics => (Method::GET, "/admin/diagnostics".to_owned(), None),
        AdminAction::Lists => (Method::GET, "/admin/lists".to_owned(), None),
        AdminAction::Ban(entry) => (
            Method::POST,
            "/admin/lists".to_owned(),
            Some(new_entry("denylist", entry)?),
        ),
        AdminAction::Allow(entry) => (
            Method::POST,
            "/admin/lists".to_owned(),
            Some(new_entry("safelist", entry)?),
        ),
        AdminAction::Unlist { list, target } => {
            let mut q = format!("/admin/lists?list={}", encode(list));
            for (name, value) in target.fields()? {
                q.push_str(&format!("&{name}={}", encode(&value)));
            }
            (Method::DELETE, q, None)
        }
    })
}

/// `Name: value` headers as a JSON object.
fn header_map(headers: &[String]) -> Result<Value, String> {
    let mut map = serde_json::Map::new();
    for header in headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| format!("`{header}` is not `Name: value`"))?;
        map.insert(name.trim().to_owned(), value.trim().into());
    }
    Ok(map.into())
}

/// The body of a new entry of `list`.
fn new_entry(list: &str, entry: &NewEntry) -> Result<Value, String> {
    let mut body = json!({ "list": list });
    for (name, value) in entry.target.fields()? {
        body[name] = value.into();
    }
    if let Some(s) = entry.for_seconds {
        body["for_seconds"] = json!(s);
    }
    if let Some(r) = &entry.reason {
        body["reason"] = json!(r);
    }
    Ok(body)
}

/// The pairs that have a value, as a query string.
fn query(pairs: &[(&str, &Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    parts.join("&")
}

/// `value` percent-encoded for a query string.
fn encode(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC).to_string()
}
