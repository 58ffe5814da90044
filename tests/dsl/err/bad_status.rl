limit api { rate 1/s; on_exceed reject 200 reason "ok?"; }
