limit api { algorithm sliding_window; rate 1000/2d; }
