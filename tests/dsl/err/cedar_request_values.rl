version 1;
import cedar "../cedar/ok/app.cedar" schema "../cedar/ok/app.cedarschema" namespace "App" {
  principal Account;
  principal User;
  resource Route;
  parents Endpoint from claim("routes");
  parents Nope from header("X-Nope");
  parents Role from header("Bad Header");
  context "ip" from header("X-Ip");
  context "client-version" from header("X-Client-Version");
  context "client" from header("X-Client");
  context "client" from claim("client");
}
limit l { rate 1/s; }
