#!/usr/bin/env python3
"""A small Docker token server for tests: the auth service a registry such as Docker Hub puts in
front of its API (distribution's `auth: token:` setting). Standard library only; tokens are
RS256 JWTs signed with the `openssl` command, carrying the signing certificate in `x5c` (the
registry trusts it through its `rootcertbundle`).

  token_server.py --listen 127.0.0.1:8443 --cert C --key K --signing-key SK --signing-cert SC \
      --issuer ISS --log FILE

Policy (fixed, for tests):
  anonymous          pull on every repository not under private/
  alice/alice-secret pull on everything
  admin/admin-secret push and pull on everything
  anything else      401

Every issued token appends `<user> <scope...>` to --log, so tests can count tokens.
"""

import argparse
import base64
import json
import ssl
import subprocess
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

USERS = {"alice": "alice-secret", "admin": "admin-secret"}
TOKEN_LIFE_S = 300


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def allowed(user, repo, wanted):
    if user == "admin":
        return [a for a in wanted if a in ("pull", "push", "delete", "*")]
    if user == "alice":
        return [a for a in wanted if a == "pull"]
    if repo.startswith("private/"):
        return []
    return [a for a in wanted if a == "pull"]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):
        sys.stderr.write("%s\n" % (fmt % args))

    def user(self):
        header = self.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            return "anonymous"
        try:
            name, password = base64.b64decode(header[6:].strip()).decode().split(":", 1)
        except Exception:
            return None
        return name if USERS.get(name) == password else None

    def do_GET(self):
        url = urlparse(self.path)
        if url.path != "/token":
            self.send_error(404)
            return
        user = self.user()
        if user is None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="token"')
            self.end_headers()
            return
        query = parse_qs(url.query)
        service = query.get("service", [""])[0]
        access = []
        for scope in query.get("scope", []):
            for one in scope.split(" "):
                parts = one.split(":")
                if len(parts) < 3 or parts[0] != "repository":
                    continue
                repo, actions = ":".join(parts[1:-1]), parts[-1].split(",")
                access.append({"type": "repository", "name": repo, "actions": allowed(user, repo, actions)})
        now = int(time.time())
        claims = {
            "iss": self.server.issuer,
            "sub": "" if user == "anonymous" else user,
            "aud": service,
            "exp": now + TOKEN_LIFE_S,
            "nbf": now - 10,
            "iat": now,
            "jti": str(uuid.uuid4()),
            "access": access,
        }
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.server.signing_cert_b64]}
        signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", self.server.signing_key],
            input=signing_input.encode(), capture_output=True, check=True,
        ).stdout
        token = signing_input + "." + b64url(signature)
        with open(self.server.log, "a") as log:
            log.write("%s %s\n" % (user, " ".join(query.get("scope", []))))
        body = json.dumps({"token": token, "access_token": token, "expires_in": TOKEN_LIFE_S,
                           "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--signing-key", required=True)
    p.add_argument("--signing-cert", required=True)
    p.add_argument("--issuer", required=True)
    p.add_argument("--log", required=True)
    a = p.parse_args()
    host, port = a.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    der = subprocess.run(["openssl", "x509", "-in", a.signing_cert, "-outform", "DER"],
                         capture_output=True, check=True).stdout
    server.signing_cert_b64 = base64.b64encode(der).decode()
    server.signing_key = a.signing_key
    server.issuer = a.issuer
    server.log = a.log
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
