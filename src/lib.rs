//! Tollgate: a policy-driven HTTP rate limiter.
//!
//! Operators write limits in a small declarative language (`.rl` files, see
//! `docs/language.md`). [`PolicySet::load`] reads and parses them, [`compile`] turns them into an
//! immutable [`Plan`], and an [`Engine`] evaluates requests against the plan and a counter
//! [`Store`](store::Store).
//!
//! ```
//! use tollgate::{compile, Engine, PolicySet, RequestCtx, store::MemoryStore};
//!
//! let policies = PolicySet::from_sources([(
//!     "api.rl",
//!     r#"limit api { match { route ANY "/api/**"; } key ip; rate 2/min; }"#,
//! )]);
//! let plan = compile(&policies).expect("valid policy");
//! let engine = Engine::new(plan, MemoryStore::new());
//! let request = RequestCtx::new(http::Method::GET, "/api/users").with_client_ip("192.0.2.7".parse().unwrap());
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! assert!(engine.decide(&request).await.is_allowed());
//! assert!(engine.decide(&request).await.is_allowed());
//! assert!(!engine.decide(&request).await.is_allowed());
//! # });
//! ```

pub mod analytics;
pub mod anomaly;
pub mod authz;
pub mod clock;
pub mod config;
pub mod diagnostic;
pub mod dsl;
pub mod engine;
pub mod explain;
pub mod identity;
pub mod json;
pub mod limiter;
pub mod metrics;
pub mod middleware;
pub mod observers;
pub mod pipeline;
pub mod plan;
pub mod proxy;
pub mod reload;
pub mod request;
pub mod response;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod verdict;

pub use clock::{Clock, ManualClock, SystemClock, Timestamp, TokioClock};
pub use diagnostic::{PolicyError, PolicyErrors};
pub use dsl::PolicySet;
pub use engine::Engine;
pub use middleware::{RateLimit, RateLimitLayer};
pub use plan::{Plan, compile};
pub use request::RequestCtx;
pub use verdict::{Action, LimitReport, Verdict};
