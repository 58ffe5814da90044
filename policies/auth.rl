# Authentication endpoints: brute-force protection.
version 1;
namespace "auth";

limit login {
  match { route POST "/auth/login"; }
  key ip/24;                               # IPv4 by /24, IPv6 by /64
  algorithm fixed_window;
  rate 5/min;
  on_exceed reject 429 reason "too many login attempts" ban 15min;
  on_store_error local;
  priority 100;
}

limit password_reset {
  match { route POST "/auth/password-reset"; }
  key first_of(header("X-Login-User"), ip);
  algorithm fixed_window;
  rate 3/h;
  on_exceed reject 429 reason "too many password resets";
}

anomaly login_bruteforce {
  match { route POST "/auth/login"; }
  key first_of(header("X-Login-User"), ip);
  count when status in [401, 403];
  detect 10 in 5min;
  then ban 15min, alert "security";
}

// One address trying many user names (credential stuffing): slowed down and flagged, not
// banned (a shared address, a NAT, should not lock everyone out).
anomaly credential_stuffing {
  match { route POST "/auth/login"; }
  key ip;
  count when status in [401];
  detect distinct header("X-Login-User") trusted > 20 in 10min;
  then tarpit 2s for 30min, flag for 1h, alert "security";
}
