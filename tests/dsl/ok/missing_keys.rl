# What a limit does with a request whose key has no value.
key tenant = header("X-Tenant-Id");

limit per_user { key user_id; rate 100/min; on_missing_key ip; }
limit tenant_quota { key tenant; rate 10_000/day; on_missing_key refuse; }
limit reporting { key tenant; rate 10/min; on_missing_key skip; }

defaults { on_missing_key refuse; }
limit inherits { key claim("org"); rate 5/s; }
