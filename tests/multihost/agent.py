"""A client inside one test namespace: reads JSON commands from stdin, one a line, runs each on its
own thread, and answers on stdout as one JSON line carrying the command's id.

  {"id": 1, "op": "chat", "url": "http://10.231.77.1:8000", "body": {...}}  -> {"id": 1, "status": 200, "body": {...},
                                                                               "elapsed_s": 1.2}
  {"id": 2, "op": "get", "url": "http://10.231.77.1:8000/v1/instances"}     -> {"id": 2, "status": 200, "body": {...}}
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

_lock = threading.Lock()


def _http(url: str, body: dict | None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get("DVD_API_KEY")  # the gateway listens beyond loopback, so it wants a key
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    except OSError as err:
        return 0, {"error": {"message": f"{type(err).__name__}: {err}"}}


def _run(command: dict) -> None:
    t0 = time.monotonic()
    if command["op"] == "chat":
        status, body = _http(command["url"] + "/v1/chat/completions", command["body"])
    else:
        status, body = _http(command["url"], None)
    answer = {"id": command["id"], "status": status, "body": body, "elapsed_s": time.monotonic() - t0}
    with _lock:
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def main() -> None:
    print(json.dumps({"id": 0, "status": "ready"}), flush=True)
    for line in sys.stdin:
        if line.strip():
            threading.Thread(target=_run, args=(json.loads(line),), daemon=True).start()


if __name__ == "__main__":
    main()
