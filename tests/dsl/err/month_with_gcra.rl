limit api { algorithm gcra; rate 1000/month; }
