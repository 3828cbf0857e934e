"""A real PostgreSQL server for the tests: the OS's package (`make test` installs it as
root, as it does Chromium), a fresh cluster in a temporary directory, listening on
127.0.0.1 only, trust authentication. PostgreSQL refuses to run as root, so as root the
server runs as the package's ``postgres`` user (``runuser``)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path


def postgres_bin() -> Path | None:
    """The directory of ``initdb`` and ``postgres``: on PATH, or Debian's versioned one."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server(workdir: Path):
    """Yields a ``postgresql://`` URL of an empty database ``tunecv`` on a new server."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("no PostgreSQL server: `make test` installs it as root (apt-get install postgresql)")
    data, sockets = workdir / "pgdata", workdir / "pgsock"
    sockets.mkdir(parents=True)
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        # The server's user must reach its directories: the temporary path may be root's.
        for path in (workdir, *workdir.parents):
            if path == Path("/"):
                break
            os.chmod(path, os.stat(path).st_mode | 0o011)
        shutil.chown(workdir, "postgres")
        shutil.chown(sockets, "postgres")
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                    "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    port = _free_port()
    server = subprocess.Popen(
        [*as_user, str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
         "-k", str(sockets), "-c", "fsync=off", "-c", "max_connections=100"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import psycopg

        deadline = time.time() + 60
        while True:
            try:
                conn = psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True)
                break
            except psycopg.OperationalError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.2)
        conn.cursor().execute("CREATE DATABASE tunecv")
        conn.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/tunecv"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
