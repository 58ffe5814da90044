# Every construct of the language, once.
version 1;
namespace "everything";

key identity = first_of(user_id, api_token, header("X-Client-Id"), claim("sub"), query("client"), ip);
key network = ip/24;
key v6net = ip/48;

defaults {
  algorithm sliding_window;
  key identity;
  on_store_error allow;
  mode enforce;
}

tiers plans {
  from claim("plan");
  default free;
  tier free { api = 60/min; day = 1_000/day; month = 10_000/month; jobs = 1 concurrent; }
  tier pro extends free { api = 600/min; jobs = 4 in_flight; }
  tier staff extends pro { api = unlimited; }
  tier frozen { api = blocked; day = blocked; month = blocked; jobs = blocked; }
}

limit fixed { match { route GET|HEAD "/a/{id}", "/b/*"; } algorithm fixed_window; rate 100/min; }
limit sliding { match { route "/c/**"; } rate 1_000/5min; }
limit bucket { match { method POST; } algorithm token_bucket; rate 10/s burst 30; key global; }
limit cell {
  match { route ANY "/d"; host "api.example.com"; }
  algorithm gcra;
  rate 5/1s burst 2;
  cost 3;
}
limit jobs { match { route POST "/jobs"; } rate plans.jobs; lease 90s; }
limit daily { match { route ANY "/e"; } algorithm quota; rate plans.day; }
limit monthly { match { route ANY "/e"; } rate plans.month; key identity + route; }
limit header_cost {
  match { route GET "/search"; }
  rate plans.api;
  cost header("X-Cost") default 1 max 50;
  soft warn at 80%, delay 250ms at 90%, delay 1s at 95%;
  on_exceed reject 429 reason "search quota exceeded" ban 5min;
  priority -3;
  on_store_error local;
}
limit conditions {
  match {
    (host ~= "^api\\." or header("X-Env") == "prod") and not header("X-Debug");
    header("X-Region") != "eu" || !method OPTIONS;
    ip in [10.0.0.0/8, "192.0.2.1", fd00::/8, 2001:db8::1];
    user_agent == "curl";
  }
  key network + host + method;
  rate 2/h;
  mode shadow;
}
limit off_limit { rate 1/d; mode off; key v6net; on_store_error deny; }
anomaly bursts {
  key ip;
  count when status in [429];
  detect 100 in 1min;
  then alert "ops";
}
