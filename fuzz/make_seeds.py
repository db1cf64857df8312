#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/: a few well-formed inputs per target
that reach the interesting paths (the fuzzer mutates from there). Re-run after changing
an input format; the files are small and committed."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- gateway_packet: decrypted IP packets -------------------------------------------
def ip4(src, dst, proto, l4, flags_frag=0x4000, options=b""):
    ihl = 5 + len(options) // 4
    total = ihl * 4 + len(l4)
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, flags_frag, 64, proto, 0,
                    bytes(src), bytes(dst)) + options
    return h + l4


def tcp(sport, dport, flags, payload=b""):
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload


def udp(sport, dport, payload):
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


A, GW, WEB, DNS, PG = [100, 64, 0, 2], [100, 64, 0, 1], [127, 96, 0, 10], [127, 96, 0, 53], [127, 96, 1, 5]
write("gateway_packet", "tcp-syn-allowed", ip4(A, WEB, 6, tcp(40000, 80, 0x02)))
write("gateway_packet", "tcp-syn-denied-port", ip4(A, WEB, 6, tcp(40000, 9090, 0x02)))
write("gateway_packet", "tcp-ack-other-service", ip4(A, PG, 6, tcp(40000, 5432, 0x10, b"hello")))
write("gateway_packet", "udp-dns-service", ip4(A, DNS, 17, udp(5353, 53, b"\x12\x34\x01\x00")))
write("gateway_packet", "udp-dns-gateway", ip4(A, GW, 17, udp(5353, 53, b"\x12\x34\x01\x00")))
write("gateway_packet", "icmp-echo", ip4(A, WEB, 1, b"\x08\x00\x00\x00\x00\x01\x00\x01ping"))
write("gateway_packet", "icmp-echo-options", ip4(A, WEB, 1, b"\x08\x00\x00\x00\x00\x01\x00\x01", options=b"\x01\x01\x01\x00"))
write("gateway_packet", "spoofed", ip4([100, 64, 0, 9], WEB, 6, tcp(1, 80, 0x02)))
write("gateway_packet", "later-fragment", ip4(A, WEB, 6, b"\x00" * 24, flags_frag=0x0003))
u = udp(1, 53, b"x")
v6 = (b"\x60\x00\x00\x00" + struct.pack("!HBB", len(u) + 8, 0, 64) + bytes([0xfd] + [0] * 14 + [2])
      + bytes([0xfd] + [0] * 14 + [0x10]) + bytes([17, 0, 1, 4, 0, 0, 0, 0]) + u)
write("gateway_packet", "ipv6-hop-by-hop-udp", v6)
t = tcp(1, 443, 0x02)
v6f = (b"\x60\x00\x00\x00" + struct.pack("!HBB", len(t) + 8, 44, 64) + bytes([0xfd] + [0] * 14 + [2])
       + bytes([0xfd] + [0] * 14 + [0x10]) + bytes([6, 0, 0, 1, 0, 0, 0, 7]) + t)
write("gateway_packet", "ipv6-fragment-tcp", v6f)


def ip6(src, dst, nh, body):
    return b"\x60\x00\x00\x00" + struct.pack("!HBB", len(body), nh, 64) + bytes(src) + bytes(dst) + body


def v6addr(prefix, last):
    return bytes(prefix) + bytes(14 - len(prefix)) + struct.pack("!H", last)


A6, GW6 = v6addr([0xfd, 0x6b, 0x72, 0x61, 0x79, 0x61], 2), v6addr([0xfd, 0x6b, 0x72, 0x61, 0x79, 0x61], 1)
WEB6, PG6 = v6addr([0xfd, 0, 0, 0x96], 0xa), v6addr([0xfd, 0, 0, 0x96] + [0] * 8 + [0, 1], 5)
write("gateway_packet", "ipv6-tcp-syn-allowed", ip6(A6, WEB6, 6, tcp(40000, 80, 0x02)))
write("gateway_packet", "ipv6-tcp-syn-denied", ip6(A6, PG6, 6, tcp(40000, 5432, 0x02)))
write("gateway_packet", "ipv6-spoofed", ip6(v6addr([0xfd, 0x6b, 0x72, 0x61, 0x79, 0x61], 9), WEB6, 6, tcp(1, 80, 0x02)))
write("gateway_packet", "ipv6-dns-gateway", ip6(A6, GW6, 17, udp(5353, 53, b"\x12\x34\x01\x00")))
write("gateway_packet", "icmpv6-echo", ip6(A6, WEB6, 58, b"\x80\x00\x00\x00\x00\x01\x00\x01ping"))
write("gateway_packet", "icmpv6-echo-gateway", ip6(A6, GW6, 58, b"\x80\x00\x00\x00\x00\x01\x00\x01"))
# Routing (16 bytes) then destination options before TCP.
write("gateway_packet", "ipv6-routing-dstopts-tcp",
      ip6(A6, WEB6, 43, bytes([60, 1]) + bytes(14) + bytes([6, 0]) + bytes(6) + tcp(1, 80, 0x02)))


