#!/usr/bin/env python3
"""An independent verifier of delegation-operator access tokens, written with PyJWT.

Usage: verify.py --issuer URL --ca FILE --audience AUD [--status] < tokens.json

Fetches the issuer's OIDC discovery document over HTTPS (trusting only the CA in FILE), then checks each
token of the JSON array on stdin ([{"name": ..., "token": ...}]) against the JWKS named by its jwks_uri,
as a resource server should: algorithm allow-list (ES256 only), a kid from the JWKS, typ "at+jwt"
(RFC 9068; PyJWT does not check typ itself), the signature, iss, aud, exp (required), nbf.

With --status it also looks up each token that verified in its Token Status List
(draft-ietf-oauth-status-list): the `status.status_list.uri` of the token is fetched over HTTPS as
application/statuslist+jwt, verified with the same JWKS (typ statuslist+jwt, sub = the uri, iss, exp),
and the token's `idx` read by tests/python/decode_status_list.py. The status is VALID, INVALID,
SUSPENDED or the number found.

Prints a JSON array with one verdict per token: {"name", "accepted", "reason", "sub", "jti", "actors",
"status"}. Tokens are never printed.
"""

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
import urllib.request

import jwt

ALGORITHMS = ["ES256"]
ACCESS_TOKEN_TYP = "at+jwt"
STATUS_LIST_TYP = "statuslist+jwt"
STATUS_NAMES = {0: "VALID", 1: "INVALID", 2: "SUSPENDED"}
DECODER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python", "decode_status_list.py")


def https_get(url, ssl_context, accept):
    if not url.startswith("https://"):
        raise ValueError(f"refusing a non-https URL: {url}")
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, context=ssl_context, timeout=20) as response:
        return response.headers.get_content_type(), response.read()


def discover(issuer, ssl_context):
    """The discovery document's jwks_uri, after checking that it names this issuer exactly."""
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    _, body = https_get(url, ssl_context, "application/json")
    document = json.loads(body)
    if document.get("issuer") != issuer:
        raise ValueError(f"discovery names issuer {document.get('issuer')!r}, expected {issuer!r}")
    return document["jwks_uri"]


def actors(claims):
    """The nested RFC 8693 `act` chain, current actor first."""
    chain, act = [], claims.get("act")
    while isinstance(act, dict):
        chain.append(act.get("sub"))
        act = act.get("act")
    return chain


def verify_access_token(token, jwks_client, issuer, audience):
    header = jwt.get_unverified_header(token)
    if header.get("typ") != ACCESS_TOKEN_TYP:
        raise jwt.InvalidTokenError(f"typ is {header.get('typ')!r}, not {ACCESS_TOKEN_TYP}")
    # Looks the key up by the header's kid (PyJWKClientError if it is not in the JWKS).
    key = jwks_client.get_signing_key_from_jwt(token)
    return jwt.decode(
        token,
        key,
        algorithms=ALGORITHMS,
        audience=audience,
        issuer=issuer,
        options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
    )


def status_of(claims, jwks_client, issuer, ssl_context, lists):
    reference = claims["status"]["status_list"]
    uri, idx = reference["uri"], reference["idx"]
    if uri not in lists:
        content_type, body = https_get(uri, ssl_context, "application/statuslist+jwt")
        if content_type != "application/statuslist+jwt":
            raise ValueError(f"status list served as {content_type}")
        status_token = body.decode("ascii").strip()
        header = jwt.get_unverified_header(status_token)
        if header.get("typ") != STATUS_LIST_TYP:
            raise jwt.InvalidTokenError(f"status list typ is {header.get('typ')!r}")
        key = jwks_client.get_signing_key_from_jwt(status_token)
        list_claims = jwt.decode(
            status_token,
            key,
            algorithms=ALGORITHMS,
            issuer=issuer,
            options={"require": ["exp", "iat", "sub"], "verify_aud": False},
        )
        if list_claims["sub"] != uri:
            raise jwt.InvalidTokenError(f"status list sub {list_claims['sub']!r} is not its uri {uri!r}")
        lists[uri] = status_token
    value = decode_index(lists[uri], idx)
    return STATUS_NAMES.get(value, str(value)) if isinstance(value, int) else value


def decode_index(status_token, idx):
    """The value at idx of a (verified) Status List Token, read by the project's independent decoder."""
    with tempfile.NamedTemporaryFile("w", suffix=".jwt", delete=False) as f:
        f.write(status_token)
    try:
        out = subprocess.run(
            [sys.executable, DECODER, f.name], input=f"{idx}\n", capture_output=True, text=True, check=True
        ).stdout.splitlines()
    finally:
        os.unlink(f.name)
    value = out[1]
    return int(value) if value.isdigit() else value


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--issuer", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--audience", required=True)
    parser.add_argument("--status", action="store_true")
    args = parser.parse_args()

    ssl_context = ssl.create_default_context(cafile=args.ca)
    jwks_client = jwt.PyJWKClient(discover(args.issuer, ssl_context), ssl_context=ssl_context)
    verdicts, lists = [], {}
    for item in json.load(sys.stdin):
        verdict = {"name": item["name"], "accepted": False, "verifier": f"PyJWT {jwt.__version__}"}
        try:
            claims = verify_access_token(item["token"], jwks_client, args.issuer, args.audience)
        except (jwt.PyJWTError, ValueError, KeyError) as e:
            verdict["reason"] = f"{type(e).__name__}: {e}"
        else:
            verdict.update(accepted=True, reason="valid", sub=claims["sub"], jti=claims["jti"], actors=actors(claims))
            if args.status:
                verdict["status"] = status_of(claims, jwks_client, args.issuer, ssl_context, lists)
        verdicts.append(verdict)
    json.dump(verdicts, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
