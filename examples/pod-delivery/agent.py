#!/usr/bin/env python3
"""An agent whose grant's token is never in a Secret (tokenDelivery: Pod): it fetches its own token
from the operator's token endpoint, keeps it in memory (and, if asked, in a file of its own), and
fetches a new one before the current one expires.

It proves which pod it is with the only credential it holds: the ServiceAccount token the kubelet
projects into its pod for the issuer's audience (bound to this pod; it dies with it). Nothing else
in the namespace can get the token: not another pod, not whoever reads the namespace's Secrets.

Standard library only. Configuration (environment):
  DELEGATION_ISSUER    the operator's issuer URL (its discovery names the token endpoint)
  DELEGATION_CA        CA certificate of the endpoint (default /var/run/secrets/delegation/ca/ca.crt)
  GRANT                the DelegationGrant (in the pod's namespace) whose token to fetch
  ACTOR_TOKEN_FILE     the projected ServiceAccount token (default /var/run/secrets/tokens/delegation-issuer)
  SCOPE                scopes to ask for, space-separated (default: all the grant's)
  EXPIRES_IN           seconds the token should live (default: as long as the operator allows)
  TOKEN_FILE           if set, the current token is written there (mode 0600), replaced atomically
  ROUNDS               fetch this many times, then exit (default 0: for ever)

Refreshes after two thirds of each token's life; on 503 or 429 (the endpoint busy, or the grant's
token being replaced) it retries with backoff. Prints one JSON line per token fetched (token id,
scope, lifetime, when it refreshes), never a token. Exits 1 when the endpoint refuses, 2 when it
cannot be reached.
"""

import base64
import json
import os
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
GRANT_TOKEN = "urn:delegation.nhi.dev:token-type:grant"
JWT = "urn:ietf:params:oauth:token-type:jwt"
RETRY_STATUSES = (429, 503)


def read(path):
    with open(path, encoding="ascii") as f:
        return f.read().strip()


def https_json(context, url, form=None):
    """GET (or POST `form`) and return (status, JSON body); error bodies are JSON too."""
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(url, data=data, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as refused:
        try:
            return refused.code, json.load(refused)
        except ValueError:
            return refused.code, {}


def claims_of(token):
    """The payload of a JWT, unverified: to report what was issued, not to trust it."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def fetch(context, endpoint, grant, actor_token_file, scope, expires_in):
    """One token for this pod, retrying while the endpoint says to; (status, answer)."""
    delay = 1.0
    for _ in range(6):
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": grant,
            "subject_token_type": GRANT_TOKEN,
            # Read each time: the kubelet replaces it as it rotates.
            "actor_token": read(actor_token_file),
            "actor_token_type": JWT,
        }
        if scope:
            form["scope"] = scope
        if expires_in:
            form["expires_in"] = expires_in
        status, answer = https_json(context, endpoint, form)
        if status not in RETRY_STATUSES:
            return status, answer
        time.sleep(delay)
        delay = min(delay * 2, 30)
    return status, answer


def keep(path, token):
    """Writes the token where only this process's user can read it, replacing the old one at once."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


def main():
    issuer = os.environ["DELEGATION_ISSUER"].rstrip("/")
    grant = os.environ["GRANT"]
    actor_token_file = os.environ.get(
        "ACTOR_TOKEN_FILE", "/var/run/secrets/tokens/delegation-issuer")
    context = ssl.create_default_context(
        cafile=os.environ.get("DELEGATION_CA", "/var/run/secrets/delegation/ca/ca.crt"))
    try:
        status, discovery = https_json(context, issuer + "/.well-known/openid-configuration")
    except OSError as unreachable:
        print(f"the issuer cannot be reached: {unreachable}", file=sys.stderr)
        return 2
    endpoint = discovery.get("token_endpoint") if status == 200 else None
    if not endpoint or not endpoint.startswith(issuer + "/"):
        print("the issuer serves no token endpoint", file=sys.stderr)
        return 2
    rounds = int(os.environ.get("ROUNDS", "0"))
    fetched = 0
    while rounds == 0 or fetched < rounds:
        status, answer = fetch(context, endpoint, grant, actor_token_file,
                               os.environ.get("SCOPE"), os.environ.get("EXPIRES_IN"))
        if status != 200:
            print(json.dumps({"refused": answer.get("error"),
                              "why": answer.get("error_description")}))
            return 1
        token, lifetime = answer["access_token"], int(answer["expires_in"])
        if os.environ.get("TOKEN_FILE"):
            keep(os.environ["TOKEN_FILE"], token)
        refresh_in = max(1, lifetime * 2 // 3)
        print(json.dumps({"jti": claims_of(token)["jti"], "scope": answer["scope"],
                          "token_type": answer["token_type"], "expires_in": lifetime,
                          "refresh_in": refresh_in}), flush=True)
        fetched += 1
        if rounds == 0 or fetched < rounds:
            time.sleep(refresh_in)
    return 0


if __name__ == "__main__":
    sys.exit(main())
