limt api { rate 5/min; }
limit other { rate 5/min; }
