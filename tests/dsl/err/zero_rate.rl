limit api { rate 0/min; }
