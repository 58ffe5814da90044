limit api { algorithm gcrra; rate 5/min; }
