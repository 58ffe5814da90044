# Local-first limits: decided on each node, counts sent to Redis every interval.
namespace "edge";

defaults { key ip; on_store_error allow; }

# Exact (the default): logins are decided in Redis, one request at a time.
limit login {
  match { route POST "/login"; }
  algorithm fixed_window;
  rate 10/min;
  on_exceed reject 429 ban 15min;
}

# Local-first: a node may admit a little past the quota, for speed.
limit browse {
  match { route GET "/**"; }
  algorithm sliding_window;
  rate 600/min;
  sync every 50ms;
}

limit search {
  match { route GET "/search"; }
  algorithm fixed_window;
  rate 100/10s;
  sync every 200ms;
  on_store_error deny;
}
