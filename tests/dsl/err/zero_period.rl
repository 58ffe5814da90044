limit api { rate 10/0s; }
