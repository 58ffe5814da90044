//! The policy language against its corpus: every `tests/dsl/ok/*.rl` parses and compiles,
//! with its syntax tree snapshotted; every case in `tests/dsl/err/` (a file, or a directory
//! for problems across files) fails with located diagnostics, snapshotted as users see them.

use std::path::{Path, PathBuf};

use tollgate::{PolicySet, compile};

/// The path relative to the crate, so that snapshots do not depend on the checkout's place.
fn relative(path: &Path) -> PathBuf {
    path.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap_or(path)
        .to_path_buf()
}

#[test]
fn valid_files_parse_and_compile() {
    insta::glob!("dsl/ok/*.rl", |path| {
        let set = PolicySet::load(&[relative(path)]);
        if let Err(errors) = compile(&set) {
            panic!(
                "{} does not compile:\n{}",
                path.display(),
                errors.render_plain(100)
            );
        }
        insta::assert_debug_snapshot!(set.files()[0].ast);
    });
}

#[test]
fn broken_files_get_located_diagnostics() {
    insta::glob!("dsl/err/*", |path| {
        let set = PolicySet::load(&[relative(path)]);
        let errors = match compile(&set) {
            Ok(_) => panic!("{} compiled, but should not", path.display()),
            Err(errors) => errors,
        };
        for error in errors.errors() {
            assert!(
                error.span().is_some(),
                "{}: `{}` has no location",
                path.display(),
                error.message()
            );
            assert!(
                error.help_text().is_some(),
                "{}: `{}` has no help",
                path.display(),
                error.message()
            );
        }
        insta::assert_snapshot!(errors.render_plain(100));
    });
}

#[test]
fn the_shipped_policies_compile() {
    let set = PolicySet::load(&[Path::new("policies")]);
    let plan = compile(&set).unwrap_or_else(|e| panic!("{}", e.render_plain(100)));
    assert!(plan.limits().len() >= 5);
}

#[test]
fn the_example_policies_compile() {
    let set = PolicySet::load(&[Path::new("examples/llm")]);
    let plan = compile(&set).unwrap_or_else(|e| panic!("{}", e.render_plain(100)));
    assert_eq!(plan.limits().len(), 3);
    assert!(plan.warnings().is_empty(), "{:?}", plan.warnings());
}

#[test]
fn every_example_in_the_language_reference_parses() {
    let doc = std::fs::read_to_string("docs/language.md").unwrap();
    let mut examples = 0;
    let mut all = String::new();
    let mut rest = doc.as_str();
    while let Some(start) = rest.find("```rl\n") {
        let body = &rest[start + 6..];
        let end = body.find("```").expect("unclosed example");
        let example = &body[..end];
        examples += 1;
        let set =
            PolicySet::from_sources([(format!("docs/language.md example {examples}"), example)]);
        assert!(
            set.errors().is_empty(),
            "example {examples} does not parse:\n{example}\n{}",
            set.errors()
                .iter()
                .map(|e| e.render_plain(100))
                .collect::<Vec<_>>()
                .join("\n")
        );
        all.push_str(example);
        rest = &body[end + 3..];
    }
    // Every construct of the language has an example.
    let constructs = [
        "version",
        "namespace",
        "import cedar",
        "schema",
        "key ",
        "first_of(",
        "header(",
        "claim(",
        "query(",
        "ip/24",
        "ip/48",
        "user_id",
        "api_token",
        "route",
        "global",
        "defaults",
        "tiers",
        "from header",
        "from claim",
        "default ",
        "extends",
        "unlimited",
        "blocked",
        "limit",
        "match",
        "when",
        "method",
        "host",
        "~=",
        "==",
        "!=",
        "user_agent",
        "ip in",
        "cedar permits",
        " and ",
        " or ",
        "not ",
        "&&",
        "||",
        "algorithm",
        "fixed_window",
        "sliding_window",
        "token_bucket",
        "gcra",
        "quota",
        "burst",
        "concurrent",
        "lease",
        "cost",
        "default 1 max",
        "soft",
        "warn at",
        "delay",
        "on_exceed",
        "reason",
        "ban",
        "mode shadow",
        "on_store_error",
        "priority",
        "safelist",
        "denylist",
        "respond",
        "anomaly",
        "count when status",
        "detect",
        "then",
        "alert",
        "/month",
        "/day",
        "/**",
        "{id}",
        "/*\"",
        "domain \"",
        "domain ~=",
        "descriptor(",
        "descriptor [",
        "from descriptor",
    ];
    let missing: Vec<&str> = constructs
        .iter()
        .copied()
        .filter(|c| !all.contains(c))
        .collect();
    assert!(
        missing.is_empty(),
        "no example shows {missing:?} ({examples} examples)"
    );
    // And every keyword of the grammar, derived from it: a new keyword without an example
    // fails here.
    let words = |text: &str| -> std::collections::BTreeSet<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let shown = words(&all);
    let unshown: Vec<String> = grammar_keywords()
        .into_iter()
        .filter(|k| !shown.contains(k))
        .collect();
    assert!(
        unshown.is_empty(),
        "no example in docs/language.md uses the keyword(s) {unshown:?}"
    );
}

/// The grammar's keywords: every quoted word in `grammar/policy.pest`, comments and time
/// units aside (units have their own table in the reference).
fn grammar_keywords() -> Vec<String> {
    let grammar = std::fs::read_to_string("grammar/policy.pest").unwrap();
    let mut keywords = std::collections::BTreeSet::new();
    let mut in_units = false;
    for line in grammar.lines() {
        let line = line.trim();
        if line.starts_with("//") {
            continue;
        }
        if line.starts_with("unit = ") {
            in_units = true;
        }
        if in_units {
            in_units = line != "}";
            continue;
        }
        for quoted in line.split('"').skip(1).step_by(2) {
            if quoted.len() >= 2 && quoted.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                keywords.insert(quoted.to_owned());
            }
        }
    }
    assert!(keywords.len() > 50, "the grammar's keywords: {keywords:?}");
    keywords.into_iter().collect()
}

#[test]
fn the_complete_example_in_the_language_reference_compiles() {
    let doc = std::fs::read_to_string("docs/language.md").unwrap();
    let start = doc
        .find("```rl\n# complete example")
        .expect("the complete example");
    let body = &doc[start + 6..];
    let example = &body[..body.find("```").unwrap()];
    let set = PolicySet::from_sources([("complete.rl", example)]);
    if let Err(errors) = compile(&set) {
        panic!("{}", errors.render_plain(100));
    }
}

#[test]
fn the_benchmark_policies_compile() {
    for entry in std::fs::read_dir("benches").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rl") {
            let set = PolicySet::load(&[&path]);
            if let Err(errors) = compile(&set) {
                panic!("{}:\n{}", path.display(), errors.render_plain(100));
            }
        }
    }
}
