//! The `tollgate` command: exit codes and what users read.

use std::process::{Command, Output};

fn tollgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_accepts_the_shipped_policies() {
    let out = tollgate(&["check", "policies"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("ok: 3 file(s), 8 limit(s), 3 Cedar policies, plan "));
}

#[test]
fn check_reports_every_problem_with_its_place_and_exits_1() {
    let out = tollgate(&["check", "tests/dsl/err/many_problems.rl"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("tests/dsl/err/many_problems.rl:3:21"),
        "{stderr}"
    );
    assert!(stderr.contains("unknown algorithm `nope`"), "{stderr}");
    assert!(stderr.contains("unknown mode `loud`"), "{stderr}");
    assert!(
        stderr.contains("error: 4 problems in the policy files"),
        "{stderr}"
    );
}

#[test]
fn check_explains_a_missing_path() {
    let out = tollgate(&["check", "no/such/dir"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot read `no/such/dir`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn explain_shows_applying_limits_keys_and_tiers() {
    let out = tollgate(&[
        "explain",
        "--policies",
        "policies",
        "--method",
        "GET",
        "--path",
        "/api/v1/search?q=x",
        "--header",
        "X-Plan: pro",
        "--ip",
        "203.0.113.9",
        "--api-token",
        "tok_sekrit",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("✓ search: 50 per 1s, burst 100 (gcra)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("tier  `pro` of `plans` (from header `x-plan`)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("✗ login: path `/api/v1/search` matches none of `/auth/login`"),
        "{stdout}"
    );
    assert!(stdout.contains("key   api:{token:"), "{stdout}");
    assert!(
        !stdout.contains("tok_sekrit"),
        "a token appeared in clear: {stdout}"
    );
}

#[test]
fn explain_refuses_bad_input_with_a_message() {
    let out = tollgate(&["explain", "--path", "/x", "--header", "no colon"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`no colon` is not `Name: value`"));
    let out = tollgate(&["explain", "--path", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("does not start with `/`"));
}

#[test]
fn explain_shows_which_limits_count_an_envoy_descriptor() {
    let out = tollgate(&[
        "explain",
        "--policies",
        "tests/dsl/ok/envoy.rl",
        "--domain",
        "edge",
        "--descriptor",
        "remote_address=203.0.113.7",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains("1 limit(s) apply:\n  ✓ per_address"),
        "{stdout}"
    );
    assert!(
        stdout.contains("key   envoy:{ip:203.0.113.7/32}:per_address"),
        "{stdout}"
    );
    // Why the others do not: the domain, the shape.
    assert!(
        stdout.contains("marketing_texts: domain `edge` fails the test: is `messaging`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("per_api_key: descriptor [remote_address=203.0.113.7] fails"),
        "{stdout}"
    );
    // An entry must be `key=value`; a domain needs one.
    let out = tollgate(&["explain", "--domain", "edge", "--descriptor", "novalue"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`novalue` is not a descriptor entry"));
    let out = tollgate(&["explain", "--domain", "edge"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("at least one --descriptor"));
}

#[test]
fn explain_shows_what_a_usage_limit_reserves_and_reads() {
    let out = tollgate(&[
        "explain",
        "--policies",
        "examples/llm",
        "--method",
        "POST",
        "--path",
        "/v1/chat/completions",
        "--api-token",
        "sk-test",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(
            "usage reserves the request body's `max_tokens` (default 4000, at most 128000); \
             settles at what the response says it used, `usage.prompt_tokens` + 4 × \
             `usage.completion_tokens`"
        ),
        "{stdout}"
    );
    assert!(!stdout.contains("sk-test"), "the token only hashed");
}
