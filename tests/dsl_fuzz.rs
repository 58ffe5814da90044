//! The parser and compiler under hostile input: random mutations of the shipped policies and
//! of the language reference's examples, and adversarial shapes (depth, width, long tokens,
//! unicode). Whatever the input, they answer — a plan or located problems — without a panic,
//! a stack overflow, or a stall.

use std::sync::mpsc;
use std::time::Duration;

use proptest::prelude::*;
use tollgate::{PolicySet, compile};

/// Every policy text the project ships or documents.
fn corpus() -> Vec<String> {
    let mut texts = Vec::new();
    for entry in std::fs::read_dir("policies").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rl") {
            texts.push(std::fs::read_to_string(path).unwrap());
        }
    }
    let doc = std::fs::read_to_string("docs/language.md").unwrap();
    for block in doc.split("```rl\n").skip(1) {
        texts.push(block.split("```").next().unwrap().to_owned());
    }
    for dir in ["tests/dsl/ok", "tests/dsl/err"] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rl") {
                texts.push(std::fs::read_to_string(path).unwrap());
            }
        }
    }
    assert!(texts.len() > 20, "the corpus is the project's own policies");
    texts
}

/// Compiles `text` on a thread with the stack a test thread gets (2 MiB), and fails if that
/// does not end: a stall detector, with a bound far above the milliseconds it takes.
fn compiles_without_crashing(name: &str, text: String) {
    let (done, finished) = mpsc::channel();
    let name = name.to_owned();
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let result = compile(&PolicySet::from_sources([(name.clone(), text)]));
            if let Err(errors) = &result {
                // Every problem renders, and names a place in the file.
                assert!(errors.total() >= errors.errors().len());
                for error in errors.errors().iter().take(3) {
                    assert!(!error.render_plain(80).is_empty());
                }
            }
            let _ = done.send(());
        })
        .unwrap();
    finished
        .recv_timeout(Duration::from_secs(60))
        .expect("the compiler panicked or stalled");
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete { at: usize, len: usize },
    Duplicate { at: usize, len: usize, times: usize },
    Insert { at: usize, token: &'static str },
    Truncate { at: usize },
}

