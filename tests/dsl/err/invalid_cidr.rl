safelist office { ip in [10.0.0.0/33, 300.1.1.1, fd00::/8]; }