# --- gateway_tcp_gro: a batch of allowed packets for the TUN write --------------------
def tcp_seq(sport, seq, flags, payload):
    return struct.pack("!HHIIBBHHH", sport, 5201, seq, 7, 5 << 4, flags, 512, 0, 0) + payload


def framed(packets):
    return b"".join(struct.pack("!H", len(p)) + p for p in packets)


# Mode byte even: raw packets, length-framed; odd: a steered burst (3 bytes a segment).
stream = [ip4(A, WEB, 6, tcp_seq(40000, i * 100, 0x10, bytes([i]) * 100)) for i in range(4)]
write("gateway_tcp_gro", "raw-one-connection", b"\x0e" + framed(stream))
write("gateway_tcp_gro", "raw-with-a-syn", b"\x0e" + framed(stream[:2] + [ip4(A, WEB, 6, tcp(40000, 80, 0x02))] + stream[2:]))
write("gateway_tcp_gro", "raw-ipv6", b"\x0e" + framed([ip6(A6, WEB6, 6, tcp_seq(40000, i * 100, 0x10, b"x" * 100)) for i in range(3)]))
write("gateway_tcp_gro", "burst-two-connections", b"\x1f" + bytes([0, 10, 3, 1, 10, 3] * 20 + [0, 210, 0, 1, 15, 1]))


# --- gateway_dns: DNS queries ---------------------------------------------------------
def name(n):
    return b"".join(bytes([len(l)]) + l.encode() for l in n.strip(".").split(".") if l) + b"\x00"


def query(n, qtype, qid=0x1234, extra=b"", arcount=0, qd=None):
    qs = qd if qd is not None else [(n, qtype)]
    body = b"".join(name(q) + struct.pack("!HH", t, 1) for q, t in qs)
    return struct.pack("!HHHHHH", qid, 0x0100, len(qs), 0, 0, arcount) + body + extra


write("gateway_dns", "a-full", query("web.default.svc.cluster.local.", 1))
write("gateway_dns", "a-short", query("web.default", 1))
write("gateway_dns", "aaaa-v6", query("api.v6.svc.", 28))
write("gateway_dns", "aaaa-dual-stack", query("web.default.svc.cluster.local.", 28))
write("gateway_dns", "aaaa-denied", query("pg.db.svc.cluster.local.", 28))
write("gateway_dns", "aaaa-v4-only", query("dns.default.svc.", 28))
write("gateway_dns", "srv", query("_http._tcp.web.default.svc.cluster.local.", 33))
write("gateway_dns", "any-srv-short", query("_dns._udp.dns.default", 255))
write("gateway_dns", "denied", query("pg.db.svc.cluster.local.", 1))
write("gateway_dns", "external", query("example.com.", 1))
write("gateway_dns", "edns", query("web.default.svc.cluster.local.", 1,
                                   extra=b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0), arcount=1))
write("gateway_dns", "two-questions", query("", 0, qd=[("web.default.svc.", 1), ("pg.db.svc.", 1)]))
write("gateway_dns", "compressed", struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0)
      + name("web.default.svc.cluster.local.") + b"\x00\x01\x00\x01")

