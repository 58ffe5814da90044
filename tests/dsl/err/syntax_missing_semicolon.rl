limit api {
  rate 5/min
  key ip;
}
