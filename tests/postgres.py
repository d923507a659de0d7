"""A throwaway PostgreSQL server for tests: Debian's postgresql-15, started and stopped by the test.

postgres refuses to run as root, so under root (tests here and in CI) every server
command runs as the ``postgres`` user that the Debian package creates (``runuser -u
postgres --``), in a directory under /tmp that this user owns: the data directory, the
log and the socket. The server listens on a free localhost port with ``trust``
authentication and no fsync (a test's data need not survive a power cut).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

BIN = Path("/usr/lib/postgresql/15/bin")
PACKAGE = "postgresql"
# util-linux's runuser lives in /usr/sbin, which a plain user's PATH (and CI's) may leave out.
RUNUSER = shutil.which("runuser", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
SERVER_OPTIONS = "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"


def missing() -> str | None:
    """Why PostgreSQL cannot run here (a line naming the Debian package), or None."""
    if not all((BIN / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
        return f"PostgreSQL 15 is not installed ({BIN}): install Debian's package `{PACKAGE}` (apt-get install {PACKAGE})"
    if os.geteuid() == 0 and (RUNUSER is None or _uid("postgres") is None):
        return f"running as root needs the user `postgres` and runuser: install Debian's package `{PACKAGE}`"
    return None


def _uid(user: str) -> int | None:
    import pwd

    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Postgres:
    """One server: :meth:`start`, :meth:`restart`, :meth:`stop`; :meth:`url` of a database on it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pg-test-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = _free_port()
        self.as_owner: list[str] = []
        if os.geteuid() == 0:
            uid = _uid("postgres")
            os.chown(self.root, uid, -1)
            self.as_owner = [RUNUSER, "-u", "postgres", "--"]

    def _run(self, tool: str, *args: str) -> None:
        out = subprocess.run([*self.as_owner, str(BIN / tool), *args], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({out.returncode}): {out.stderr[-2000:]}\n{log}")

    def _pg_ctl(self, action: str) -> None:
        options = f"-p {self.port} -k {self.root} {SERVER_OPTIONS}"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-m", "fast", "-w", "-t", "60", action)

    def start(self) -> Postgres:
        """initdb (once), then start the server and wait until it takes connections."""
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self._pg_ctl("start")
        return self

    def restart(self) -> None:
        """A fast shutdown (every connection is cut) and a start: what a restarted database server does."""
        self._pg_ctl("restart")

    def create_database(self, name: str) -> str:
        """A new database; its SQLAlchemy URL."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        """Stop the server (if it runs) and remove its directory."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