# --- ccm_annotations: key=value lines -------------------------------------------------
P = "lb.cloudraya.com/"
write("ccm_annotations", "all-valid", "\n".join([
    P + "algorithm=least_connection", P + "name=my-lb", P + "health-check-protocol=tcp",
    P + "health-check-port=8080", P + "health-check-interval=10", P + "health-check-timeout=5",
    P + "health-check-healthy-threshold=2", P + "health-check-unhealthy-threshold=4",
    P + "public-ip-id=ip-8d1e", P + "retain-public-ip=true", P + "node-selector=role=lb,!gpu,zone!=b",
]))
write("ccm_annotations", "http-check", "@2=http\n@4=/healthz?full=1\n@5=30\n@6=29\n")
write("ccm_annotations", "selector-forms", "@11=kubernetes.io/role==lb, zone , !example.com/gpu\n")
write("ccm_annotations", "spec-fields", "spec.loadBalancerIP=203.0.113.7\nspec.loadBalancerSourceRanges=10.0.0.0/8, 192.168.1.1/24\n"
      "spec.externalTrafficPolicy=Local\nproviderID=cloudraya:///vm-3\n@3=31000\n")
write("ccm_annotations", "invalid", P + "proxy-protocol=true\n" + P + "nmae=typo\n@1=-Bad_Name\n")

# --- platform_response: kind, status, Retry-After / expires_at line, body -------------
def resp(kind, status_index, header, body):
    return bytes([kind, 0x80, status_index]) + header.encode() + b"\n" + body.encode()

ST = [200, 201, 202, 204, 301, 400, 401, 403, 404, 409, 418, 422, 429, 500, 502, 503, 504]
S = {s: i for i, s in enumerate(ST)}
LB = ('{"id":"lb-1","name":"kr-default-web","status":"active","labels":{"k":"v"},"public_ip":{"id":"ip-1","address":"203.0.113.7"},'
      '"rules":[{"name":"tcp-80","protocol":"tcp","public_port":80,"private_port":30080,"algorithm":"round_robin",'
      '"allowed_sources":["10.0.0.0/8"],"health_check":{"protocol":"http","port":10256,"path":"/healthz","interval_s":5}}],'
      '"backends":[{"vm_id":"vm-1","private_ip":"10.0.0.1","health":[{"rule":"tcp-80","state":"healthy"}]}]}')
write("platform_response", "lb-200", resp(0, S[200], "", '{"code":200,"message":"OK","data":' + LB + ',"error":null}'))
write("platform_response", "lb-page", resp(1, S[200], "", '{"code":200,"data":{"items":[' + LB + '],"page":1,"per_page":50,"total":1}}'))
write("platform_response", "public-ip-page", resp(3, S[200], "", '{"data":{"items":[{"id":"ip-1","address":"2001:db8::1","labels":null,'
      '"attached_to":{"type":"load_balancer","id":"lb-1"}}],"page":1,"per_page":50,"total":1}}'))
write("platform_response", "instance", resp(4, S[200], "", '{"data":{"id":"vm-1","state":"running","private_ip":"10.0.0.1","labels":{}}}'))
write("platform_response", "vpc", resp(7, S[200], "", '{"data":{"id":"vpc-1","cidr":"10.0.0.0/16"}}'))
write("platform_response", "accepted-empty", resp(9, S[202], "", ""))
write("platform_response", "invalid-422", resp(0, S[422], "", '{"code":422,"message":"invalid","error":[{"field":"rules[0].public_port","message":"taken"},{"x":1}]}'))
write("platform_response", "rate-limited", resp(2, S[429], "1.5", '{"code":429,"error":"slow down"}'))
write("platform_response", "html-502", resp(6, S[502], "", "<html><body><h1>502 Bad Gateway</h1></body></html>"))
write("platform_response", "login-expires", resp(10, S[200], "2026-11-25T21:00:00.123+07:00", '{"data":{"token":"t","expires_at":"2026-11-25T21:00:00Z"}}'))
# The IPv6 extension (docs/platform-api.md, "IPv6"): a dual-stack LB, an IPv6 public IP,
# a VM with private_ipv6, a cluster with ip_versions and a subnet with ipv6_cidr.
LB6 = ('{"id":"lb-2","name":"kr-default-dual","status":"active","ip_versions":[4,6],'
       '"public_ip":{"id":"ip-1","address":"203.0.113.7"},"public_ipv6":{"id":"ip-2","address":"2001:db8::7"},'
       '"rules":[{"name":"tcp-80","protocol":"tcp","public_port":80,"private_port":30080,"algorithm":"source",'
       '"allowed_sources":["10.0.0.0/8","2001:db8:1::/48"]}],'
       '"backends":[{"vm_id":"vm-1","private_ip":"10.0.0.1","private_ipv6":"fd00:10::b"},{"vm_id":"vm-2","private_ip":"10.0.0.2"}]}')
