#![expect(
    missing_docs,
    reason = "criterion_group! and criterion_main! generate undocumented items"
)]
//! Parsing and compiling a large policy set: 1,000 generated limits.
//!
//! `cargo bench --bench compile`. Figures and the machine are in `docs/performance.md`.

use std::fmt::Write as _;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::{PolicySet, compile};

/// 1,000 limits over 10 files, each with its own route, and a mix of algorithms, keys,
/// conditions and tiers, as a large deployment would have.
fn generated() -> Vec<(String, String)> {
    let algorithms = ["fixed_window", "sliding_window", "token_bucket", "gcra"];
    (0..10)
        .map(|f| {
            let mut text = String::from("version 1;\n");
            if f == 0 {
                text.push_str(
                    "key identity = first_of(user_id, api_token, header(\"X-Client-Id\"), ip);\n",
                );
            }
            let _ = writeln!(
                text,
                "tiers plans{f} {{ from header(\"X-Plan\"); default free; \
                 tier free {{ api = 60/min; }} tier pro extends free {{ api = 600/min; }} }}"
            );
            for i in 0..100 {
                let n = f * 100 + i;
                let algorithm = algorithms[n % algorithms.len()];
                let rate = if n % 5 == 0 {
                    format!("plans{f}.api")
                } else if algorithm == "token_bucket" || algorithm == "gcra" {
                    format!("{}/min burst {}", 10 + n, 5 + n % 7)
                } else {
                    format!("{}/min", 10 + n)
                };
                let _ = writeln!(
                    text,
                    "limit l{n} {{\n  match {{ route GET|POST \"/api/v{f}/r{i}/{{id}}/**\"; \
                     header(\"X-Env\") != \"test\" or ip in [10.{f}.{i}.0/24]; }}\n  key identity + route;\n  \
                     algorithm {algorithm};\n  rate {rate};\n  soft warn at 80%;\n  priority {};\n}}",
                    n % 10
                );
            }
            (format!("gen{f}.rl"), text)
        })
        .collect()
}

fn compile_bench(c: &mut Criterion) {
    let sources = generated();
    let set = PolicySet::from_sources(sources.iter().map(|(n, t)| (n.as_str(), t.as_str())));
    let plan = compile(&set).unwrap_or_else(|e| panic!("{}", e.render_plain(100)));
    assert_eq!(plan.limits().len(), 1000);

    let mut group = c.benchmark_group("compile");
    group.sample_size(20);
    group.bench_function("parse_and_compile_1000_limits", |b| {
        b.iter(|| {
            let set =
                PolicySet::from_sources(sources.iter().map(|(n, t)| (n.as_str(), t.as_str())));
            compile(&set).unwrap()
        })
    });
    group.bench_function("compile_1000_limits", |b| b.iter(|| compile(&set).unwrap()));
    group.finish();
}

criterion_group!(benches, compile_bench);
criterion_main!(benches);
