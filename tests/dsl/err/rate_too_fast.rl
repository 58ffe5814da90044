limit api { algorithm gcra; rate 2_000_000/s; }
