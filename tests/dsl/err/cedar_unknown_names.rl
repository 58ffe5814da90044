version 1;
import cedar "../cedar/ok/app.cedar" schema "../cedar/ok/app.cedarschema" namespace "App";
limit l {
  authorize action "wirte";
  when cedar principal in Group "admins";
  rate 1/s;
}
