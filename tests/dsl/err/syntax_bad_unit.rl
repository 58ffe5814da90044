limit api { rate 5/mon; }
