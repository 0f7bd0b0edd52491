"""What lets `atlas sql` run SQL the tool did not write: the read-only statement allow-list, the deadline
that interrupts a script, and the one-line errors a refused or failed statement becomes.

Apart from `atlas.store` because it is one concern with reasons of its own. A connection confined to the
atlas folder by DuckDB's settings still lets COPY and ATTACH write inside it, so a confined script is
also checked statement by statement, by kind, before any of it runs (`check_read_only`); and an
interrupt that lands between two statements is lost, so the deadline keeps interrupting until the
query stops. `AtlasReader.query` uses both, and the store words its SQL errors with the helpers here.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path

from ..errors import AtlasError

# Statements `atlas sql` runs unless --unsafe-full-duckdb (see check_read_only). DESCRIBE, SHOW, SUMMARIZE,
# VALUES, FROM-first and PIVOT ... IN (...) parse as SELECT.
READ_ONLY_PRAGMAS = frozenset({"version", "platform", "database_list", "database_size", "show_databases",
                               "show_tables", "show_tables_expanded", "table_info", "show", "storage_info",
                               "metadata_info", "functions", "collations", "user_agent"})
_LEADING_COMMENTS = re.compile(r"\A(?:\s+|--[^\n]*|/\*.*?\*/)+", re.S)


def check_read_only(statement, where: str = "the statement") -> None:
    """Refuse (AtlasError) a DuckDB statement (from duckdb.extract_statements) that is not a read-only query.

    By kind, as DuckDB's parser classifies it; where the kind alone does not tell (SET, PRAGMA, EXPLAIN,
    PIVOT's MULTI), by the statement's own text, and anything that does not read as one of the allowed
    forms is refused.
    """
    import duckdb

    T = duckdb.StatementType
    text = _LEADING_COMMENTS.sub("", str(statement.query))
    kind = statement.type
    if kind == T.SELECT:
        return
    if kind == T.SET and re.match(r"(?:SET|RESET)\s+VARIABLE\s", text, re.I):
        return  # a SQL variable, as --param sets: no setting of DuckDB's
    if kind == T.PRAGMA:
        name = re.match(r"PRAGMA\s+(\w+)", text, re.I)
        if name and name[1].lower() in READ_ONLY_PRAGMAS:
            return
    if kind == T.MULTI and re.match(r"PIVOT\b", text, re.I):
        return  # PIVOT without IN: DuckDB first makes an enum type of the pivoted values, in memory
    if kind == T.EXPLAIN:
        # EXPLAIN ANALYZE runs its statement (EXPLAIN ANALYZE COPY ... TO writes the file): judge that one
        inner = re.match(r"EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?:\((?:[^()']|'[^']*')*\)\s*)?(.*)\Z", text, re.I | re.S)
        try:
            explained = duckdb.extract_statements(inner[1]) if inner else []
        except duckdb.Error:
            explained = []
        if len(explained) == 1:
            check_read_only(explained[0], where)
            return
    # name it as written: "COPY", "INSTALL", "SET threads", "PRAGMA enable_profiling"
    words = re.match(r"(\w+)(?:\s+(\w+))?", text)
    head = "?" if not words else words[1].upper() + (f" {words[2]}" if kind in (T.SET, T.PRAGMA) and words[2]
                                                      else "")
    raise AtlasError(f"SQL refused: {where} is {head}, and `atlas sql` runs read-only queries only (SELECT, WITH, "
                     "VALUES, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN, PIVOT, read-only PRAGMAs, SET VARIABLE); "
                     "--unsafe-full-duckdb runs any DuckDB statement")


class Deadline:
    """Interrupts a DuckDB connection `seconds` after entering (None or 0: never).

    It keeps interrupting until the query stops: an interrupt that lands between two statements is lost,
    as DuckDB clears it when the next one starts.
    """

    def __init__(self, con, seconds: float | None):
        self.con, self.seconds, self.fired = con, seconds, False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self.seconds:
            self._thread = threading.Thread(target=self._watch, daemon=True, name="atlas-sql-timeout")
            self._thread.start()
        return self

    def _watch(self):
        if self._done.wait(self.seconds):
            return
        self.fired = True
        while True:
            self.con.interrupt()
            if self._done.wait(0.05):
                return

    def check(self) -> None:
        if self.fired:
            raise AtlasError(f"query interrupted after {self.seconds:g} s (--timeout)")

    def __exit__(self, *exc):
        self._done.set()
        # Joined, never left behind: a daemon thread still waking when the interpreter shuts down (a
        # statement that failed, then the CLI's exit) is unwound by force and aborted the process (rc 134,
        # "FATAL: exception not rethrown") about one exit in ten.
        if self._thread is not None:
            self._thread.join()
        return False


SQL_MEMORY_LIMIT = "2GB"  # what a confined statement may hold in DuckDB's own memory; past it DuckDB spills


def confine(con, owner, folders: list[Path]) -> None:
    """Hold a DuckDB connection to reading `folders` and nothing else, with scratch files in a folder of
    their own (removed with `owner`) and SQL_MEMORY_LIMIT; then lock its settings, so no statement undoes it."""
    import shutil
    import tempfile
    import weakref

    scratch = tempfile.mkdtemp(prefix="atlas-sql-")  # not the working directory's .tmp
    weakref.finalize(owner, shutil.rmtree, scratch, ignore_errors=True)
    con.execute("SET temp_directory = ?", [scratch])
    con.execute("SET allowed_directories = ?", [[f"{Path(f).resolve()}/" for f in folders]])
    con.execute("SET enable_external_access = false")
    con.execute("SET memory_limit = ?", [SQL_MEMORY_LIMIT])
    con.execute("SET lock_configuration = true")


def refusal(root: Path, e: Exception) -> AtlasError:
    """A confined connection's PermissionException as one line: which file it would have read, and why not."""
    m = re.search(r'Cannot access (?:file|directory) "([^"]*)"', str(e))
    if m and not Path(m[1]).is_absolute() and "://" not in m[1]:
        what = f"'{m[1]}' is a relative path (write '{root / m[1]}')"
    else:
        what = f"'{m[1]}' is not a file of the atlas" if m else first_line(e)
    return AtlasError(f"SQL refused: {what}: `atlas sql` reads only the atlas folder '{root}', by absolute "
                      "path or through its views (--unsafe-full-duckdb opens every file DuckDB can reach)")


def sql_error(e: Exception) -> AtlasError:
    """DuckDB's error as one line, with the hints it gives under its first line ('Did you mean "channels"?',
    'Candidate bindings: "max"'), not the query echoed with a caret under it."""
    said = []
    for line in str(e).strip().splitlines():
        if not line.strip() or line.startswith("LINE "):
            break
        said.append(line.strip())
    return AtlasError(f"SQL error: {' '.join(said) or type(e).__name__}")


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
