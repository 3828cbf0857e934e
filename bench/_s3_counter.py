"""moto's S3 server (the app ``ThreadedMotoServer`` serves) in a process of its own, with a
WSGI layer that logs every request: when, the method, the path, the bytes sent and the
query (a LIST is a GET of the bucket with ``list-type`` and ``prefix`` in it). A
benchmark reads the log to count what its run sent to S3. Its own process, because moto
keeps every object in memory: inside the driver it would be the driver's growth.

    python -m bench._s3_counter LOG_FILE   # prints the port on its first line, serves until killed
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Request:
    at: float
    method: str
    path: str
    bytes_in: int
    query: str = ""


def serve(log: Path) -> None:
    import logging

    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = DomainDispatcherApplication(create_backend_app)
    out = log.open("a", buffering=1)

    def counted(environ, start_response):
        sent = environ.get("HTTP_X_AMZ_DECODED_CONTENT_LENGTH") or environ.get("CONTENT_LENGTH") or 0
        query = environ.get("QUERY_STRING", "").replace("\t", " ")
        out.write(f"{time.time():.4f}\t{environ['REQUEST_METHOD']}\t{environ.get('PATH_INFO', '')}\t{int(sent)}"
                  f"\t{query}\n")
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, counted, True, request_handler=MotoRequestHandler)
    print(server.server_port, flush=True)
    server.serve_forever()


def read_log(log: Path) -> list[Request]:
    requests = []
    for line in log.read_text().splitlines():
        at, method, path, sent, query = line.split("\t")
        requests.append(Request(float(at), method, path, int(sent), query))
    return requests


@contextlib.contextmanager
def counting_s3(log: Path):
    """Start the server, set the AWS_* variables in this process (Ray's nodes started
    after inherit them), make a bucket; yields its ``s3://`` URI."""
    # moto holds an object under 5 MB in memory: 1,000 trials' checkpoints (~7 MB each)
    # outgrew this machine at ~650 trials. A 64 KB buffer spools every larger object to
    # an unlinked temporary file, so the server's memory holds keys and small files only.
    spill = {**os.environ, "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(64 * 1024)}
    proc = subprocess.Popen([sys.executable, "-m", "bench._s3_counter", str(log)], stdout=subprocess.PIPE, text=True,
                            env=spill)
    saved = {}
    try:
        port = int(proc.stdout.readline())
        env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/{bucket}", method="PUT"))
        yield f"s3://{bucket}"
    finally:
        proc.kill()
        proc.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
