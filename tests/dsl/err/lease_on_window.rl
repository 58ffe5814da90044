limit api { rate 10/min; lease 30s; }
