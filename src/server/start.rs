//! Start-up wiring: the store (Redis or memory, by environment), the key hasher, the
//! identifier, and the engine, from the settings.

use super::*;

/// Reads and compiles the policies the settings name, with the Cedar answer cache they say.
pub fn load_plan(settings: &Settings) -> Result<crate::plan::Plan, PolicyErrors> {
    let set = PolicySet::load(&[&settings.policies]);
    let plan = compile(&set)?;
    Ok(plan.with_cedar_cache(
        settings.cedar_cache_size,
        Duration::from_millis(settings.cedar_cache_ttl_ms),
    ))
}

/// Builds the engine and state for `settings`: the Redis store when `redis_url` is set and
/// answers; when it does not, `prod` refuses to start and `dev` warns and counts in memory.
pub async fn build(settings: &Settings) -> Result<Arc<AppState<AnyStore>>, ServeError> {
    let plan = load_plan(settings).map_err(|errors| ServeError::Policies {
        path: settings.policies.display().to_string(),
        errors,
    })?;
    let store = match &settings.redis_url {
        None => AnyStore::Memory(MemoryStore::with_max_keys(settings.memory_max_keys)),
        Some(url) => {
            let options = redis_options(settings);
            match RedisStore::connect_with(url, options).await {
                Ok(store) => {
                    tracing::info!(url = %redact(url), cluster = store.is_cluster(), "counting in Redis");
                    AnyStore::Redis(Box::new(store))
                }
                Err(e) if settings.env == Environment::Prod => {
                    return Err(ServeError::Store(format!(
                        "cannot reach Redis at `{}`: {e}",
                        redact(url)
                    )));
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot reach Redis at `{}` ({e}): COUNTING IN THIS PROCESS'S MEMORY (dev only; prod refuses to start)",
                        redact(url)
                    );
                    AnyStore::Memory(MemoryStore::with_max_keys(settings.memory_max_keys))
                }
            }
        }
    };
    let hasher = match &settings.key_secret {
        Some(secret) => KeyHasher::from_secret(secret),
        None => {
            tracing::warn!(
                "no TOLLGATE_KEY_SECRET: hashed tokens in keys change at every restart (dev only)"
            );
            KeyHasher::random()
        }
    };
    for warning in plan.warnings() {
        tracing::warn!(
            file = warning.file_name(),
            "policy warning: {}",
            warning.message()
        );
    }
    tracing::info!(
        limits = plan.limits().len(),
        version = plan.version(),
        policies = %settings.policies.display(),
        "policies loaded"
    );
    let nodes = NonZeroU64::new(settings.expected_nodes).unwrap_or(NonZeroU64::MIN);
    let engine = Arc::new(
        Engine::new(plan, store)
            .with_key_hasher(hasher)
            .with_local_share(nodes)
            .with_local_max_keys(settings.memory_max_keys),
    );
    let exporting = match &settings.clickhouse_url {
        Some(url) => Some(exporting(settings, url, engine.key_hasher()).await?),
        None => None,
    };
    let metrics = Some(Arc::new(crate::metrics::Metrics::new()));
    let observers = Observers::new(&engine, metrics, exporting);
    let options = HttpOptions {
        identifier: identifier(settings)?,
        headers: response::HeaderFamilies {
            legacy: settings.legacy_headers,
            ietf: settings.ietf_headers,
        },
    };
    Ok(Arc::new(AppState {
        max_body_bytes: settings.max_body_bytes,
        upstream: settings.upstream.clone().map(Upstream::new),
        metrics_on_main: settings.metrics_on_main,
        ..AppState::new(engine, observers, options)
    }))
}

/// The ClickHouse export the settings ask for: the client (which retries until ClickHouse
/// answers; requests never wait for it), the migrations when `clickhouse_migrate` is set,
/// the exporter's thread.
async fn exporting(
    settings: &Settings,
    url: &str,
    hasher: &KeyHasher,
) -> Result<Exporting, ServeError> {
    let client = match crate::analytics::client(url).await {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(error = %e, "ClickHouse does not answer yet; decisions wait in the export queue");
            clickhouse::Client::default()
                .with_url(url)
                .with_validation(false)
        }
    };
    if settings.clickhouse_migrate {
        for step in crate::analytics::migrate(&client, &settings.clickhouse_database).await? {
            tracing::info!(?step, "ClickHouse migration");
        }
    }
    let exporter = crate::analytics::export::Exporter::start(client, export_settings(settings))?;
    let node = std::env::var("HOSTNAME").unwrap_or_else(|_| "tollgate".to_owned());
    tracing::info!(database = %settings.clickhouse_database, "decisions exported to ClickHouse");
    Ok(Exporting::new(exporter, node, hasher.clone()))
}

/// How decisions are exported, from the settings.
fn export_settings(settings: &Settings) -> crate::analytics::export::ExportSettings {
    crate::analytics::export::ExportSettings {
        database: settings.clickhouse_database.clone(),
        spool: settings.clickhouse_spool_dir.as_ref().map(|dir| {
            crate::analytics::spool::SpoolSettings {
                dir: dir.clone(),
                max_bytes: settings.clickhouse_spool_max_mb.saturating_mul(1 << 20),
            }
        }),
        sample_allows: settings.clickhouse_sample_allows,
        tenant_header: settings.clickhouse_tenant_header.clone(),
        truncate_ip: settings.clickhouse_truncate_ip,
        ..Default::default()
    }
}

/// How clients are identified, from the settings (the library's `Identifier` knows nothing
/// of the server's configuration).
pub fn identifier(settings: &Settings) -> Result<Identifier, JwtKeyError> {
    let mut id = Identifier::new()
        .with_trusted_proxies(settings.trusted_proxies.clone())
        .with_api_key_header(settings.api_key_header.clone());
    if let Some(h) = &settings.user_header {
        id = id.with_user_header(h.clone());
    }
    if let Some(jwt) = &settings.jwt {
        id = id.with_jwt(jwt)?;
    }
    Ok(id)
}

/// The Redis store's options from the settings.
pub fn redis_options(settings: &Settings) -> RedisOptions {
    let timeout = Duration::from_millis(settings.store_timeout_ms);
    let max_backoff = Duration::from_millis(settings.breaker_max_backoff_ms);
    RedisOptions {
        timeout,
        // Connecting may take longer than one call: give it a second at least.
        connect_timeout: timeout.max(Duration::from_secs(1)),
        server_time: settings.store_clock == StoreClock::Redis,
        breaker: BreakerSettings {
            failures: settings.breaker_failures,
            min_backoff: max_backoff.min(Duration::from_millis(100)),
            max_backoff,
        },
        deny_cache: (settings.deny_cache_keys > 0).then_some(settings.deny_cache_keys),
        tls: settings.redis_tls.clone(),
        batch_max: settings.redis_batch_max,
        sentinel_password: settings.redis_sentinel_password.clone(),
        regions: settings.regions.clone(),
    }
}

fn redact(url: &str) -> String {
    // `redis://user:password@host` → `redis://user:***@host`
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_redacted_from_store_urls() {
        assert_eq!(
            redact("redis://u:secret@h:6379/0"),
            "redis://u:***@h:6379/0"
        );
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }
}
