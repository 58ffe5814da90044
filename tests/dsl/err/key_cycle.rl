key a = first_of(user_id, b);
key b = a + ip;
limit api { key a; rate 10/s; }
