"""psycopg 3 through the proxy: pipeline mode, server-side prepared statements
(prepare_threshold=0), many clients sharing few servers, DDL under prepared
statements, psycopg's own DEALLOCATEs, COPY.

Run by tests/psycopg.rs with PGWARDEN_DSN (the proxy) and PGWARDEN_ADMIN_DSN
(the primary directly, as the database owner). Exits non-zero on the first
failure, printing what went wrong.
"""

import os
import sys
import threading

import psycopg
from psycopg import errors

DSN = os.environ["PGWARDEN_DSN"]
ADMIN_DSN = os.environ["PGWARDEN_ADMIN_DSN"]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def pipeline_mode():
    with psycopg.connect(DSN, autocommit=True) as conn:
        with conn.pipeline():
            curs = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(50)]
        check([c.fetchone()[0] for c in curs] == [i * 2 for i in range(50)], "pipelined results")
        # An error in the middle of a pipeline: the statements before it ran, the ones after
        # were skipped, and the connection is usable afterwards.
        before = conn.execute("SELECT 1")
        try:
            with conn.pipeline():
                conn.execute("SELECT 'before'")
                conn.execute("SELECT 1/0")
                conn.execute("SELECT 'after'")
            raise AssertionError("the pipeline did not raise")
        except errors.DivisionByZero:
            pass
        check(before.fetchone() == (1,), "earlier result")
        check(conn.execute("SELECT 'usable'").fetchone() == ("usable",), "usable after the error")


def prepared_statements():
    # prepare_threshold=0: every query is prepared server-side at once.
    with psycopg.connect(DSN, autocommit=True, prepare_threshold=0) as conn:
        for i in range(200):
            row = conn.execute("SELECT %s::int + 1, %s::text", (i, f"v{i}")).fetchone()
            check(row == (i + 1, f"v{i}"), f"prepared round {i}: {row}")
        with conn.pipeline():
            curs = [conn.execute("SELECT %s::int * 3", (i,)) for i in range(30)]
        check([c.fetchone()[0] for c in curs] == [i * 3 for i in range(30)], "prepared + pipeline")


def many_clients_few_servers():
    failures = []

    def client(n):
        try:
            with psycopg.connect(DSN, autocommit=True, prepare_threshold=0) as conn:
                for i in range(100):
                    v = conn.execute("SELECT %s::int + %s::int", (n, i)).fetchone()[0]
                    if v != n + i:
                        failures.append(f"client {n}: {v} != {n + i}")
                        return
                    with conn.transaction():
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (n,))
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(f"client {n}: {e!r}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(not failures, "; ".join(failures))


def ddl_under_prepared_statements():
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS py_shape")
        admin.execute("CREATE TABLE py_shape (a int)")
        admin.execute("INSERT INTO py_shape VALUES (1)")
        admin.execute("GRANT ALL ON py_shape TO app")
        # The DDL is made beside the proxy, so no session of the proxy waits for a replica to
        # replay it: this connection reads on the primary, where the plan goes stale.
        dsn = DSN + " options='-c pgwarden.route=primary'"
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
            check(conn.execute("SELECT * FROM py_shape").fetchall() == [(1,)], "before")
            admin.execute("ALTER TABLE py_shape ADD COLUMN b int DEFAULT 7")
            # libpq describes the portal, so the proxy prepares again and retries: the new
            # shape arrives instead of "cached plan must not change result type".
            check(conn.execute("SELECT * FROM py_shape").fetchall() == [(1, 7)], "after ALTER")


def psycopg_deallocates():
    # A small prepared-statement cache: psycopg evicts with DEALLOCATE as it goes.
    with psycopg.connect(DSN, autocommit=True, prepare_threshold=0) as conn:
        conn.prepared_max = 5
        for round_ in range(3):
            for i in range(20):
                v = conn.execute(f"SELECT {i} + %s::int", (round_,)).fetchone()[0]
                check(v == i + round_, f"query {i} round {round_}")


def copy():
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS py_copy")
        admin.execute("CREATE TABLE py_copy (i int, t text)")
        admin.execute("GRANT ALL ON py_copy TO app")
    with psycopg.connect(DSN, autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY py_copy FROM STDIN") as cp:
                for i in range(5000):
                    cp.write_row((i, f"row {i}"))
            check(conn.execute("SELECT count(*) FROM py_copy").fetchone() == (5000,), "copy in")
            rows = []
            with cur.copy("COPY (SELECT * FROM py_copy ORDER BY i) TO STDOUT") as cp:
                rows = list(cp.rows())
            check(len(rows) == 5000 and rows[42] == ("42", "row 42"), "copy out")


CASES = [
    pipeline_mode,
    prepared_statements,
    many_clients_few_servers,
    ddl_under_prepared_statements,
    psycopg_deallocates,
    copy,
]

if __name__ == "__main__":
    for case in CASES:
        try:
            case()
        except Exception as e:  # noqa: BLE001
            print(f"FAIL {case.__name__}: {e!r}")
            sys.exit(1)
        print(f"ok {case.__name__}")
