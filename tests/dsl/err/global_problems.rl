# `global` counts fixed windows across regions, alone; `on_partition` needs it.

limit sliding {
  match { route ANY "/a"; }
  algorithm sliding_window;
  rate 10/min;
  global;
}

limit both {
  match { route ANY "/b"; }
  algorithm fixed_window;
  rate 10/min;
  sync every 50ms;
  global;
}

limit lonely {
  match { route ANY "/c"; }
  algorithm fixed_window;
  rate 10/min;
  on_partition share;
}

limit misspelt {
  match { route ANY "/d"; }
  algorithm fixed_window;
  rate 10/min;
  global;
  on_partition shared;
}
