"""Mints the JWTs the jwt-auth tests send, with PyJWT, and prints them with the public keys
that verify them, as one JSON object."""

import base64
import json
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa


def public_pem(key):
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


now = int(time.time())
rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
p256 = ec.generate_private_key(ec.SECP256R1())
p384 = ec.generate_private_key(ec.SECP384R1())
ed = ed25519.Ed25519PrivateKey.generate()
soon = now + 600

print(json.dumps({
    "keys": {"rsa": public_pem(rsa_key), "p256": public_pem(p256), "p384": public_pem(p384), "ed25519": public_pem(ed)},
    "tokens": {
        "HS256": jwt.encode({"key": "hs256", "exp": soon}, "hs256-secret", algorithm="HS256"),
        "HS384": jwt.encode({"key": "hs384", "exp": soon}, "hs384-secret", algorithm="HS384"),
        "HS512": jwt.encode({"key": "hs512", "exp": soon}, base64.b64decode("aHM1MTItc2VjcmV0LWJ5dGVz"), algorithm="HS512"),
        "RS256": jwt.encode({"key": "rs256", "exp": soon}, rsa_key, algorithm="RS256"),
        "RS384": jwt.encode({"key": "rs384", "exp": soon}, rsa_key, algorithm="RS384"),
        "RS512": jwt.encode({"key": "rs512", "exp": soon}, rsa_key, algorithm="RS512"),
        "ES256": jwt.encode({"key": "es256", "exp": soon}, p256, algorithm="ES256"),
        "ES384": jwt.encode({"key": "es384", "exp": soon}, p384, algorithm="ES384"),
        "EdDSA": jwt.encode({"key": "eddsa", "exp": soon}, ed, algorithm="EdDSA"),
        "expired": jwt.encode({"key": "hs256", "exp": now - 600}, "hs256-secret", algorithm="HS256"),
        "not_yet": jwt.encode({"key": "hs256", "nbf": now + 600}, "hs256-secret", algorithm="HS256"),
        "in_grace": jwt.encode({"key": "graced", "exp": now - 5}, "graced-secret", algorithm="HS256"),
        "wrong_secret": jwt.encode({"key": "hs256", "exp": soon}, "another-secret", algorithm="HS256"),
        "wrong_alg": jwt.encode({"key": "rs256", "exp": soon}, "hs256-secret", algorithm="HS256"),
        "no_key": jwt.encode({"sub": "someone"}, "hs256-secret", algorithm="HS256"),
        "unknown_key": jwt.encode({"key": "nobody"}, "hs256-secret", algorithm="HS256"),
        "by_uid": jwt.encode({"uid": "hs256", "exp": soon}, "hs256-secret", algorithm="HS256"),
        "no_exp": jwt.encode({"key": "hs256"}, "hs256-secret", algorithm="HS256"),
        "exp_and_nbf": jwt.encode({"key": "hs256", "exp": soon, "nbf": now - 60}, "hs256-secret", algorithm="HS256"),
        "exp_not_a_number": jwt.encode({"key": "hs256", "exp": "tomorrow"}, "hs256-secret", algorithm="HS256"),
    },
}))
