//! A generated Cedar policy set of realistic shape, for the benchmark and the property test:
//! `policies` policies over 10 roles (a hierarchy), 100 users, 10 resources and 4 actions —
//! role grants per resource, writes that read the context, per-user forbids, tier
//! annotations, and admin rights from the private network.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "included by a test and a benchmark, each using a part"
)]

/// Writes `gen.cedarschema`, `gen.cedar`, `gen.entities.json` and `gen.rl` into `dir`.
pub fn write(dir: &std::path::Path, policies: usize) {
    let schema = r#"namespace Gen {
  entity Role in [Role];
  entity User in [Role];
  entity Endpoint;
  type Request = { ip: ipaddr, method: String, path: String, host: String };
  action "read", "write", "delete", "admin" appliesTo { principal: User, resource: Endpoint, context: Request };
}
"#;
    let mut cedar = String::new();
    for i in 0..policies {
        let role = i % 10;
        let text = match i % 5 {
            0 => format!(
                "@id(\"read-{i}\")\npermit (principal in Gen::Role::\"r{role}\", action == Gen::Action::\"read\", resource == Gen::Endpoint::\"/api/v1/res{role}/{{id}}\");\n"
            ),
            1 => format!(
                "@id(\"write-{i}\")\npermit (principal in Gen::Role::\"r{role}\", action in [Gen::Action::\"write\", Gen::Action::\"delete\"], resource)\nwhen {{ context.method != \"GET\" }};\n"
            ),
            2 => format!(
                "@id(\"ban-{i}\")\nforbid (principal == Gen::User::\"u{i}\", action, resource);\n"
            ),
            3 => format!(
                "@id(\"tier-{i}\")\n@rl_tier(\"pro\")\npermit (principal in Gen::Role::\"r{role}\", action == Gen::Action::\"read\", resource);\n"
            ),
            _ => format!(
                "@id(\"admin-{i}\")\npermit (principal, action == Gen::Action::\"admin\", resource)\nwhen {{ principal in Gen::Role::\"r{role}\" && context.ip.isInRange(ip(\"10.0.0.0/8\")) }};\n"
            ),
        };
        cedar.push_str(&text);
        cedar.push('\n');
    }
    let mut entities = Vec::new();
    for r in 0..10 {
        let parents = if r == 0 {
            String::new()
        } else {
            format!("{{ \"type\": \"Gen::Role\", \"id\": \"r{}\" }}", r / 2)
        };
        entities.push(format!(
            "{{ \"uid\": {{ \"type\": \"Gen::Role\", \"id\": \"r{r}\" }}, \"attrs\": {{}}, \"parents\": [{parents}] }}"
        ));
    }
    for u in 0..100 {
        entities.push(format!(
            "{{ \"uid\": {{ \"type\": \"Gen::User\", \"id\": \"u{u}\" }}, \"attrs\": {{}}, \"parents\": [{{ \"type\": \"Gen::Role\", \"id\": \"r{}\" }}] }}",
            u % 10
        ));
    }
    let limits = r#"version 1;
import cedar "gen.cedar" schema "gen.cedarschema" namespace "Gen" entities "gen.entities.json" {
  parents Role from claim("roles");
}
limit reads { match { route GET "/api/v1/res0/{id}", "/api/v1/res1/{id}", "/api/v1/res2/{id}", "/api/v1/res3/{id}", "/api/v1/res4/{id}", "/api/v1/res5/{id}", "/api/v1/res6/{id}", "/api/v1/res7/{id}", "/api/v1/res8/{id}", "/api/v1/res9/{id}"; }
  when cedar permits action "read"; key user_id; algorithm fixed_window; rate 1000000/s; }
"#;
    std::fs::write(dir.join("gen.cedarschema"), schema).unwrap();
    std::fs::write(dir.join("gen.cedar"), cedar).unwrap();
    std::fs::write(
        dir.join("gen.entities.json"),
        format!("[\n{}\n]\n", entities.join(",\n")),
    )
    .unwrap();
    std::fs::write(dir.join("gen.rl"), limits).unwrap();
}
