#!/usr/bin/env python3
"""An independent reader of a Status List Token (draft-ietf-oauth-status-list), standard library only.

Usage: decode_status_list.py TOKEN_FILE < INDICES

Reads the compact JWT in TOKEN_FILE (the signature is not checked), prints one JSON line with its
`typ`, `sub`, `bits` and number of entries, then, for each index read from standard input (one per
line), the status value at that index as a decimal number, or `out-of-range`.
"""

import base64
import json
import sys
import zlib


def b64url_decode(text):
    # base64url without padding (RFC 7515 §2): restore the padding Python's decoder wants.
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def main():
    with open(sys.argv[1], encoding="ascii") as f:
        header_part, payload_part, _signature = f.read().strip().split(".")
    header = json.loads(b64url_decode(header_part))
    payload = json.loads(b64url_decode(payload_part))
    status_list = payload["status_list"]
    bits = status_list["bits"]
    if bits not in (1, 2, 4, 8):
        sys.exit(f"unsupported bits: {bits}")
    # zlib.decompress expects the ZLIB (RFC 1950) wrapper, as the draft requires.
    array = zlib.decompress(b64url_decode(status_list["lst"]))
    entries = len(array) * 8 // bits
    print(json.dumps({"typ": header.get("typ"), "sub": payload["sub"], "bits": bits, "len": entries}))
    mask = (1 << bits) - 1
    for line in sys.stdin:
        if not line.strip():
            continue
        idx = int(line)
        if not 0 <= idx < entries:
            print("out-of-range")
            continue
        # Index 0 is in the least significant bits of byte 0.
        position = idx * bits
        print((array[position // 8] >> (position % 8)) & mask)


if __name__ == "__main__":
    main()
