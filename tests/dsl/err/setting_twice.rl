limit api {
  rate 1/s;
  key ip;
  rate 2/s;
}
