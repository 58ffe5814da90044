#!/usr/bin/env python3
"""Runs SQL statements on current ClickHouse, in process (the `chdb-core` wheel), in order,
in a fresh session; prints a JSON object: the server's version, and per statement its
tab-separated output or its error. Used by tests/analytics.rs to check that Tollgate's DDL
and queries run on current ClickHouse, not only on Debian's 18.16.

    chdb-check.py STATEMENTS.json   # [{"name": ..., "sql": ...}, ...]
"""
import json
import sys
import tempfile

from chdb import session


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        statements = json.load(f)
    results = {}
    with tempfile.TemporaryDirectory() as data:
        s = session.Session(data)
        version = s.query("SELECT version()", "TSV").bytes().decode().strip()
        for item in statements:
            try:
                out = s.query(item["sql"], "TSV").bytes().decode()
                results[item["name"]] = {"ok": out}
            except Exception as e:  # chdb raises ChdbError with the server's message
                results[item["name"]] = {"error": str(e)}
        s.close()
    json.dump({"version": version, "results": results}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
