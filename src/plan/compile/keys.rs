//! Keys: named keys, `first_of`, sources, cycles.

use super::*;

impl<'a> Compiler<'a> {
    pub(super) fn key_expr(&mut self, f: usize, expr: &ast::KeyExpr) -> Option<KeySpec> {
        self.key_terms(f, &expr.terms, &mut Vec::new())
            .map(|parts| KeySpec { parts })
    }

    /// The parts of a key expression, with named keys expanded; inside `first_of`, the
    /// sources of a named key become alternatives.
    pub(super) fn key_terms(
        &mut self,
        f: usize,
        terms: &[ast::KeyTerm],
        stack: &mut Vec<String>,
    ) -> Option<Vec<KeyPart>> {
        let mut parts = Vec::new();
        let mut ok = true;
        for term in terms {
            match term {
                ast::KeyTerm::Source(source) => match self.key_source(f, source, stack) {
                    Some(mut expanded) => parts.append(&mut expanded),
                    None => ok = false,
                },
                ast::KeyTerm::FirstOf(sources) => {
                    let mut alternatives = Vec::new();
                    for source in &sources.node {
                        match self.key_source(f, source, stack) {
                            Some(expanded) => {
                                for part in expanded {
                                    match part {
                                        KeyPart::One(s) => alternatives.push(s),
                                        KeyPart::FirstOf(mut inner) => {
                                            alternatives.append(&mut inner)
                                        }
                                    }
                                }
                            }
                            None => ok = false,
                        }
                    }
                    parts.push(KeyPart::FirstOf(alternatives));
                }
            }
        }
        ok.then_some(parts)
    }

    /// One source, with named keys expanded (`stack` holds the names being expanded, to
    /// catch cycles).
    pub(super) fn key_source(
        &mut self,
        f: usize,
        source: &ast::KeySource,
        stack: &mut Vec<String>,
    ) -> Option<Vec<KeyPart>> {
        let one = |s| Some(vec![KeyPart::One(s)]);
        match source {
            ast::KeySource::Header(name) | ast::KeySource::TrustedHeader(name) => {
                let trusted = matches!(source, ast::KeySource::TrustedHeader(_));
                let name = self.header_name(f, name)?;
                let secret = is_secret_header(&name);
                one(KeySource::Header {
                    name,
                    secret,
                    trusted,
                })
            }
            ast::KeySource::Claim(name) => one(KeySource::Claim(Arc::from(name.node.as_str()))),
            ast::KeySource::Query(name) => one(KeySource::Query(Arc::from(name.node.as_str()))),
            ast::KeySource::Descriptor(key) => {
                let key = self.descriptor_key(f, key)?;
                one(KeySource::Descriptor {
                    secret: is_secret_name(&key),
                    key,
                })
            }
            ast::KeySource::IpPrefix(bits) => {
                let b = bits.node;
                match b {
                    1..=32 => one(KeySource::Ip {
                        v4: b as u8,
                        v6: 64,
                    }),
                    33..=128 => one(KeySource::Ip {
                        v4: 32,
                        v6: b as u8,
                    }),
                    _ => {
                        self.error_help(
                            f,
                            bits.span,
                            format!("`ip/{b}` is not a network prefix"),
                            "prefix out of range",
                            "use 1 to 32 for IPv4 networks (IPv6 then counts by /64), or 33 to 128 for IPv6",
                        );
                        None
                    }
                }
            }
            ast::KeySource::Name(name) => match name.node.as_str() {
                "ip" => one(KeySource::Ip { v4: 32, v6: 64 }),
                "user_id" => one(KeySource::UserId),
                "api_token" => one(KeySource::ApiToken),
                "route" => one(KeySource::Route),
                "method" => one(KeySource::Method),
                "host" => one(KeySource::Host),
                "domain" => one(KeySource::Domain),
                "global" => one(KeySource::Global),
                "connection" => one(KeySource::Connection),
                other => {
                    if stack.iter().any(|s| s == other) {
                        let cycle = format!("{} → {other}", stack.join(" → "));
                        self.error_help(
                            f,
                            name.span,
                            format!("key `{other}` is defined in terms of itself"),
                            "cycle",
                            format!("the definitions go round: {cycle}"),
                        );
                        return None;
                    }
                    if let Some(done) = self.resolved_keys.get(other) {
                        return done.clone().map(|k| k.parts);
                    }
                    let Some(&(kf, def)) = self.keys.get(other) else {
                        let mut known: Vec<&str> = self.keys.keys().copied().collect();
                        known.extend(BUILTIN_KEYS);
                        let help = suggest(other, &known).unwrap_or_else(|| {
                            "define it with `key NAME = …;` or use a built-in: ip, user_id, api_token, route, method, host, domain, global, header(\"…\"), claim(\"…\"), query(\"…\"), descriptor(\"…\")".to_owned()
                        });
                        self.error_help(
                            f,
                            name.span,
                            format!("unknown key `{other}`"),
                            "not defined",
                            help,
                        );
                        return None;
                    };
                    stack.push(other.to_owned());
                    let parts = self.key_terms(kf, &def.expr.terms, stack);
                    stack.pop();
                    let spec = parts.map(|parts| KeySpec { parts });
                    self.resolved_keys.insert(other.to_owned(), spec.clone());
                    spec.map(|k| k.parts)
                }
            },
        }
    }

    /// A header or claim of the request, named in file `f`.
    pub(super) fn value_from(
        &mut self,
        f: usize,
        value: &ast::ValueSource,
    ) -> Option<crate::plan::ValueFrom> {
        use crate::plan::ValueFrom;
        match value {
            ast::ValueSource::Claim(claim) => {
                Some(ValueFrom::Claim(Arc::from(claim.node.as_str())))
            }
            ast::ValueSource::Header(name) => {
                self.header_name(f, name).map(|name| ValueFrom::Header {
                    name,
                    trusted: false,
                })
            }
            ast::ValueSource::TrustedHeader(name) => {
                self.header_name(f, name).map(|name| ValueFrom::Header {
                    name,
                    trusted: true,
                })
            }
            ast::ValueSource::Descriptor(key) => {
                self.descriptor_key(f, key).map(ValueFrom::Descriptor)
            }
        }
    }

    /// The key of a descriptor entry (`descriptor("remote_address")`): not empty.
    pub(super) fn descriptor_key(&mut self, f: usize, key: &Spanned<String>) -> Option<Arc<str>> {
        if key.node.is_empty() {
            self.error_help(
                f,
                key.span,
                "a descriptor entry's key is not empty",
                "empty key",
                "name the entry's key as Envoy's action writes it, such as `remote_address`, or the `descriptor_key` of a `request_headers` or `generic_key` action",
            );
            return None;
        }
        Some(Arc::from(key.node.as_str()))
    }

    pub(super) fn header_name(&mut self, f: usize, name: &Spanned<String>) -> Option<HeaderName> {
        match HeaderName::from_bytes(name.node.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.error_help(
                    f,
                    name.span,
                    format!("`{}` is not a valid header name", name.node),
                    "invalid header name",
                    "header names are letters, digits and `-`, with no spaces",
                );
                None
            }
        }
    }
}
