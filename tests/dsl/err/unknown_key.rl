key identity = first_of(user_id, ip);
limit api { key identty + tenant; rate 10/s; }
