//! The `tollgate` command: serve, check and explain policies.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tollgate::config::{Flags, Settings};

#[path = "main/admin.rs"]
mod admin;
#[path = "main/analytics.rs"]
mod analytics;
#[path = "main/args.rs"]
mod args;
#[path = "main/import.rs"]
mod import;

use self::admin::admin;
use self::analytics::analytics;
use self::args::{Cli, Command};
use tollgate::plan::KeyHasher;
use tollgate::{PolicySet, RequestCtx, compile};

/// glibc's allocator serialises threads that free each other's memory (a tokio worker often
/// frees what another allocated); mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve {
            listen,
            policies,
            config,
            upstream,
        } => serve(Flags {
            listen,
            policies,
            config,
            upstream,
        }),
        Command::Check { paths } => check(&paths),
        Command::Import {
            from: args::ImportFrom::EnvoyRatelimit { files, output },
        } => import_envoy(&files, output.as_deref()),
        Command::Explain {
            policies,
            method,
            path,
            domain,
            descriptor,
            headers,
            ip,
            user_id,
            api_token,
            claims,
            untrusted,
        } => {
            let built = match (domain, path) {
                (Some(domain), _) => descriptor_request(domain, &descriptor),
                (None, Some(path)) => {
                    build_request(&method, &path, &headers, ip, user_id, api_token, &claims)
                }
                (None, None) => Err("give --path, or --domain for an Envoy request".to_owned()),
            };
            let request = match built {
                Ok(r) if untrusted => r,
                Ok(r) => r.with_trusted_headers(),
                Err(message) => {
                    eprintln!("error: {message}");
                    return ExitCode::from(2);
                }
            };
            let set = PolicySet::load(&[policies]);
            match compile(&set) {
                Ok(plan) => {
                    let explanation =
                        tollgate::explain::explain(&plan, &request, &KeyHasher::random());
                    print!("{explanation}");
                    ExitCode::SUCCESS
                }
                Err(errors) => report(&errors),
            }
        }
        Command::Admin {
            url,
            token,
            config,
            action,
        } => admin(url, token, config, action),
        Command::Analytics {
            url,
            database,
            config,
            action,
        } => analytics(url, database, config, action),
    }
}

/// The runtime a CLI command's calls run on, or the exit code after saying why not.
pub(crate) fn cli_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

fn serve(flags: Flags) -> ExitCode {
    let settings = match Settings::load(&flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!("see docs/configuration.md for every setting");
            return ExitCode::from(2);
        }
    };
    tollgate::telemetry::init(settings.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tollgate::server::serve(&settings, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(tollgate::server::ServeError::Policies { path, errors }) => {
            eprintln!("error: the policies in `{path}` do not compile");
            report(&errors)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C or SIGTERM: stop accepting, finish what is in flight.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}

/// `tollgate import envoy-ratelimit`: the limits on standard output (or `output`), then
/// checked as `tollgate check` would; problems on standard error, each `file:line: …`.
fn import_envoy(files: &[PathBuf], output: Option<&std::path::Path>) -> ExitCode {
    let imported = import::envoy_ratelimit(files);
    for warning in &imported.warnings {
        eprintln!("warning: {warning}");
    }
    if !imported.errors.is_empty() {
        for error in &imported.errors {
            eprintln!("error: {error}");
        }
        eprintln!(
            "error: {} problem(s): nothing was written",
            imported.errors.len()
        );
        return ExitCode::FAILURE;
    }
    // What is printed must compile: a converter bug is never left for `serve` to find.
    let set = PolicySet::from_sources([("imported.rl", imported.text.as_str())]);
    if let Err(errors) = compile(&set) {
        eprintln!("error: the converted limits do not compile (a bug in the converter):");
        return report(&errors);
    }
    match output {
        Some(path) => {
            if let Err(e) = std::fs::write(path, &imported.text) {
                eprintln!("error: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
        None => print!("{}", imported.text),
    }
    ExitCode::SUCCESS
}

fn check(paths: &[PathBuf]) -> ExitCode {
    let set = PolicySet::load(paths);
    match compile(&set) {
        Ok(plan) => {
            print_problems(plan.warnings());
            let warnings = match plan.warnings().len() {
                0 => String::new(),
                1 => ", 1 warning".to_owned(),
                n => format!(", {n} warnings"),
            };
            let cedar = match plan.cedar().iter().map(|c| c.len()).sum::<usize>() {
                0 if plan.cedar().is_empty() => String::new(),
                n => format!(", {n} Cedar polic{}", if n == 1 { "y" } else { "ies" }),
            };
            println!(
                "ok: {} file(s), {} limit(s){cedar}, plan {}{warnings}",
                set.files().len(),
                plan.limits().len(),
                plan.version()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => report(&errors),
    }
}

/// Prints problems rustc-style on standard error, coloured on a terminal.
fn print_problems(problems: &[tollgate::PolicyError]) {
    let width = terminal_width();
    let color = std::env::var_os("NO_COLOR").is_none()
        && std::io::IsTerminal::is_terminal(&std::io::stderr());
    for problem in problems {
        let text = if color {
            problem.render_terminal(width)
        } else {
            problem.render_plain(width)
        };
        eprintln!("{text}");
    }
}

fn report(errors: &tollgate::PolicyErrors) -> ExitCode {
    print_problems(errors.errors());
    eprintln!("error: {errors}");
    ExitCode::FAILURE
}

fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(100)
}

/// The request one descriptor of an Envoy rate-limit request stands for.
fn descriptor_request(domain: String, entries: &[String]) -> Result<RequestCtx, String> {
    if entries.is_empty() {
        return Err("an Envoy request needs at least one --descriptor KEY=VALUE".to_owned());
    }
    let entries = entries
        .iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(format!("`{e}` is not a descriptor entry `key=value`")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RequestCtx::for_descriptor(
        tollgate::request::Descriptor::new(domain, entries),
    ))
}

fn build_request(
    method: &str,
    path: &str,
    headers: &[String],
    ip: Option<IpAddr>,
    user_id: Option<String>,
    api_token: Option<String>,
    claims: &[String],
) -> Result<RequestCtx, String> {
    let method = http::Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("`{method}` is not an HTTP method"))?;
    let mut request =
        RequestCtx::try_new(method, path).map_err(|e| format!("the path `{path}`: {e}"))?;
    for header in headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| format!("`{header}` is not `Name: value`"))?;
        request = request.try_header(name, value).map_err(|e| e.to_string())?;
    }
    if let Some(ip) = ip {
        request = request.with_client_ip(ip);
    }
    if let Some(user) = user_id {
        request = request.with_user_id(user);
    }
    if let Some(token) = api_token {
        request = request.with_api_token(token);
    }
    for claim in claims {
        let (name, value) = claim
            .split_once('=')
            .ok_or_else(|| format!("`{claim}` is not `name=value`"))?;
        request = request.with_claim(name.trim(), value.trim());
    }
    Ok(request)
}
