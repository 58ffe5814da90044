version 1;
import cedar "cedar/app.cedar" schema "cedar/app.cedarschema" namespace "App";

tiers plans {
  from cedar annotation "rl_tier" pick highest;
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
