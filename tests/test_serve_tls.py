"""python/serve.py over HTTPS (vLLM's --ssl-certfile / --ssl-keyfile / --ssl-ca-certs / --ssl-cert-reqs): the same
replies as over HTTP, a client's handshake in its own thread, a client that leaves still cancelling its requests,
client certificates, and clear exits for files that cannot serve. The certificates are tests/tls/'s
(scripts/tls_test_certs.sh: a test CA, a server certificate for 127.0.0.1 and a client one)."""
import http.client
import json
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from .test_serve import _all_free, _post, _sse

TLS = Path(__file__).resolve().parent / "tls"


def _context(programs, *flags):
    serve = programs["serve"]
    return serve.ssl_context(serve.parser().parse_args(list(flags)))


@pytest.fixture(scope="module")
def tls_server(programs, server):
    """An HTTPS server on the plain `server`'s engine."""
    ctx = _context(programs, "--ssl-certfile", str(TLS / "server.pem"), "--ssl-keyfile", str(TLS / "server.key"))
    srv = programs["serve"].make_server(server.service.engine, port=0, max_pending=16, ssl_context=ctx)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _client_context(cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(TLS / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(TLS / "client.pem"), str(TLS / "client.key"))
    return ctx


def _https(srv, method, path, body=None, ctx=None):
    conn = http.client.HTTPSConnection("127.0.0.1", srv.server_address[1], timeout=60,
                                       context=ctx or _client_context())
    try:
        conn.request(method, path, None if body is None else json.dumps(body).encode(),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        return r.status, (_sse(data) if body and body.get("stream") else json.loads(data))
    finally:
        conn.close()


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": [5, 17, 3], "max_tokens": 8, "n": 2, "seed": 3, "temperature": 0.8}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 6,
                              "policy": {"name": "bild", "fallback_threshold": 0.3}})])
def test_https_replies_equal_http_replies(server, tls_server, path, body):
    code, plain = _post(server, path, body)
    assert code == 200
    code, secure = _https(tls_server, "POST", path, body)
    assert code == 200
    assert [c["token_ids"] for c in secure["choices"]] == [c["token_ids"] for c in plain["choices"]]
    code, events = _https(tls_server, "POST", path, {**body, "stream": True})
    assert code == 200
    streamed = {}
    for e in events:
        for c in e["choices"]:
            streamed.setdefault(c["index"], []).extend(c.get("token_ids") or [])
    assert [streamed[i] for i in sorted(streamed)] == [c["token_ids"] for c in plain["choices"]]
    assert _https(tls_server, "GET", "/health")[1]["status"] == "ok"
    _all_free(server.service.engine)


def test_the_openai_client_talks_https(tls_server):
    import openai  # (requirements.txt)
    with openai.DefaultHttpxClient(verify=_client_context()) as http:
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{tls_server.server_address[1]}/v1", api_key="none",
                               http_client=http, max_retries=0)
        r = client.completions.create(model="bild", prompt=[5, 17], max_tokens=4)
        assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1


def test_plain_http_or_a_stalled_handshake_holds_no_other_client_up(tls_server):
    """A client that sends plain HTTP to the HTTPS port gets its connection closed; one that connects and says nothing
    waits in its own thread while others are served."""
    port = tls_server.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
            plain.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"HTTP/1.1 200" not in plain.recv(4096)  # (closed after a failed handshake, or an alert)
        t0 = time.monotonic()
        assert _https(tls_server, "GET", "/health")[0] == 200
        assert time.monotonic() - t0 < 10
        silent.sendall(b"")