write("platform_response", "lb-dual", resp(0, S[200], "", '{"code":200,"message":"OK","data":' + LB6 + ',"error":null}'))
write("platform_response", "public-ip-v6", resp(2, S[201], "", '{"data":{"id":"ip-2","address":"fd00:203::b","version":6,"region":"jkt","labels":{},"attached_to":null}}'))
write("platform_response", "instance-v6", resp(4, S[200], "", '{"data":{"id":"vm-1","state":"running","private_ip":"10.0.0.1","private_ipv6":"fd00:10::b","labels":{}}}'))
write("platform_response", "cluster-dual", resp(6, S[200], "", '{"data":{"id":"cl-1","region":"jkt","vpc_id":"vpc-1","subnet_id":"subnet-1","ip_versions":[4,6]}}'))
write("platform_response", "subnet-v6", resp(8, S[200], "", '{"data":{"id":"subnet-1","vpc_id":"vpc-1","cidr":"10.0.0.0/24","ipv6_cidr":"fd00:10::/112"}}'))
write("platform_response", "no-ipv6-422", resp(2, S[422], "", '{"code":422,"error":[{"field":"version","message":"region jkt has no IPv6 public IPs"}]}'))

# --- kube_request: requests separated by ==== ------------------------------------------
def req(line, headers=(), body=""):
    return line + "\n" + "".join(h + "\n" for h in headers) + "\n" + body

SEP = "\n====\n"
SVC = '{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"default","labels":{"app":"web"}},"spec":{"type":"LoadBalancer","selector":{"app":"web"},"ports":[{"name":"http","port":80,"targetPort":8080}]}}'
write("kube_request", "list-selectors", req("GET /api/v1/namespaces/default/services?labelSelector=component%3Dapiserver%2Cprovider+in+(kubernetes)%2C!missing&fieldSelector=metadata.name%3Dkubernetes&limit=1"))
write("kube_request", "table-and-metadata", req("GET /api/v1/namespaces?limit=2", ["Accept: application/json;as=Table;v=v1;g=meta.k8s.io"]) + SEP
      + req("GET /api/v1/namespaces/default", ["Accept: application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"]))
