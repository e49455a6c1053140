"""The egress rules (what a policy's ``egress`` entry means, and a bad one's error; a policy naming one is
rejected at intake: tests/unit/test_policy_and_jobs.py) and the egress proxy on the host, without a
container: a client on the job's Unix socket, a plain origin server on 127.0.0.1 as the destination. The
integration tier runs the same requests from inside a sealed container."""

from __future__ import annotations

import ipaddress

import pytest

from executor.egress_rules import forbidden_reason, parse_egress
from tests.sealing import HostSide, Origin, UnixHTTPConnection, upstream, wait_until


@pytest.mark.parametrize("entry, complaint", [
    ("packages.example.com", "no port; add it"),
    ("https://packages.example.com:443", "without scheme or path"),
    ("packages.example.com:443/simple", "without scheme or path"),
    ("*.com:443", "at least two labels"),
    ("a.*.org:443", 'leading "*."'),
    ("packages.example.com:99999", "1 to 65535"),
    ("packages.example.com:https", "1 to 65535"),
    ("::1:443", "brackets"),
    ("10.0.0.0/8:443", "ranges are not supported"),
    ("bad_name.org:443", "not a valid host name"),
    (443, "not a string"),
])
def test_a_bad_egress_entry_says_what_is_wrong_and_how_to_write_it(entry, complaint):
    with pytest.raises(ValueError, match=complaint.replace("*", r"\*").replace(".", r"\.")):
        parse_egress([entry])


def test_names_wildcards_and_ips_are_matched_exactly():
    rules = parse_egress(["Packages.Example.com:443", "*.example.org:443", "127.0.0.1:8765", "[::1]:80"])
    assert [str(r) for r in rules] == ["packages.example.com:443", "*.example.org:443", "127.0.0.1:8765", "[::1]:80"]
    pypi, npm, loop4, loop6 = rules
    assert pypi.matches("packages.example.com", 443, None) and not pypi.matches("packages.example.com", 80, None)
    assert not pypi.matches("evil-packages.example.com", 443, None)
    assert npm.matches("registry.example.org", 443, None) and not npm.matches("example.org", 443, None)
    assert not npm.matches("example.org.evil.com", 443, None)
    ip = ipaddress.ip_address
    assert loop4.matches("127.0.0.1", 8765, ip("127.0.0.1")) and not pypi.matches("1.2.3.4", 443, ip("1.2.3.4"))
    assert loop6.matches("::1", 80, ip("::1"))


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.1.1", "private"), ("172.16.0.1", "private"),
    ("169.254.169.254", "metadata"), ("169.254.1.1", "link-local"), ("::1", "loopback"),
    ("::ffff:10.0.0.1", "private"), ("100.64.0.1", "not a public"), ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"), ("fd00:ec2::254", "metadata"),
])
def test_non_public_addresses_are_refused_through_a_name(address, kind):
    assert kind in forbidden_reason(ipaddress.ip_address(address))


def test_public_addresses_are_not_refused():
    assert forbidden_reason(ipaddress.ip_address("151.101.0.223")) is None
    assert forbidden_reason(ipaddress.ip_address("2a04:4e42::223")) is None


# ------------------------------------------------------------------------------------ the proxy (host)


@pytest.fixture
def host():
    side = HostSide()
    yield side
    side.close()


@pytest.fixture
def origin():
    server = Origin()
    yield server
    server.close()


def _tunnel(job, host: str, port: int) -> tuple[int, str]:
    """CONNECT host:port through the job's proxy, then one GET inside the tunnel."""
    conn = UnixHTTPConnection(job.egress_socket)
    conn.set_tunnel(host, port)
    try:
        conn.request("GET", "/through-tunnel")
        response = conn.getresponse()
        return response.status, response.read().decode()
    except OSError as exc:  # http.client reports a refused CONNECT as OSError("Tunnel connection failed: 403 ...")
        return 0, str(exc)
    finally:
        conn.close()


def test_the_proxy_allows_exactly_its_list_and_reports_every_decision(host, origin):
    with Origin() as other:
        job = host.add_job("egress", upstream("http://127.0.0.1:9"),
                           egress=[f"127.0.0.1:{origin.port}", f"localhost:{origin.port}", "packages.example.com:443"])
        assert _tunnel(job, "127.0.0.1", origin.port) == (200, "origin saw /through-tunnel")
        status, error = _tunnel(job, "127.0.0.1", other.port)  # same address, a port the list does not name
        assert status == 0 and "403" in error
        assert "403" in _tunnel(job, "localhost", origin.port)[1]  # a name resolving to the loopback
        assert "403" in _tunnel(job, "169.254.169.254", 80)[1]
        assert "403" in _tunnel(job, "example.org", 443)[1]
        host.remove_job(job)
    decisions = {(e.method, e.host, e.port): (e.allowed, e.status) for e in job.egress}
    assert decisions == {("CONNECT", "127.0.0.1", origin.port): (True, 200),
                         ("CONNECT", "127.0.0.1", other.port): (False, 403),
                         ("CONNECT", "localhost", origin.port): (False, 403),
                         ("CONNECT", "169.254.169.254", 80): (False, 403),
                         ("CONNECT", "example.org", 443): (False, 403)}
    tunnel = next(e for e in job.egress if e.allowed)
    assert tunnel.bytes_up > 0 and tunnel.bytes_down > 0 and tunnel.address == "127.0.0.1" and tunnel.duration > 0
    loopback = next(e for e in job.egress if e.host == "localhost")
    assert "resolves to 127.0.0.1, a loopback address" in loopback.reason


def test_the_proxy_forwards_plain_http_with_a_body(host, origin):
    job = host.add_job("plain-post", upstream("http://127.0.0.1:9"), egress=[f"127.0.0.1:{origin.port}"])
    conn = UnixHTTPConnection(job.egress_socket)
    conn.request("POST", f"http://127.0.0.1:{origin.port}/upload?x=1", b"y" * 100_000,
                 {"proxy-authorization": "Basic c2VjcmV0", "content-type": "application/octet-stream"})
    response = conn.getresponse()
    assert (response.status, response.read()) == (
        200, f"origin got 100000 bytes at /upload?x=1 for 127.0.0.1:{origin.port}".encode())
    conn.close()
    conn = UnixHTTPConnection(job.egress_socket)
    conn.request("GET", "https://127.0.0.1/")  # https is CONNECT's, never absolute-form
    response = conn.getresponse()
    assert response.status == 400 and b"use CONNECT" in response.read()
    conn.close()
    assert wait_until(lambda: len(job.egress) == 2)
    event = job.egress[0]
    assert (event.allowed, event.method, event.status) == (True, "POST", 200) and event.bytes_up > 100_000
    assert (job.egress[1].allowed, job.egress[1].status) == (False, 400)
