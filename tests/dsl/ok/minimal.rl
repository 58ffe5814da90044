limit api { rate 100/min; }
