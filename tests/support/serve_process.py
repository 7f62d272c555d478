"""``alaya serve`` as a subprocess on a loopback address, for the server tests (not a test module)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def alaya_command(file_size_limit=None) -> list[str]:
    """``python -m alaya_jax``, under a file-size limit of that many bytes when given."""
    if file_size_limit is None:
        return [sys.executable, "-m", "alaya_jax"]
    helper = os.path.join(ROOT, "tests", "support", "file_size_limit.py")
    return [sys.executable, helper, str(int(file_size_limit)), "alaya_jax"]


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    """``alaya serve ARGS`` on ``host`` (a free port), started and waited for (``/health``).
    ``key``: its API key; ``file_size_limit``: bytes, run under that ``RLIMIT_FSIZE``
    (``tests/support/file_size_limit.py``)."""

    def __init__(self, tmp_path, *args, key=None, timeout=240, host="127.0.0.1", file_size_limit=None):
        self.port = _free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.key = key
        self.log = open(tmp_path / f"serve-{self.port}.log", "w+")
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("ALAYA_API_KEY", None)  # the key is `key`, never the caller's environment's
        cmd = [*alaya_command(file_size_limit), "serve", "--host", host, "--port", str(self.port), *args]
        if key:
            cmd += ["--api-key", key]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"alaya serve exited {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"alaya serve did not start in {timeout} s:\n{self.output()}")
            time.sleep(0.3)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key or "none", max_retries=0, timeout=300, **kw)

    def http(self, method, path, body=None, *, raw=None, key=True, headers=None):
        """(status, parsed JSON or text) without the openai client."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if key and self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def stop(self, sig=signal.SIGTERM, timeout=120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
