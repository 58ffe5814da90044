limit api { algorithm fixed_window; rate 10/s burst 20; }