write("kube_request", "create-and-patch", SEP.join([
    req("POST /api/v1/namespaces/default/services?fieldManager=fuzz", ["Content-Type: application/json"], SVC),
    req("PATCH /api/v1/namespaces/default/services/web", ["Content-Type: application/strategic-merge-patch+json"],
        '{"metadata":{"finalizers":["a/b"]},"spec":{"ports":[{"port":80,"nodePort":30080},{"name":"m","port":9090,"$patch":"merge"}],"$setElementOrder/ports":[{"port":9090},{"port":80}]}}'),
    req("PATCH /api/v1/namespaces/default/services/web", ["Content-Type: application/merge-patch+json"], '{"metadata":{"labels":{"app":null,"x":"y"}}}'),
    req("PATCH /api/v1/namespaces/default/services/web", ["Content-Type: application/json-patch+json"],
        '[{"op":"test","path":"/metadata/annotations","value":null},{"op":"add","path":"/metadata/annotations","value":{"a":"b"}},{"op":"replace","path":"/spec/ports/0/port","value":81}]'),
    req("PATCH /api/v1/namespaces/default/services/web/status", ["Content-Type: application/merge-patch+json"], '{"status":{"loadBalancer":{"ingress":[{"ip":"203.0.113.7"}]}}}'),
    req("DELETE /api/v1/namespaces/default/services/web?propagationPolicy=Foreground&gracePeriodSeconds=0", [], '{"preconditions":{"resourceVersion":"1"}}'),
]))
write("kube_request", "apply-yaml", SEP.join([
    req("PATCH /api/v1/namespaces/default/configmaps/cm?fieldManager=fuzz&force=true", ["Content-Type: application/apply-patch+yaml"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm\n  labels: {a: b}\ndata:\n  k: v\n"),
    req("POST /api/v1/namespaces?dryRun=All", ["Content-Type: application/yaml"], "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: other\n"),
    req("PUT /api/v1/namespaces/default/configmaps/cm", ["Content-Type: application/json"],
        '{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"cm","resourceVersion":"999"},"data":{"k":"w"}}'),
]))


def pb_field(num, data):
    return bytes([num << 3 | 2]) + varint(len(data)) + data


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


meta = pb_field(1, b"cm-pb") + pb_field(11, pb_field(1, b"app") + pb_field(2, b"x"))
cm = pb_field(1, meta) + pb_field(2, pb_field(1, b"key") + pb_field(2, b"value")) + bytes([4 << 3, 1])
body = b"k8s\x00" + pb_field(1, pb_field(1, b"v1") + pb_field(2, b"ConfigMap")) + pb_field(2, cm)
write("kube_request", "protobuf-configmap",
      b"POST /api/v1/namespaces/default/configmaps\nContent-Type: application/vnd.kubernetes.protobuf\n\n" + body)
write("kube_request", "watch-and-discovery", SEP.join([
    req("GET /api/v1/namespaces/default/services?watch=true&resourceVersion=1&allowWatchBookmarks=true&timeoutSeconds=1"),
    req("GET /apis", ["Accept: application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"]),
    req("GET /openapi/v3/api/v1"),
    req("POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews", ["Content-Type: application/json"],
        '{"apiVersion":"authorization.k8s.io/v1","kind":"SelfSubjectAccessReview","spec":{"resourceAttributes":{"verb":"list","resource":"services"}}}'),
    req("GET /api/v1/namespaces/kube-system/services", ["Authorization: Bearer wrong", "Impersonate-User: x"]),
]))


# --- gateway_uapi: 16 bytes choosing the device state, then what a client writes ------
def uapi_state(peers=2, endpoints=0b1101, handshakes=0b0110, psks=0b1001, more_ips=0b11):
    # peers, three peer key bytes, endpoint kinds, handshake kinds, extra allowed IPs,
    # preshared-key kinds (two bits a peer), then bytes for ports, times and counters.
    return bytes([peers, 0x51, 0xc8, 0x2b, endpoints, handshakes, more_ips, psks,
                  7, 0, 0, 0, 0x65, 0x4f, 0x1a, 0x20])


K1, K2, K3 = "a8" * 32, "1f" * 32, "e4" * 32
write("gateway_uapi", "get", uapi_state() + b"get=1\n\n")
write("gateway_uapi", "get-empty-device", uapi_state(peers=0) + b"get=1\n\n")
write("gateway_uapi", "set-peer-then-get", uapi_state(peers=3, endpoints=0b111001) + (
    "set=1\nprivate_key=%s\nlisten_port=51820\nfwmark=0\nreplace_peers=true\n"
    "public_key=%s\npreshared_key=%s\nendpoint=192.0.2.7:51820\npersistent_keepalive_interval=25\n"
    "replace_allowed_ips=true\nallowed_ip=100.64.0.7/32\nallowed_ip=fd00::7/128\n"
    "public_key=%s\nendpoint=[2001:db8::1]:4500\nprotocol_version=1\n"
    "public_key=%s\nremove=true\n\nget=1\n\n" % (K1, K2, K3, K3, K1)).encode())
write("gateway_uapi", "set-bad-hex", uapi_state() + (
    "set=1\nprivate_key=%sZZ\npublic_key=12345\npreshared_key=%s0\n\nget=1\n\n" % (K1[:-2], K2)).encode())
write("gateway_uapi", "set-huge-numbers", uapi_state() + (
    "set=1\nlisten_port=4294967296\npublic_key=%s\npersistent_keepalive_interval=99999999999999999999\n"
    "endpoint=[::1]:99999\nallowed_ip=10.0.0.0/33\n\nget=1\n\n" % K1).encode())
write("gateway_uapi", "set-repeated-keys", uapi_state() + (
    "set=1\npublic_key=%s\npublic_key=%s\nreplace_allowed_ips=true\nreplace_allowed_ips=false\n"
    "allowed_ip=100.64.0.2/32\nallowed_ip=100.64.0.2/32\nremove=true\nremove=true\n\nget=1\n\n" % (K1, K1)).encode())
write("gateway_uapi", "missing-blank-lines", uapi_state() + (
    "set=1\npublic_key=%s\nget=1\nset=1\n" % K1).encode())
write("gateway_uapi", "long-line-then-get", uapi_state() + b"get=1\n" + b"x" * 4096 + b"\nset=1\n\nget=1\n\n")
write("gateway_uapi", "crlf-and-unknown", uapi_state() + b"get=1\r\n\n\nset=1\r\n\r\n\nversion=1\n\nget=1\n\n")
