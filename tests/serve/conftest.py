import socket
import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from btlm.inference import init_model_dir

    return init_model_dir("tiny", tmp_path_factory.mktemp("serve") / "tiny", seed=0)


@contextmanager
def running_server(engine, model_name: str):
    """Serve ``engine`` with uvicorn in a thread on a free port; yields the base URL. Closes the engine."""
    import uvicorn

    from btlm.serve.app import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, model_name), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()
        sock.close()
