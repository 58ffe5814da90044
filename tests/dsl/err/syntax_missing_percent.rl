limit api { rate 5/min; soft warn at 80; }
