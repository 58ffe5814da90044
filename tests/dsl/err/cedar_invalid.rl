version 1;
import cedar "../cedar/err/strict.cedar" schema "../cedar/err/strict.cedarschema" namespace "Shop" entities "../cedar/err/bad.entities.json";
limit l { when cedar permits action "read"; rate 1/s; }
