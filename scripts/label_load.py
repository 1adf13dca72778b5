"""Load test of the MONAI Label app: a real ``monailabel start_server`` on 127.0.0.1, concurrent infer and click
requests on 2D and 3D images, bad requests, and the server's peak memory.

    .venv-label/bin/python scripts/label_load.py --model eval/model.pt --images a.png b.nii.gz [--infers 20 --clicks 5]

Prints one JSON summary: per kind of request, how many were answered 200 and their latencies; the bad requests'
status codes; the server's peak resident memory (VmHWM of its process tree, MB). ``tests/label`` runs the same load
and checks every answer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import psutil
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_DIR = os.path.join(ROOT, "monailabel_app")
OFFLINE = {"sam2": "false", "zoo_source": "local"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process and its children, MB."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            with contextlib.suppress(OSError, psutil.Error), open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) / 1024
    return total


@contextlib.contextmanager
def serve(studies: str, conf: dict[str, str], log_path: str, timeout: float = 240) -> Iterator[tuple[str, int]]:
    """A real ``monailabel start_server`` for the app on a free port of 127.0.0.1; yields (url, server pid)."""
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "monailabel")
    cmd = [exe, "start_server", "--app", APP_DIR, "--studies", studies, "--host", "127.0.0.1", "--port", str(port)]
    for key, value in {**OFFLINE, **conf}.items():
        cmd += ["--conf", key, value]
    # the monailabel script runs `python -m monailabel.main`: this environment's python, as when it is activated
    env = {**os.environ, "MONAILABEL_PYEXE": sys.executable}
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(log_path), env=env, start_new_session=True
        )
        try:
            deadline = time.time() + timeout
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"server exited with {server.returncode}: {_tail(log_path)}")
                with contextlib.suppress(requests.ConnectionError):
                    if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                        break
                if time.time() > deadline:
                    raise RuntimeError(f"server not ready in {timeout:.0f} s: {_tail(log_path)}")
                time.sleep(1)
            yield url, server.pid
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=30)


def _tail(path: str, n: int = 3000) -> str:
    with open(path) as f:
        return f.read()[-n:]


def infer(url: str, model: str, image: str, params: dict | None = None, timeout: float = 900) -> requests.Response:
    """POST /infer/<model>?image=<id>&output=image with ``params`` as the form's JSON."""
    data = {"params": json.dumps(params or {})}
    return requests.post(f"{url}/infer/{model}", params={"image": image, "output": "image"}, data=data, timeout=timeout)


def load(
    url: str,
    pid: int,
    jobs: list[tuple[str, str, dict]],
    check: Callable[[str, str, dict, requests.Response], None] | None = None,
    concurrency: int = 25,
) -> dict[str, Any]:
    """Send ``jobs`` ((model, image id, params)) all at once; ``check(model, image, params, response)`` raises on a
    wrong answer. Returns per model: answered (200), latencies (s), and the server's peak memory (MB)."""

    def one(job: tuple[str, str, dict]) -> tuple[str, float, int]:
        model, image, params = job
        start = time.time()
        response = infer(url, model, image, params)
        if check is not None:
            check(model, image, params, response)
        return model, time.time() - start, response.status_code

    start = time.time()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, jobs))
    summary: dict[str, Any] = {"requests": len(jobs), "wall_s": round(time.time() - start, 1)}
    for model in sorted({m for m, _, _ in results}):
        times = sorted(t for m, t, _ in results if m == model)
        summary[model] = {
            "sent": len(times),
            "answered_200": sum(1 for m, _, code in results if m == model and code == 200),
            "latency_s": {
                "min": round(times[0], 2),
                "median": round(times[len(times) // 2], 2),
                "max": round(times[-1], 2),
            },
        }
    summary["server_peak_mb"] = round(peak_mb(pid))
    return summary


def bad_requests(url: str, studies: str, image: str) -> dict[str, tuple[int, str]]:
    """Requests the server must refuse with a 4xx and a message: status code and message of each."""
    out = {}
    with open(os.path.join(studies, "broken.png"), "wb") as f:
        f.write(b"not an image at all")
    cases = {
        "unknown image id": ("oneshot", "no_such_image", {}),
        "unreadable image": ("oneshot", "broken", {}),
        "unknown structure": ("oneshot_clicks", image, {"structure": "spleen", "foreground": [[10, 10]]}),
        "click outside the image": ("oneshot_clicks", image, {"foreground": [[100000, 5]]}),
    }
    time.sleep(2)  # the datastore notices the new file
    for name, (model, img, params) in cases.items():
        r = infer(url, model, img, params, timeout=120)
        out[name] = (
            r.status_code,
            (
                r.json().get("detail", r.text[:200])
                if r.headers.get("content-type", "").startswith("application/json")
                else r.text[:200]
            ),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="adapted model (configs/inference.yaml's adapted_model)")
    parser.add_argument("--images", nargs="+", required=True, help="images to serve (2D and 3D)")
    parser.add_argument("--infers", type=int, default=20)
    parser.add_argument("--clicks", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        studies = os.path.join(tmp, "studies")
        os.makedirs(studies)
        ids = []
        for path in args.images:
            shutil.copy(path, studies)
            name = os.path.basename(path)
            ids.append(name[: -len(".nii.gz")] if name.endswith(".nii.gz") else os.path.splitext(name)[0])
        with serve(studies, {"model_path": os.path.abspath(args.model)}, os.path.join(tmp, "server.log")) as (url, pid):
            jobs = [("oneshot", ids[k % len(ids)], {}) for k in range(args.infers)]
            jobs += [("oneshot_clicks", ids[k % len(ids)], {"foreground": [[20, 20]]}) for k in range(args.clicks)]
            summary = load(url, pid, jobs)
            summary["bad_requests"] = bad_requests(url, studies, ids[0])
            summary["still_serving"] = requests.get(f"{url}/info/", timeout=30).status_code == 200
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
