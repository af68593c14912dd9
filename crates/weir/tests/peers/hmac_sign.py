"""Signs a request as APISIX's hmac-auth expects, independently of Weir.

Usage: hmac_sign.py KEY_ID SECRET ALGORITHM METHOD TARGET AGE_SECONDS [BODY]
Prints the Authorization, Date and (with a body) Digest header values as JSON."""

import base64
import email.utils
import hashlib
import hmac
import json
import sys
import time

key_id, secret, algorithm, method, target, age = sys.argv[1:7]
body = sys.argv[7] if len(sys.argv) > 7 else None
date = email.utils.formatdate(time.time() - int(age), usegmt=True)
headers = ["@request-target", "date", "x-custom"]
lines = [key_id, f"{method} {target}", f"date: {date}", "x-custom: signed"]
signing = "\n".join(lines) + "\n"
digestmod = {"hmac-sha1": hashlib.sha1, "hmac-sha256": hashlib.sha256, "hmac-sha512": hashlib.sha512}[algorithm]
signature = base64.b64encode(hmac.new(secret.encode(), signing.encode(), digestmod).digest()).decode()
out = {
    "authorization": f'Signature keyId="{key_id}",algorithm="{algorithm}",headers="{" ".join(headers)}",signature="{signature}"',
    "date": date,
}
if body is not None:
    out["digest"] = "SHA-256=" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
print(json.dumps(out))
