"""Load check (issue 16, fault 1): a signed-in coordinator's page times while 8 threads flood the
login form with random names and passwords. Loopback only, bounded in requests and time.

It starts the real web server (uvicorn, the node's application, its own process) on 127.0.0.1
over a scratch SQLite database seeded with --referrals referrals, signs one user in, measures
the worklist without load (baseline), then again during the flood, and prints median and p95.

Two server set-ups are measured in turn:
  * "default": the product as shipped (per-client throttle: the flood soon gets 429s);
  * "no-client-throttle": every flood request runs a full argon2 check (the worst case for the
    event loop and the cores; what fault 1 was about).

    PYTHONPATH=$PWD .venv/bin/python scripts/login_flood.py --seconds 20 --threads 8
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HOST = "127.0.0.1"  # loopback only, by design
PASSWORD = "correct horse battery"
MAX_FLOOD_REQUESTS = 20_000


def serve(config_dir: str, port: int, per_client: int) -> None:
    """The server process: the node's web application with the given per-client limit."""
    import uvicorn

    from osteo_node.config import parse_settings
    from osteo_node.db import make_engine
    from osteo_node.web import create_app
    from osteo_node.web.auth import LoginThrottle

    settings = parse_settings({"node": {"data_dir": config_dir}, "web": {"secret_key": "f" * 40, "port": port}},
                              Path(config_dir))
    app = create_app(settings, engine=make_engine(settings.database_url),
                     throttle=LoginThrottle(per_client=per_client))
    uvicorn.run(app, host=HOST, port=port, access_log=False, log_level="warning", log_config=None)


def csrf(client: httpx.Client) -> str:
    return client.get("/login").text.split('name="csrf_token" value="')[1].split('"')[0]


def timed_pages(base: str, cookies: httpx.Cookies, seconds: float, stop: threading.Event) -> list[float]:
    times: list[float] = []
    with httpx.Client(base_url=base, cookies=cookies, follow_redirects=False, timeout=60) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stop.is_set():
            start = time.perf_counter()
            response = client.get("/referrals")
            times.append(time.perf_counter() - start)
            assert response.status_code == 200, response.status_code
            time.sleep(0.2)
    return times


def flood(base: str, stop: threading.Event, counts: dict[str, int], lock: threading.Lock) -> None:
    rng = random.Random()
    with httpx.Client(base_url=base, follow_redirects=False, timeout=60) as client:
        while not stop.is_set():
            with lock:
                if sum(counts.values()) >= MAX_FLOOD_REQUESTS:
                    return
            try:
                token = csrf(client)
                response = client.post("/login", data={"name": f"user{rng.randrange(10**6)}",
                                                       "password": secrets.token_hex(8), "csrf_token": token})
                key = str(response.status_code)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            with lock:
                counts[key] = counts.get(key, 0) + 1


def summary(times: list[float]) -> str:
    times = sorted(times)
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    return f"n={len(times):3d} median {statistics.median(times):.3f} s  p95 {p95:.3f} s  max {times[-1]:.3f} s"


def measure(tmp: str, port: int, per_client: int, seconds: float, threads: int) -> None:
    base = f"http://{HOST}:{port}"
    server = subprocess.Popen([sys.executable, __file__, "--serve", tmp, "--port", str(port),
                               "--per-client", str(per_client)])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/login", timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the web server did not start")
                time.sleep(0.2)
        with httpx.Client(base_url=base, follow_redirects=False, timeout=60) as user:
            response = user.post("/login", data={"name": "coord", "password": PASSWORD, "csrf_token": csrf(user)})
            assert response.status_code == 303, response.status_code
            cookies = user.cookies
        stop = threading.Event()
        baseline = timed_pages(base, cookies, min(seconds, 5), stop)
        counts: dict[str, int] = {}
        lock = threading.Lock()
        flooders = [threading.Thread(target=flood, args=(base, stop, counts, lock)) for _ in range(threads)]
        for t in flooders:
            t.start()
        time.sleep(1.0)  # the flood is under way
        started = time.monotonic()
        during = timed_pages(base, cookies, seconds, stop)
        stop.set()
        for t in flooders:
            t.join()
        elapsed = time.monotonic() - started
        label = "default" if per_client < 10**6 else "no-client-throttle"
        print(f"[{label}] baseline, no flood:      {summary(baseline)}")
        print(f"[{label}] during {threads}-thread flood: {summary(during)}")
        total = sum(counts.values())
        print(f"[{label}] flood: {total} login posts in {elapsed:.0f} s ({total / elapsed:.1f}/s); "
              f"status counts {dict(sorted(counts.items()))}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20, help="measured seconds under flood (max 120)")
    parser.add_argument("--threads", type=int, default=8, help="flooding threads (max 32)")
    parser.add_argument("--referrals", type=int, default=20_000, help="referrals in the scratch database")
    parser.add_argument("--mode", choices=("both", "default", "no-client-throttle"), default="both")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--per-client", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.per_client)
        return
    if not 1 <= args.seconds <= 120 or not 1 <= args.threads <= 32:
        parser.error("--seconds 1..120, --threads 1..32")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import socket

    from worklist_bench import seed

    from osteo_node import migrate
    from osteo_node.db import make_engine
    from osteo_node.web.auth import MAX_FAILED_PER_CLIENT, add_user

    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; "
          f"{args.threads} flood threads, {args.seconds:.0f} s measured, {args.referrals} referrals")
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'osteo-node.sqlite3'}")
        migrate.upgrade(engine)
        seed(engine, args.referrals, random.Random(16))
        from sqlalchemy.orm import Session

        with Session(engine) as session, session.begin():
            add_user(session, "coord", "coordinator", PASSWORD)
        engine.dispose()
        modes = {"default": MAX_FAILED_PER_CLIENT, "no-client-throttle": 10**9}
        for mode, per_client in modes.items():
            if args.mode not in ("both", mode):
                continue
            with socket.socket() as probe:
                probe.bind((HOST, 0))
                port = probe.getsockname()[1]
            measure(tmp, port, per_client, args.seconds, args.threads)
        print(f"load average {os.getloadavg()[0]:.1f} at the end")

if __name__ == "__main__":
    main()