const TOKENS: &[&str] = &[
    "{",
    "}",
    "(",
    ")",
    ";",
    "\"",
    "not ",
    "!",
    "and ",
    "||",
    "limit x ",
    "route GET \"/",
    "rate 1/s;",
    "burst",
    "tier",
    "plans.",
    "first_of(",
    "ip/",
    "/**/",
    "{id}",
    "é",
    "\u{0}",
    "\u{202e}",
    "99999999999999999999999",
    "#",
    "//",
    "\n",
    "ip in [",
    "::",
    "%",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0..40usize).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), 1..60usize, 1..50usize).prop_map(|(at, len, times)| Mutation::Duplicate {
            at,
            len,
            times
        }),
        (any::<usize>(), prop::sample::select(TOKENS))
            .prop_map(|(at, token)| Mutation::Insert { at, token }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

/// The nearest character boundary at or before `at % (len + 1)`.
fn boundary(text: &str, at: usize) -> usize {
    let mut at = at % (text.len() + 1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn apply(text: &mut String, mutation: &Mutation) {
    match *mutation {
        Mutation::Delete { at, len } => {
            let start = boundary(text, at);
            let end = boundary(text, start + len.min(text.len() - start));
            text.replace_range(start..end.max(start), "");
        }
        Mutation::Duplicate { at, len, times } => {
            let start = boundary(text, at);
            let end = boundary(text, start + len.min(text.len() - start)).max(start);
            let piece = text[start..end].repeat(times);
            text.insert_str(end, &piece);
        }
        Mutation::Insert { at, token } => {
            let at = boundary(text, at);
            text.insert_str(at, token);
        }
        Mutation::Truncate { at } => {
            let at = boundary(text, at);
            text.truncate(at);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn mutated_policies_get_a_plan_or_located_problems(
        pick in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..8),
    ) {
        static CORPUS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
        let mut text = pick.get(CORPUS.get_or_init(corpus)).clone();
        for m in &mutations {
            apply(&mut text, m);
        }
        compiles_without_crashing("mutated.rl", text);
    }
}

#[test]
fn adversarial_shapes_are_answered() {
    let deep = |open: &str, close: &str, n: usize| {
        format!(
            "limit x {{ match {{ {}route \"/\"{}; }} rate 1/s; }}\nlimit y {{ rate 1/s; }}\n",
            open.repeat(n),
            close.repeat(n)
        )
    };
    let shapes: Vec<(&str, String)> = vec![
        ("parentheses", deep("(", ")", 100_000)),
        ("nots", deep("not ", "", 100_000)),
        ("bangs", deep("!", "", 100_000)),
        ("mixed", deep("!(", ")", 50_000)),
        (
            "unclosed",
            "limit x { when ".to_owned() + &"(".repeat(200_000),
        ),
        (
            "wide or",
            format!(
                "limit x {{ match {{ {}; }} rate 1/s; }}",
                vec!["header(\"a\") == \"b\""; 20_000].join(" or ")
            ),
        ),
        (
            "many routes",
            format!(
                "limit x {{ match {{ route GET {}; }} rate 1/s; }}",
                (0..20_000)
                    .map(|i| format!("\"/r{i}/{{id}}/**\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        ("repeated limits", "limit x { rate 1/s; }\n".repeat(20_000)),
        (
            "repeated broken items",
            "limit x { rate; }\n".repeat(20_000),
        ),
        (
            "long string",
            format!(
                "limit x {{ match {{ route GET \"/{}\"; }} }}",
                "a".repeat(1 << 20)
            ),
        ),
        (
            "long name",
            format!("limit {} {{ rate 1/s; }}", "x".repeat(1 << 20)),
        ),
        (
            "long number",
            format!("limit x {{ rate {}/s; }}", "9".repeat(100_000)),
        ),
        (
            "unicode",
            "limit é { match { route GET \"/🦀/{ид}\"; } rate 1/s; }\u{202e}".repeat(500),
        ),
        (
            "big ip list",
            format!(
                "denylist d {{ ip in [{}]; }}",
                (0..100_000u32)
                    .map(|i| std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        ("braces", "{".repeat(100_000)),
        ("nul bytes", "\0".repeat(100_000)),
    ];
    for (name, text) in shapes {
        compiles_without_crashing(name, text);
    }
}

#[test]
fn nesting_up_to_the_bound_compiles_and_past_it_is_a_located_problem() {
    let at = |n: usize| {
        format!(
            "limit x {{\n  match {{ {}route \"/\"{}; }}\n  rate 1/s;\n}}\n",
            "not (".repeat(n / 2),
            ")".repeat(n / 2)
        )
    };
    assert!(compile(&PolicySet::from_sources([("ok.rl", at(64))])).is_ok());
    let errors = compile(&PolicySet::from_sources([("deep.rl", at(66))])).unwrap_err();
    assert_eq!(errors.total(), 1);
    let text = errors.errors()[0].render_plain(100);
    assert!(text.contains("nest more than 64 levels"), "{text}");
    assert!(text.contains("deep.rl:2:"), "{text}");
}

#[test]
fn one_report_holds_a_bounded_number_of_problems() {
    let errors = compile(&PolicySet::from_sources([(
        "dup.rl",
        "limit x { rate 1/s; }\n".repeat(5_000),
    )]))
    .unwrap_err();
    assert_eq!(errors.total(), 4_999);
    assert_eq!(errors.errors().len(), tollgate::diagnostic::MAX_REPORTED);
    assert!(errors.to_string().contains("4999 problems"), "{errors}");
    assert!(
        errors.errors()[99]
            .render_plain(100)
            .contains("first defined at dup.rl:1:7")
    );
}
