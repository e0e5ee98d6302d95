#!/usr/bin/env python3
"""An agent that narrows its grant's token for each task at the operator's token endpoint (RFC 8693).

It holds the token of its DelegationGrant (the grant's Secret, mounted) and proves which workload it
is with the ServiceAccount token the kubelet projects into its pod for the issuer's audience. For
each task it asks for a token with only that task's scopes and a short life, and hands that token to
the tool or the next agent -- never its grant's token.

Standard library only. Configuration (environment):
  DELEGATION_ISSUER    the operator's issuer URL (its discovery names the token endpoint)
  DELEGATION_CA        CA certificate of the endpoint (default /var/run/secrets/delegation/ca/ca.crt)
  GRANT_TOKEN_FILE     the grant's token (default /var/run/secrets/delegation/grant/token)
  ACTOR_TOKEN_FILE     the projected ServiceAccount token (default /var/run/secrets/tokens/delegation-issuer)
  TASKS                tasks as NAME=SCOPE[,SCOPE...]:SECONDS, space-separated
                       (default "summarise=tickets:read:60")
  TOKEN_DIR            if set, each task's token is written to TOKEN_DIR/NAME.token (mode 0600)

Prints one JSON line per task: what was issued (scope, lifetime, token id, actors), never a token.
Exits 1 when the endpoint refuses a task, 2 when it cannot be reached.
"""

import base64
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
JWT = "urn:ietf:params:oauth:token-type:jwt"


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
        return refused.code, json.load(refused)


def claims_of(token):
    """The payload of a JWT, unverified: to report what was issued, not to trust it."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def actors(claims):
    """The actor chain, root-most first."""
    chain, act = [], claims.get("act")
    while act:
        chain.append(act["sub"])
        act = act.get("act")
    return list(reversed(chain))


def tasks(spec):
    for task in spec.split():
        name, rest = task.split("=", 1)
        scopes, seconds = rest.rsplit(":", 1)
        yield name, scopes.replace(",", " "), int(seconds)


def main():
    issuer = os.environ["DELEGATION_ISSUER"].rstrip("/")
    context = ssl.create_default_context(
        cafile=os.environ.get("DELEGATION_CA", "/var/run/secrets/delegation/ca/ca.crt"))
    status, discovery = https_json(context, issuer + "/.well-known/openid-configuration")
    endpoint = discovery.get("token_endpoint") if status == 200 else None
    if not endpoint or not endpoint.startswith(issuer + "/"):
        print("the issuer serves no token endpoint", file=sys.stderr)
        return 2
    token_dir = os.environ.get("TOKEN_DIR")
    for name, scope, seconds in tasks(os.environ.get("TASKS", "summarise=tickets:read:60")):
        # Read both tokens per task: the kubelet and the operator replace them as they rotate.
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": read(os.environ.get(
                "GRANT_TOKEN_FILE", "/var/run/secrets/delegation/grant/token")),
            "subject_token_type": ACCESS_TOKEN,
            "actor_token": read(os.environ.get(
                "ACTOR_TOKEN_FILE", "/var/run/secrets/tokens/delegation-issuer")),
            "actor_token_type": JWT,
            "scope": scope,
            "expires_in": str(seconds),
        }
        status, answer = https_json(context, endpoint, form)
        if status != 200:
            print(json.dumps({"task": name, "refused": answer.get("error"),
                              "why": answer.get("error_description")}))
            return 1
        token = answer["access_token"]
        claims = claims_of(token)
        print(json.dumps({"task": name, "scope": answer["scope"],
                          "expires_in": answer["expires_in"], "jti": claims["jti"],
                          "actors": actors(claims)}))
        if token_dir:
            path = os.path.join(token_dir, name + ".token")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
