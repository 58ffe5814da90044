version 1;
import cedar "../cedar/ok/app.cedar" schema "../cedar/ok/app.cedarschema" namespace "App" entities "../cedar/ok/app.entities.json" {
  parents Role from claim("roles");
  context "client" from header("X-Client") trusted;
}

tiers plans {
  from cedar annotation "rl_tier" for action "read" pick highest;
  default basic;
  tier basic { api = 100/min; }
  tier gold extends basic { api = 1000/min; }
}

limit writes {
  match { route POST|PUT "/orders/**"; }
  when cedar permits action "write";
  algorithm gcra;
  rate plans.api;
}

limit gold_reads {
  match { route GET "/orders/**"; }
  when cedar principal in Role "gold";
  rate 50/s;
}

limit order_writes {
  match { route POST "/orders"; }
  authorize action "write";
  rate 10/min;
}
