# the same name in another file
limit shared { rate 2/s; }
