# Public API: per-client limits by plan, monthly quotas, search and exports.
version 1;
namespace "api";
# Cedar: who may write and administer (api.cedar), users and roles (api.entities.json);
# a verified token's `roles` claim adds roles to those of the entities file.
import cedar "api.cedar" schema "api.cedarschema" namespace "Api" entities "api.entities.json" {
  parents Role from claim("roles");
}

# Who the client is: the first source that has a value wins.
key identity = first_of(user_id, api_token, header("X-Client-Id"), ip);
key tenant = header("X-Tenant-Id");

defaults {
  algorithm sliding_window;
  key identity;
  on_store_error allow;
}

# The plan comes from a header that the API gateway sets: believed only from the gateway
# (`trusted_proxies`); a client that sends it itself gets `free`.
tiers plans {
  from header("X-Plan");
  default free;
  tier free              { api = 60/min;           monthly = 10_000/month;    search = 10/s burst 20;  exports = 1 concurrent; }
  tier pro extends free  { api = 600/min;          monthly = 1_000_000/month; search = 50/s burst 100; exports = 4 concurrent; }
  tier internal extends pro { api = unlimited; monthly = unlimited; }
  tier suspended         { api = blocked;          monthly = blocked;         search = blocked;        exports = blocked; }
}

limit api {
  match { route ANY "/api/**"; }
  rate plans.api;
  soft warn at 80%, delay 250ms at 95%;
  on_exceed reject 429 reason "API rate limit exceeded for your plan";
}

limit monthly {
  match { route ANY "/api/**"; }
  key identity + tenant;
  # Requests without X-Tenant-Id are counted by address under the same quota.
  on_missing_key ip;
  rate plans.monthly;
  on_exceed reject 429 reason "monthly quota exhausted";
  on_store_error deny;
}

# Search is expensive: GCRA, and each request costs what the client declares (1 to 10).
limit search {
  match { route GET "/api/v1/search"; }
  algorithm gcra;
  rate plans.search;
  cost header("X-Search-Cost") default 1 max 10;
  priority 10;
}

# Exports stream large files: cap the number in flight per client.
limit exports {
  match { route GET|POST "/api/v1/exports", "/api/v1/exports/{id}"; }
  rate plans.exports;
  lease 5min;
  on_exceed reject 429 reason "too many exports in progress";
}

# Writes to orders, counted in shadow mode while the limit is tuned.
limit orders_write {
  match { route POST|PUT|PATCH "/api/v1/orders/**"; }
  when cedar permits action "write";
  algorithm token_bucket;
  rate 30/min burst 5;
  mode shadow;
}

# The admin endpoints need Cedar's permit (staff, from the private networks): others get 403.
limit admin {
  match { route ANY "/api/v1/admin/**"; }
  authorize action "admin";
  rate 10/min;
  priority 20;
}
