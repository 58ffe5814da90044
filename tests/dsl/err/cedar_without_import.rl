limit api { when cedar permits action "write"; rate 1/s; }
