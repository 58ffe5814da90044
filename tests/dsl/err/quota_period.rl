limit api { algorithm quota; rate 1000/2d; }
