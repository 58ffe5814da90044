limit api { rate 100/min; soft delay 100ms at 90%, delay 200ms at 90%; }
