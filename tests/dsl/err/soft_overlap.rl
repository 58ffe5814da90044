limit api { rate 100/min; soft warn at 90%, delay 100ms at 80%; }