def test_a_client_that_leaves_cancels_its_request_over_https(programs, tls_server, monkeypatch):
    """The connection watch peeks at the raw socket under TLS (an SSLSocket's recv takes no flags)."""
    from .test_serve_options import send_while_running, slow_and_watched
    eng, srv = tls_server.service.engine, tls_server
    cancelled = slow_and_watched(eng, monkeypatch)
    raw = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10)
    with _client_context().wrap_socket(raw, server_hostname="127.0.0.1") as s:
        send_while_running(s, eng, {"prompt": [5, 17, 3], "max_tokens": 60, "ignore_eos": True})
        s.setblocking(False)  # (read what came, TLS 1.3's session tickets: unread, they would make the close a reset)
        with pytest.raises(ssl.SSLWantReadError):
            s.recv(1)
    t0 = time.monotonic()
    while not cancelled:  # (the watch cancels it; 60 steps of 50 ms would run 3 s)
        assert time.monotonic() - t0 < 2, "the request ran on after its client left"
        time.sleep(0.02)
    _all_free(eng)


def test_client_certificates_are_required_where_asked(programs, server):
    ctx = _context(programs, "--ssl-certfile", str(TLS / "server.pem"), "--ssl-keyfile", str(TLS / "server.key"),
                   "--ssl-ca-certs", str(TLS / "ca.pem"), "--ssl-cert-reqs", "2")
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    srv = programs["serve"].make_server(server.service.engine, port=0, ssl_context=ctx)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert _https(srv, "GET", "/health", ctx=_client_context(cert=True))[0] == 200
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)):
            _https(srv, "GET", "/health")  # (no certificate: refused in the handshake, or at the first read)
        assert _https(srv, "GET", "/health", ctx=_client_context(cert=True))[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("flags, message", [
    (["--ssl-keyfile", "server.key"], "--ssl-keyfile needs --ssl-certfile"),
    (["--ssl-cert-reqs", "2"], "--ssl-cert-reqs needs --ssl-certfile"),
    (["--ssl-certfile", "missing.pem"], "not a certificate and its private key"),
    (["--ssl-certfile", "server.pem", "--ssl-keyfile", "client.key"], "not a certificate and its private key"),
    (["--ssl-certfile", "ca.pem"], "not a certificate and its private key"),  # (no key in it)
    (["--ssl-certfile", "server.pem", "--ssl-keyfile", "server.key", "--ssl-ca-certs", "server.key"],
     "--ssl-ca-certs .* not a file of CA certificates"),
    (["--ssl-certfile", "server.pem", "--ssl-keyfile", "server.key", "--ssl-cert-reqs", "1"],
     "--ssl-cert-reqs 1 or 2 needs --ssl-ca-certs")])
def test_tls_files_that_cannot_serve_exit_clearly_before_any_model_loads(programs, monkeypatch, flags, message):
    serve = programs["serve"]
    flags = [str(TLS / f) if f.endswith((".pem", ".key")) else f for f in flags]
    monkeypatch.setattr(serve, "build_engine", lambda args: pytest.fail("a model loaded before the TLS files' check"))
    with pytest.raises(SystemExit, match=message):
        serve.main(flags)
    with pytest.raises(TypeError, match="ssl_context must be a server-side"):
        serve.make_server(None, port=0, ssl_context=ssl.create_default_context())


@pytest.mark.parametrize("stream", [True, False])
def test_a_reply_ends_with_a_tls_close_not_a_bare_eof(tls_server, stream):
    """A reply read to the connection's end (a stream's server-sent events) ends with TLS's close_notify, so that
    clients that refuse a truncation attack's bare EOF (curl, OpenSSL's) read it whole."""
    ctx = _client_context()
    raw = socket.create_connection(("127.0.0.1", tls_server.server_address[1]), timeout=30)
    body = json.dumps({"prompt": [5, 17], "max_tokens": 3, "stream": stream}).encode()
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        data = b""
        while chunk := s.recv(65536):  # (SSLEOFError on a bare EOF)
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and (b"data: [DONE]" in data if stream else b'"choices"' in data)


def test_the_load_test_runs_over_https(programs, tls_server):
    """python/load_test.py against the HTTPS server: every response equals the same request served alone."""
    lt = programs["load_test"]
    bodies = lt.request_mix(6, 1, max_tokens=6)
    res = lt.run_load(f"https://127.0.0.1:{tls_server.server_address[1]}", bodies, clients=3, requests=12,
                      tls=_client_context())
    assert res["row"]["mismatches"] == 0 and not res["failures"], res["failures"]
