# `global` is chosen limit by limit.
defaults { global; }

limit api {
  match { route ANY "/api/**"; }
  algorithm fixed_window;
  rate 10/min;
}
