version 1;
import cedar "../cedar/err/broken.cedar";
limit l { when cedar permits action "read"; rate 1/s; }
