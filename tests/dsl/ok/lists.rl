# Who skips every limit, and who is refused outright.
version 1;

safelist internal {
  ip in [10.0.0.0/8, 172.16.0.0/12, fd00::/8];
  header("X-Health-Check") == "tollgate";
}

denylist scanners {
  user_agent ~= "(?i)sqlmap|nikto|masscan";
  ip in [192.0.2.66];
  respond 403 reason "automated scanning is not allowed";
}
